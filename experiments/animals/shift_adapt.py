"""Zero-shot under a domain shift with adaptation to the unlabelled corrupted images.

    xmodal train --workdir workdirs/shift_entropy_fog_3 \
        --config experiments/animals/shift_adapt.py:method=entropy,corruption=fog,severity=3

`shift_source_only.py` (the quick start, evaluated on the corrupted test split) plus the
`zeroshot_adaptation` task's term on the corrupted `train[:90%]` images (`target_split`), their
labels unused except to keep, per head, the images of its seen classes (the inductive setting):
- `method=entropy` (entropy minimisation), `mcc` (minimum class confusion), `im` (information
  maximisation): on each head's zero-shot logits over its seen classes' names;
- `method=dann`, `cdan`: a domain discriminator per head on its projected image embeddings,
  clean source against corrupted target (1024-1024 hidden layers, the DANN schedule);
- `adabn=True` (with `split=k`: the heads of one split, since the image tower is shared): the
  image tower's BatchNorm statistics re-estimated on those corrupted images first, for the
  target's features in training and evaluation; with `method=none`, AdaBN alone.
`weight` is the trade-off (default 1; not tuned: no target labels to tune it on), `warmup` the
ramp of `config.adaptation.warmup` (default: 'sigmoid' for the logit losses, so they do not act
on the random projections of the first steps at full weight; 'none' for DANN and CDAN, whose
gradient reversal already follows that ramp). `transductive=True` reads every corrupted
training image, unseen classes included, with logits over all 10 names: the transductive
setting, its evaluators named `*_transductive`, never one row with the inductive ones.

Needs the corrupted dataset `animal_silhouettes_c/<corruption>_<severity>` (see
`shift_source_only.py`).
"""

from experiments import quickstart
from experiments.animals.shift_source_only import shift_config, shifted_dataset
from xmodal_jax.errors import UserError

METHODS = ("none", "entropy", "mcc", "im", "dann", "cdan")


def get_config(arg=None):
    c, args = shift_config(
        arg, method="entropy", weight=1.0, warmup="", transductive=False, adabn=False
    )
    if args.method not in METHODS:
        raise UserError(f"shift_adapt: method={args.method!r}; use one of {METHODS}.")
    c.task = "zeroshot_adaptation"
    c.data.target = {
        "name": shifted_dataset(args),
        "split": args.target_split,
        "pp": quickstart.IMAGE_PP,
    }
    c.adaptation = {
        "method": args.method,
        "transductive": bool(args.transductive),
        "adabn": bool(args.adabn),
    }
    if args.method != "none":
        warmup = args.warmup or ("none" if args.method in ("dann", "cdan") else "sigmoid")
        c.adaptation.update(weight=args.weight, warmup=warmup)
    if args.transductive:
        c.evals = {f"{k}_transductive": v for k, v in c.evals.items()}
    return c
