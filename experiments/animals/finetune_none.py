"""Full fine-tuning without a regulariser: the baseline of `FINETUNE.md`.

    xmodal train --config experiments/animals/finetune_none.py --workdir workdirs/animals_ft_none

Every parameter trains (the backbone at 0.1x the head's rate; see `finetune_common.py`).
Figures: the `full fine-tune` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, _ = base_config(arg)
    c.regularizer = {"name": "none"}
    return c
