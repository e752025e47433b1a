"""The quick start itself (CLIP's softmax loss, towers locked), as the baseline of this folder.

    xmodal train --config experiments/animals/clip.py --workdir workdirs/animals_clip

Figures: the clip row of `experiments/tables/results/animals_zeroshot.md`.
"""

from experiments.animals.common import base_config


def get_config(arg=None):
    return base_config(arg, loss="clip")[0]
