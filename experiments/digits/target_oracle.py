"""Target oracle on digits: LeNet trained on the labelled target training split (an upper
bound for adaptation, which sees no target labels).

    xmodal train --config experiments/digits/target_oracle.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_target_oracle_m2u_s0

Results over seeds and both directions: experiments/digits/README.md.
"""

from experiments.digits.digits_common import DIRECTIONS, base_config, domain_data


def get_config(arg=None):
    c = base_config(arg)
    c.data = domain_data(DIRECTIONS[c.direction][1], "train", c.direction)
    return c
