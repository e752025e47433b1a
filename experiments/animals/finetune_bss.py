"""Full fine-tuning with Batch Spectral Shrinkage (Chen et al., NeurIPS 2019).

    xmodal train --config experiments/animals/finetune_bss.py --workdir workdirs/animals_ft_bss

`eta * sum of the k smallest squared singular values` of the batch's pooled features [32, 1280];
eta = 0.001, k = 1 (the paper's and TLlib's values).
Figures: the `BSS` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, args = base_config(arg, weight=0.001, k=1)
    c.regularizer = {"name": "bss", "weight": args.weight, "k": args.k}
    return c
