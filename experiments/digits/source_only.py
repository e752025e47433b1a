"""Source only: LeNet trained on the source digits, evaluated on both domains' test splits.

    xmodal train --config experiments/digits/source_only.py:direction=m2u,seed=0 \
        --workdir workdirs/digits_source_only_m2u_s0

Expected on 2 CPU cores (figures filled in from the runs below).
"""

from digits_common import base_config


def get_config(arg=None):
    return base_config(arg)
