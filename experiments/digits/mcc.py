"""MCC on digits: LeNet, labelled source + unlabelled target, adaptation loss `mcc`.

    xmodal train --config experiments/digits/mcc.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_mcc_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.

MCC's trade-off `adaptation.weight` (1.0 and temperature 2.5 in Jin et al., ECCV 2020) is chosen
by the digits table from a grid, by the source validation accuracy.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "mcc", weight=1.0, temperature=2.5)
