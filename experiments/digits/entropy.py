"""Entropy minimisation on digits: LeNet, labelled source + unlabelled target, loss `entropy`.

    xmodal train --config experiments/digits/entropy.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_entropy_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.

The trade-off `adaptation.weight` is ramped in by DANN's sigmoid schedule (`warmup`): at full
weight from the first step, entropy minimisation drives the random initial predictions to one
class. The digits table chooses the weight from a grid by the source validation accuracy.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "entropy", weight=1.0, warmup="sigmoid")
