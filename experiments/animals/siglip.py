"""The quick start itself (SigLIP loss, towers locked), as the baseline of this folder.

xmodal train --config experiments/animals/siglip.py --workdir workdirs/animals_siglip
"""

from common import base_config


def get_config(arg=None):
    return base_config(arg)[0]
