"""Full fine-tuning with layer-wise learning-rate decay instead of one backbone multiplier.

    xmodal train --config experiments/animals/finetune_llrd.py --workdir workdirs/animals_ft_llrd

`config.llrd = 0.8`: the head and the last conv train at the base rate, block 17 at 0.8x, each
block below at 0.8x the one above (block 1 at 0.8^17 = 0.023x), the stem at 0.8^18; the 0.1x
backbone multiplier of the other configs is dropped.
Figures: the `layer-wise LR decay` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, args = base_config(arg, llrd=0.8)
    c.lr_mults = [("head/.*", 1.0)]
    c.llrd = args.llrd
    c.regularizer = {"name": "none"}
    return c
