"""Recognition under ImageNet-C corruptions: `digits_mnist_c` and `animal_silhouettes_c`.

    xmodal table experiments/tables/corruptions.py --root workdirs/tables --jobs 1 \
        --only "source only|AdaBN|TENT"      # 6 runs, on 2 CPU cores (see the notes)
    xmodal table experiments/tables/corruptions.py --root DIR --dry-run   # the rest: a cluster
                                          # (SLURM: launch/slurm_array.sbatch runs the lines)

A column of an adaptation row fills as soon as its runs have finished: the committed records
hold DANN's `MNIST sev. 5` (its 57 dry-run lines with `dataset=digits_mnist` and `severity=5`),
the other adaptation cells wait for a cluster.

Accuracy (%) on the corrupted test splits: the mean over the 19 corruptions at severity 3 and
at severity 5, and over all 95 corruption-severity pairs; the CSV also has every pair and the
mean of each severity (`experiments/tables/plot_corruptions.py` draws accuracy against
severity). A LeNet with BatchNorm trained on the clean images (`experiments/corruptions/`):
- source only, AdaBN and TENT read the evaluators of one `source.py` run per dataset and seed
  (AdaBN re-estimates BatchNorm statistics on the corrupted train split, unlabelled; TENT adapts
  online on the test stream);
- DANN, CDAN+E, MCC and SHOT train once per corruption and severity (`adapt.py`: target = the
  unlabelled corrupted train split; SHOT source-free from the seed's `source.py` run): 95 runs
  per method, dataset and seed (1,710 in all, each a LeNet training run), beyond one machine:
  `--dry-run` prints them for a cluster. MCC's trade-off is chosen from a grid by the clean
  held-out `source_val` accuracy.
No target label chooses anything; the rule is `last` (no grid) and, with a grid, the grid
point with the best mean `eval/source_val/accuracy`.
"""

from xmodal_jax.data.corruptions import CORRUPTIONS, SEVERITIES
from xmodal_jax.tables import Column, Row, Table

DATASETS = {"MNIST": "digits_mnist", "Animals": "animal_silhouettes"}
PAIRS = [(c, s) for s in SEVERITIES for c in CORRUPTIONS]
SOURCE = "experiments/corruptions/source.py"
ADAPT = "experiments/corruptions/adapt.py"


def _keys(prefix: str, pairs) -> tuple[str, ...]:
    return tuple(f"eval/{prefix}{c}_{s}/accuracy" for c, s in pairs)


def _groups() -> dict[str, list[tuple[str, int]]]:
    """Column suffix -> the corruption-severity pairs it averages (shown ones first)."""
    out = {
        "sev. 3": [p for p in PAIRS if p[1] == 3],
        "sev. 5": [p for p in PAIRS if p[1] == 5],
        "all 95": PAIRS,
    }
    out |= {f"sev. {s}": [p for p in PAIRS if p[1] == s] for s in (1, 2, 4)}
    out |= {f"{c}_{s}": [(c, s)] for c, s in PAIRS}
    return out


GROUPS = _groups()
SHOWN = ("sev. 3", "sev. 5", "all 95")
COLUMNS = [
    Column(f"{d} {g}", _keys("", pairs), args=f"dataset={name}", csv_only=g not in SHOWN)
    for d, name in DATASETS.items()
    for g, pairs in GROUPS.items()
]


def _evaluator_row(label: str, prefix: str) -> Row:
    """A row read from the `source.py` runs' evaluators named `<prefix><corruption>_<sev>`."""
    metrics = {f"{d} {g}": _keys(prefix, pairs) for d in DATASETS for g, pairs in GROUPS.items()}
    return Row(label, SOURCE, metrics=metrics)


def _adapt_row(label: str, method: str, **kw) -> Row:
    """A row of one `adapt.py` run per corruption and severity, averaged per column."""
    sets = tuple(f"corruption={c},severity={s}" for c, s in PAIRS)
    column_args = {
        f"{d} {g}": tuple(f"corruption={c},severity={s}" for c, s in pairs)
        for d in DATASETS
        for g, pairs in GROUPS.items()
        if g != "all 95"
    }
    metrics = {col.label: "eval/target/accuracy" for col in COLUMNS}
    return Row(label, ADAPT, f"method={method}", metrics=metrics, average_over=sets,
               column_args=column_args, **kw)  # fmt: skip


TABLE = Table(
    title="Recognition under ImageNet-C corruptions: accuracy (%) on the corrupted test splits",
    rows=[
        _evaluator_row("source only", ""),
        _evaluator_row("AdaBN", "adabn_"),
        _evaluator_row("TENT", "tent_"),
        _adapt_row("DANN", "dann"),
        _adapt_row("CDAN+E", "cdan_e"),
        _adapt_row("MCC", "mcc", grid={"adaptation.weight": (0.3, 1.0, 3.0)}),
        _adapt_row("SHOT", "shot", needs={"source": "source only"}),
    ],
    columns=COLUMNS,
    seeds=(0, 1, 2),
    select="last",
    baseline="source only",  # each cell's difference to it, with its standard error
    select_metric="eval/source_val/accuracy",
    notes=(
        "The corruptions are ImageNet-C's (Hendrycks & Dietterich, ICLR 2019; corrupt-tta "
        "0.1.7) applied at the images' native 28x28 size with ImageNet-C's constants, so the "
        "spatial ones are relatively far stronger than on ImageNet-C: compare rows with each "
        "other, not with published ImageNet-C or MNIST-C figures."
    ),
)
