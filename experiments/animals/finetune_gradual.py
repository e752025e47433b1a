"""Gradual unfreezing (ULMFiT-style): the head first, then the backbone from the top down.

    xmodal train --config experiments/animals/finetune_gradual.py \
        --workdir workdirs/animals_ft_gradual

`config.unfreeze`: the head trains from step 0; the last conv and blocks 14-17 from 20% of the
steps, blocks 7-13 from 40%, the stem and blocks 1-6 from 60% (steps 30, 60, 90 of 150).
Figures: the `gradual unfreezing` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, args = base_config(arg)
    s = args.steps
    c.unfreeze = [
        (s // 5, "last_.*|block1[4-7]_.*"),
        (2 * s // 5, "block([7-9]|1[0-3])_.*"),
        (3 * s // 5, "stem_.*|block[1-6]_.*"),
    ]
    c.regularizer = {"name": "none"}
    return c
