"""Shared settings of the cross-modal `animal_silhouettes` experiments.

Every config here starts from the quick start (`experiments/quickstart.py`): ImageNet
MobileNetV2 on inverted 112 px silhouettes, MiniLM-L6 on class-name prompts, the same seeded
seen/unseen splits, loss and step count, Adam. Each changes one thing; a trained tower is
shared by all heads of a run, so configs that train a tower run one split (`split=k`) per run.
"""

import ml_collections

from experiments import quickstart
from xmodal_jax.config import parse_arg

IMAGE_PP = quickstart.IMAGE_PP
# Random crops and flips for a trained image tower (a locked one is cached instead).
AUGMENTED_PP = (
    "invert|resize(128)|random_crop(112)|flip_lr|grey_to_rgb|value_range(0, 1)|normalize"
    "|keep('image', 'label')"
)


def base_config(
    arg: str | None, **defaults
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The quick start config and the parsed `arg`: the quick start's arguments (`steps`,
    `splits`, `batch_size`), `split` (one split only), `loss`, plus `defaults`."""
    known = {k: quickstart.DEFAULTS[k] for k in ("steps", "splits", "batch_size", "loss")}
    known.update({"split": -1, **defaults})
    args = parse_arg(arg, **known)
    forwarded = ",".join(f"{k}={args[k]}" for k in ("steps", "splits", "batch_size", "loss"))
    c = quickstart.get_config(forwarded)
    if args.split >= 0:  # one split: its main head only
        c.heads = {"unseen": (quickstart.unseen_splits(args.split + 1)[args.split],)}
        c.evals = {k: c.evals[k] for k in ("seen", "zeroshot_unseen")}
    return c, args


def one_split(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config that trains a tower runs a single split."""
    if len(c.heads.unseen) != 1:
        raise ValueError("This config trains a tower shared by the heads; pass split=k (0..4).")
    return c
