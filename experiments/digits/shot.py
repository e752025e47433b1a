"""SHOT on digits: source-free adaptation of a source model to the unlabelled target.

Two steps: train the source model, then adapt it with target data only (no source data):

    xmodal train --config experiments/digits/source_only.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_source_only_m2u_s0
    xmodal train --workdir workdirs/digits_shot_m2u_s0 --config \
        experiments/digits/shot.py:direction=m2u,seed=0,source=workdirs/digits_source_only_m2u_s0

`source` is the first run's workdir (its newest checkpoint; the model config must be the source
run's: for a source model with BatchNorm, e.g. a `tent.py` or `adabn.py` run, add `norm=batch`).
The second run trains the LeNet feature extractor (convolutions, `fc`, `bottleneck`) on the
target training split with SHOT's loss (information maximisation + 0.3 x cross-entropy with
self-supervised pseudo-labels, `xmodal_jax.tasks.source_free`), the head frozen by
`config.schedule`, with the digits recipe's optimiser for `steps` steps (default 1,000, about 70
passes over UCI's 898 training images or 16 over MNIST's 4,000; the official digits script runs
30 epochs). `eval/target/accuracy` is the adapted model on the target test split; at step 0 it
would equal the source model's. `eval/source/accuracy` is kept (the `source_val` selection rule
reads it) and is the source test split seen by the adapted model, which no longer aims at it.
"""

from experiments.digits.digits_common import DIRECTIONS, base_config, domain_data
from xmodal_jax.config import parse_arg
from xmodal_jax.errors import UserError


def get_config(arg=None):
    args = parse_arg(arg, direction="m2u", seed=0, source="", norm="none", steps=1000)
    c = base_config(f"direction={args.direction},seed={args.seed}")
    _, target = DIRECTIONS[c.direction]
    if args.norm not in ("none", "batch"):
        raise UserError(f"norm={args.norm!r}: use none or batch (the source run's LeNet).")
    if args.norm == "batch":
        c.model.norm = "batch"
    c.task = "source_free"
    c.source = {"workdir": args.source or None, "step": None}
    c.data = domain_data(target, "train", c.direction)
    c.shot = {"beta": 0.3, "im_weight": 1.0}
    c.schedule = [("head/.*", None), (".*", "base")]
    c.total_steps = args.steps
    c.checkpoint_every = args.steps
    return c
