"""Transfer strategies from ImageNet MobileNetV2 to `animal_silhouettes` with 10% of the labels.

    xmodal table experiments/tables/transfer_ablation.py --root workdirs/tables --jobs 1

Each row is one strategy of `experiments/animals/finetune_*.py`: a linear probe (backbone
frozen), full fine-tuning without a regulariser, layer-wise LR decay, L2-SP, DELTA, BSS and
gradual unfreezing. Test accuracy at the final step (`last`), seeds 0, 1, 2. A config file that
does not exist yet stops the command with one error naming it.
"""

from xmodal_jax.tables import Column, Row, Table

STRATEGIES = (
    ("linear probe", "finetune_linear_probe"),
    ("full fine-tune", "finetune_none"),
    ("layer-wise LR decay", "finetune_llrd"),
    ("L2-SP", "finetune_l2sp"),
    ("DELTA", "finetune_delta"),
    ("BSS", "finetune_bss"),
    ("gradual unfreezing", "finetune_gradual"),
)

TABLE = Table(
    title="Transfer from ImageNet MobileNetV2, animal silhouettes, 10% of the labels: "
    "test accuracy (%)",
    rows=[Row(label, f"experiments/animals/{name}.py") for label, name in STRATEGIES],
    columns=[Column("test accuracy", "eval/test/accuracy")],
    seeds=(0, 1, 2),
    select="last",
    baseline="full fine-tune",  # each cell's difference to it, with its standard error
)
