"""Office-31 with ResNet-50: six transfer tasks, source-only and adaptation methods.

    python -m xmodal_jax.data.office31 --manual_dir DIR   # once: prepare the manual download
    xmodal table experiments/tables/office31.py --root workdirs/tables --jobs 4

Target accuracy on all target images at the final step (`last`), seeds 0, 1, 2: 108 runs of
20,000 steps of ResNet-50 at 224 px (a GPU job each). The reference column is TLlib's published
ResNet-50 table. ResNet-50 starts from torchvision's ImageNet weights, as the reference does: put
`resnet50-0676ba61.pth` in `~/.cache/torch/hub/checkpoints/` first (see
experiments/office31/da.py); a missing file fails each job with one error naming
it.
"""

from xmodal_jax.tables import Column, Reference, Row, Table

TASKS = ("A2W", "D2W", "W2D", "A2D", "D2A", "W2A")
LABELS = {t: f"{t[0]}→{t[2]}" for t in TASKS}
TLLIB = (
    "TLlib, Office-31 accuracy on ResNet-50 (ImageNet-pretrained): thuml/Transfer-Learning-"
    "Library docs/dalib/benchmarks/image_classification.rst (commit 1cd7e04)"
)
# Columns A→W, D→W, W→D, A→D, D→A, W→A of that table.
PUBLISHED = {
    "source_only": (75.8, 95.5, 99.0, 79.3, 63.6, 63.8),
    "dann": (91.4, 97.9, 100.0, 83.6, 73.3, 70.4),
    "dan": (84.2, 98.4, 100.0, 87.3, 66.9, 65.2),
    "jan": (93.7, 98.4, 100.0, 89.4, 69.2, 71.0),
    "cdan": (93.8, 98.5, 100.0, 89.9, 73.4, 70.4),
    "mcc": (94.1, 98.4, 99.8, 95.6, 75.5, 74.2),
}
NAMES = {
    "source_only": "source only",
    "dann": "DANN",
    "dan": "DAN (MK-MMD)",
    "jan": "JAN",
    "cdan": "CDAN",
    "mcc": "MCC",
}

TABLE = Table(
    title="Office-31, ResNet-50: target accuracy (%)",
    rows=[
        Row(
            NAMES[m],
            "experiments/office31/da.py",
            args=f"method={m}",
            reference=Reference(
                TLLIB, {LABELS[t]: v for t, v in zip(TASKS, PUBLISHED[m], strict=True)}
            ),
        )
        for m in NAMES
    ],
    columns=[Column(LABELS[t], "eval/target/accuracy", args=f"task={t}") for t in TASKS],
    seeds=(0, 1, 2),
    select="last",
    baseline="source only",  # each cell's difference to it, with its standard error
    select_metric="eval/source/accuracy",
)
