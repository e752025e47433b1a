"""CDAN on digits: LeNet, labelled source + unlabelled target, adaptation loss `cdan`.

    xmodal train --config experiments/digits/cdan.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_cdan_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "cdan")
