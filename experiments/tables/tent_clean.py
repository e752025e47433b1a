"""TENT where nothing shifted: the quick start's zero-shot on its own clean test images, before
and after test-time adaptation.

    xmodal table experiments/tables/tent_clean.py --root workdirs/tables --jobs 1   # 15 runs

The control for the TENT rows of `zeroshot_shift.py`: the same configs with `corruption=none`,
so the stream TENT adapts on is the clean `animal_silhouettes` test split (`shift_tent.py`; TENT
with batch statistics, and keeping the tower's running statistics), beside the quick start
evaluated there without adaptation (`shift_source_only.py`), and TENT's normalisation without
its updates (`tent_steps=0`: each test batch normalised with its own statistics, nothing
trained; the TENT code's `norm` baseline). Whatever TENT changes here is its own doing, not a
corruption's: a row below the baseline says that the adaptation itself moves the locked tower's
features away from those its heads were trained on, and the rows tell the batch statistics and
the updates apart. TENT's settings are those of the shifted table (the official code's defaults,
none tuned), and once a tenth of its step with the running statistics kept: how much of the
updates' own cost is their size (a sensitivity, chosen by nothing); the rule is `last`. Each
TENT run costs minutes on 2 CPU cores (the image tower runs in the evaluation).
"""

from experiments.tables import zeroshot_shift as shifted
from xmodal_jax.tables import Column, Row, Table

SEEN, UNSEEN, CONTROL = shifted.SEEN, shifted.UNSEEN, shifted.CONTROL
CLEAN = "corruption=none"


def _tent(label: str, args: str) -> Row:
    return Row(
        label,
        shifted.TENT,
        ",".join(filter(None, [CLEAN, args])),
        metrics={
            SEEN: "eval/shift_seen_tent/accuracy",
            UNSEEN: "eval/shift_unseen_tent/accuracy",
            CONTROL: "eval/shift_unseen_control_tent/accuracy",
        },
    )


TABLE = Table(
    title="TENT on clean test images (animal_silhouettes): accuracy (%)",
    rows=[
        Row("no adaptation (quick start)", shifted.SOURCE, CLEAN),
        _tent("TENT (test-time)", ""),
        _tent("TENT, source statistics (test-time)", "statistics=source"),
        _tent("batch statistics, no update (test-time)", "tent_steps=0"),
        _tent("TENT, source statistics, lr 1e-4 (test-time)", "lr=0.0001,statistics=source"),
    ],
    columns=[
        Column(SEEN, "eval/shift_seen/accuracy"),
        Column(UNSEEN, "eval/shift_unseen/accuracy"),
        Column(CONTROL, "eval/shift_unseen_control/accuracy", bold=False),
    ],
    seeds=(0, 1, 2),
    select="last",
    baseline="no adaptation (quick start)",
    env=shifted.TABLE.env,  # the shifted table's software stack, so the rows compare
)
