"""The quick start with SigLIP's sigmoid loss instead of CLIP's softmax (towers locked).

    xmodal train --config experiments/animals/siglip.py --workdir workdirs/animals_siglip

Figures: the siglip row of `experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import base_config


def get_config(arg=None):
    return base_config(arg, loss="siglip")[0]
