"""BNM on digits: LeNet, labelled source + unlabelled target, adaptation loss `bnm`.

    xmodal train --config experiments/digits/bnm.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_bnm_m2u_s0

Trade-off weight 1 on the paper's loss -||softmax||_* / B, as every method here; the authors'
code divides by min(B, C) instead (xmodal_jax/objectives/adaptation/bnm.py), which at B = 64,
C = 10 is weight 6.4 here. Results over seeds and both directions: experiments/digits/README.md.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "bnm")
