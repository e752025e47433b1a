"""Image-text matching with a fused head beside the contrastive loss (towers locked, cached).

    xmodal train --config experiments/animals/itm.py:head=concat_mlp --workdir workdirs/itm_concat

`head` is any of `xmodal_jax.models.fusion.HEADS`: concat_mlp, late_fusion, gated, film,
bilinear, cross_attention. The fused head reads the towers' pooled outputs and scores a pair;
it trains on each image with its own class prompt and the hardest other prompt (and each prompt
with the hardest other image) of the batch. Reports `eval/itm/accuracy` (seen classes: own vs
hardest other prompt) and zero-shot accuracy when the class prompts are ranked by the ITM score
(`eval/zeroshot_unseen_itm/accuracy`) beside the cosine ranking: whether a head that learns to
match the 7 training names carries over to new ones as the shared embedding space does.
"""

from experiments.animals.common import base_config
from xmodal_jax.models import fusion


def get_config(arg=None):
    c, args = base_config(arg, head="concat_mlp")
    head = args.head
    if head not in fusion.HEADS:
        raise ValueError(f"head={head!r}: use one of {sorted(fusion.HEADS)}.")
    c.model.fusion = {"name": head, "out_dim": 64}
    c.heads.control = False
    c.heads.calibration_holdout = 0
    c.evals = {
        "seen": c.evals.seen,
        "zeroshot_unseen": c.evals.zeroshot_unseen,
        "itm": {"type": "itm", "classes": "seen", "split": c.evals.seen.split},
        "seen_itm": {**c.evals.seen.to_dict(), "score": "itm"},
        "zeroshot_unseen_itm": {**c.evals.zeroshot_unseen.to_dict(), "score": "itm"},
    }
    return c
