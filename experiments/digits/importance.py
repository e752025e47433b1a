"""Importance weighting on digits: LeNet, source examples weighted by a domain classifier.

    xmodal train --config experiments/digits/importance.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_importance_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.

The clip of the normalised weights, `adaptation.clip_max`, trades bias for variance; the digits
table chooses it from a grid by the source validation accuracy.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "importance", clip_max=10.0)
