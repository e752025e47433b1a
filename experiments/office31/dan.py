"""Office-31, DAN (multi-kernel MMD) on ResNet-50.

    xmodal train --config experiments/office31/dan.py:task=A2W \
        --workdir workdirs/office31_dan_a2w

Needs the prepared dataset (`python -m xmodal_jax.data.office31 --manual_dir DIR`); the table
over all tasks and methods is experiments/tables/office31.py. Not measured here: no Office-31
images and no ImageNet ResNet-50 are available offline (see office31_common.py).
"""

from office31_common import adaptation_config


def get_config(arg=None):
    return adaptation_config(arg, "mmd")
