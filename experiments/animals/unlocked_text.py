"""The quick start with MiniLM's top block (layer 5) trained, the rest of MiniLM locked.

    xmodal train --config experiments/animals/unlocked_text.py:split=0 \
        --workdir workdirs/animals_unlocked_text_s0

The comparison behind the quick start's choice of a locked text tower; one split per run
(training reads only that split's seen classes). Compare its `eval/zeroshot_unseen/accuracy`
with the quick start's per-split figure (`eval/zeroshot_unseen/split_k/accuracy`).
"""

from experiments.animals.common import base_config, one_split


def get_config(arg=None):
    c, _ = base_config(arg, split=0)
    c.model.text.locked = False
    c.schedule = [
        ("txt/encoder/layer_5/.*", 1e-4),
        ("txt/.*", None),
        (".*", "base"),
    ]
    return one_split(c)
