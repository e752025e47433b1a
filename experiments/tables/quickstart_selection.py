"""How the quick start's loss and step count are chosen: on validation only.

    xmodal table experiments/tables/quickstart_selection.py --root workdirs/tables --jobs 1

Each row is the quick start (`experiments/animals/siglip.py` = `experiments/quickstart.py`, towers
locked, 5 splits in one run) with one loss and one step count, over seeds 0, 1, 2. The
validation column is the calibration heads' 2-way accuracy among seen classes they were trained
without, on held-out training images (`eval/val_pseudo_unseen`): no unseen class and no test
image. The row with the best validation mean is what `experiments/quickstart.py` ships; the test
columns are shown beside it only to report what that choice gives, never to choose.
"""

from xmodal_jax.tables import Column, Row, Table

LOSSES = ("siglip", "clip")
STEPS = (200, 400, 800)

TABLE = Table(
    title="Quick start selection: validation and test accuracy (%) per loss and step count",
    rows=[
        Row(f"{loss}, {steps} steps", "experiments/animals/siglip.py", f"loss={loss},steps={steps}")
        for loss in LOSSES
        for steps in STEPS
    ],
    columns=[
        Column("validation: pseudo-unseen (2-way)", "eval/val_pseudo_unseen/accuracy"),
        Column("test: unseen (3-way)", "eval/zeroshot_unseen/accuracy", bold=False),
        Column("test: control", "eval/zeroshot_unseen_control/accuracy", bold=False),
        Column("test: seen (7-way)", "eval/seen/accuracy", bold=False),
    ],
    seeds=(0, 1, 2),
    select="last",
    notes=(
        "Selection rule: the highest mean of the validation column (bold); the test columns are "
        "not bolded because they choose nothing."
    ),
)
