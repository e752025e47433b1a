"""Full fine-tuning with Batch Spectral Shrinkage (Chen et al., NeurIPS 2019).

    xmodal train --config experiments/animals/finetune_bss.py --workdir workdirs/animals_ft_bss

`eta * sum of the k smallest squared singular values` of the batch's pooled features [32, 1280];
eta = 0.001, k = 1 (the paper's and TLlib's values).
Measured: eval/test/accuracy 0.8865 (test loss 0.393; no regulariser: 0.8965 / 0.369), seed 0,
8 min 20 s on 2 shared CPU cores (load 14-22). Within noise of plain fine-tuning; no gain here.
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, args = base_config(arg, weight=0.001, k=1)
    c.regularizer = {"name": "bss", "weight": args.weight, "k": args.k}
    return c
