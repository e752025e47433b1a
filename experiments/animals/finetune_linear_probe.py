"""Linear probe: the ImageNet backbone frozen (no optimiser state), only the new head trains.

    xmodal train --config experiments/animals/finetune_linear_probe.py \
        --workdir workdirs/animals_ft_linear_probe

`config.transfer = 'linear_probe'` (the Optax rules of `xmodal_jax/transfer/rules.py`). The
backbone's parameters stay bit for bit, but its BatchNorm statistics are re-estimated on the
training batches (the model runs in train mode), as in every config of this table.
Figures: the `linear probe` row of `experiments/tables/results/transfer_ablation.md`
(seeds 0, 1, 2, written from their run records by `make tables`).
"""

from experiments.animals.finetune_common import base_config


def get_config(arg=None):
    c, _ = base_config(arg)
    c.transfer = "linear_probe"
    c.regularizer = {"name": "none"}
    return c
