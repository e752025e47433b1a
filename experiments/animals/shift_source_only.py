"""Zero-shot under a domain shift, the baseline: the quick start trained on clean images and
evaluated on corrupted ones.

    xmodal train --config experiments/animals/shift_source_only.py:corruption=fog,severity=3 \
        --workdir workdirs/shift_source_only_fog_3

Needs the corrupted dataset `animal_silhouettes_c/<corruption>_<severity>` (ImageNet-C's
corruptions of `animal_silhouettes`, built on first use; `corrupt-tta` installed). Training is
the quick start's, unchanged (all 5 splits, control and calibration heads, clean
`train[:90%]`); the evaluators run on the corrupted `test` split with the clean input
preprocessing (the corrupted images are 28x28x3; `grey_to_rgb` leaves them so):
- `shift_seen`, `shift_unseen`, `shift_unseen_control`: zero-shot accuracy among the seen
  classes, among the unseen ones, and of the permuted-names control;
- `shift_gzsl`: generalised zero-shot; its seen-class penalty is chosen by the calibration heads
  on the labelled corrupted `train[90%:]` images of seen classes (held out of any adaptation:
  `shift_adapt.py` adapts on `train[:90%]`), one scalar chosen with target labels, the same
  for every row; `harmonic_mean_uncalibrated` uses none;
- `shift_conse`: ConSE (`conse.py`), training-free, on the same corrupted images.
The clean `val_pseudo_unseen` of the quick start stays (model selection on source data).
`split=k` keeps split k's heads only (AdaBN needs one split); its control and calibration heads
are then drawn as a run's first split's are (`two_tower_heads.make_heads`), so compare such
rows with each other, not with the 5-split run's per-split figures.
`corruptions=all` (or `fog+snow`) evaluates the one trained model on each of those corrupted
datasets at `severity`, its evaluators suffixed by the corruption (`shift_unseen_fog`, ...): the
source-only and ConSE rows of `experiments/tables/zeroshot_shift.py` read one such run per seed,
so the model is trained once rather than once per corruption.
`source_bn=True` (with `split=k`) re-estimates the locked image tower's BatchNorm statistics on
the clean `train[:90%]` images of the split's seen classes before training
(`config.model.image.statistics='source'`): the heads then read features of their own domain's
statistics instead of ImageNet's, the source model AdaBN assumes (`shift_adapt.py:adabn=True,
source_bn=True` swaps in the corrupted images' statistics on top).
`corruption=none` evaluates on the clean test split instead (the control row of
`experiments/tables/tent_clean.py`). `shift_adapt.py` is the same with an adaptation term on
unlabelled corrupted images.
"""

import ml_collections

from experiments import quickstart
from xmodal_jax.config import parse_arg
from xmodal_jax.data.corruptions import CORRUPTIONS
from xmodal_jax.errors import UserError

DATASET = "animal_silhouettes_c"
CLEAN, CLEAN_DATASET = "none", "animal_silhouettes"  # the quick start's own images
SHIFT_DEFAULTS = dict(corruption="fog", severity=3, target_split="train[:90%]")
SHIFT_VAL_SPLIT = "train[90%:]"


def shifted_dataset(args) -> str:
    """The TFDS name of the corrupted dataset the arguments name; `corruption=none`: the clean
    `animal_silhouettes` (a control: what a setting does where nothing shifted)."""
    if args.corruption == CLEAN:
        return CLEAN_DATASET
    return f"{DATASET}/{args.corruption}_{int(args.severity)}"


def shift_config(
    arg: str | None, **defaults
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """The quick start (its arguments `steps`, `splits`, `batch_size`, `loss`; `split=k` for
    one split's heads) evaluated on the corrupted test split, and the parsed `arg`
    (`corruption`, `severity`, `target_split` and `defaults` besides)."""
    known = {k: quickstart.DEFAULTS[k] for k in ("steps", "splits", "batch_size", "loss")}
    args = parse_arg(arg, **known, split=-1, source_bn=False, **SHIFT_DEFAULTS, **defaults)
    c = quickstart.get_config(",".join(f"{k}={args[k]}" for k in known))
    if args.split >= 0:  # one split: its main, control and calibration heads
        c.heads.unseen = (quickstart.unseen_splits(args.split + 1)[args.split],)
    if args.source_bn:  # set only when asked: the other configs stay as recorded
        c.model.image.statistics = "source"
    shifted = {"dataset": shifted_dataset(args), "split": "test", "pp": quickstart.IMAGE_PP}
    c.evals = {
        "shift_seen": {"type": "zeroshot", "classes": "seen", **shifted},
        "shift_unseen": {"type": "zeroshot_unseen", **shifted},
        "shift_unseen_control": {"type": "zeroshot_control", **shifted},
        "shift_gzsl": {"type": "gzsl", "val_split": SHIFT_VAL_SPLIT, **shifted},
        "shift_conse": {"type": "conse", "top_t": 10, **shifted},
        "val_pseudo_unseen": c.evals.val_pseudo_unseen.to_dict(),
    }
    return c, args


def per_corruption(c: ml_collections.ConfigDict, corruptions: str, severity: int) -> None:
    """Replaces the `shift_*` evaluators by one set per corruption (`all`, or `a+b`)."""
    names = CORRUPTIONS if corruptions == "all" else tuple(corruptions.split("+"))
    unknown = sorted(set(names) - set(CORRUPTIONS))
    if unknown:
        raise UserError(f"corruptions: unknown {unknown}; use 'all' or '+'-joined {CORRUPTIONS}.")
    evals = {}
    for name, ev in c.evals.items():
        if not name.startswith("shift_"):
            evals[name] = ev.to_dict()
            continue
        for corruption in names:
            dataset = f"{DATASET}/{corruption}_{int(severity)}"
            evals[f"{name}_{corruption}"] = {**ev.to_dict(), "dataset": dataset}
    c.evals = evals


def get_config(arg=None):
    c, args = shift_config(arg, corruptions="")
    if args.corruptions:
        per_corruption(c, args.corruptions, args.severity)
    return c
