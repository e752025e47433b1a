"""CDAN+E on digits: LeNet, labelled source + unlabelled target, adaptation loss `cdan_e`.

    xmodal train --config experiments/digits/cdan_e.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_cdan_e_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.
"""

from experiments.digits.digits_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "cdan_e")
