"""TENT on digits: LeNet with BatchNorm trained on the source only; the target is evaluated
after online test-time entropy minimisation of the BatchNorm scales and biases.

    xmodal train --config experiments/digits/tent.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_tent_m2u_s0

Training is `source_only` with `model.norm='batch'` (the model of `adabn.py`). At every
evaluation, `eval/target/accuracy` is after online TENT (`tent_classification`: the target test
split read once in its fixed order, batch 128, one Adam step (lr 1e-3) per batch, as the
official defaults; every evaluation starts again from the trained model);
`eval/target_no_adapt/accuracy` is the same model without adaptation (BN statistics of the
source). `episodic=True` resets the adaptation before every batch. The source model of a run can
be adapted again with other TENT settings without training: `xmodal eval --config
experiments/digits/tent.py:lr=0.0001 --workdir DIR`.
"""

from experiments.digits.digits_common import base_config
from xmodal_jax.config import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, direction="m2u", seed=0, optimizer="adam", lr=1e-3, episodic=False)
    c = base_config(f"direction={args.direction},seed={args.seed}")
    c.model.norm = "batch"
    c.evals.target_no_adapt = dict(c.evals.target)
    c.evals.target.type = "tent_classification"
    c.evals.target.batch_size = 128
    c.evals.target.optimizer = args.optimizer
    c.evals.target.lr = args.lr
    c.evals.target.episodic = args.episodic
    c.evals.target.steps = 1
    return c
