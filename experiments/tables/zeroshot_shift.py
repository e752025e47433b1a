"""Zero-shot recognition under corruptions, before and after cross-modal adaptation: the quick
start on `animal_silhouettes_c` at severity 3, averaged over the 19 corruptions.

    xmodal table experiments/tables/zeroshot_shift.py --root workdirs/tables --jobs 1 \
        --only "source only|ConSE"   # 3 runs (one per seed; ConSE reads the same runs)
    xmodal table experiments/tables/zeroshot_shift.py --root DIR --dry-run   # every run

The source-only and ConSE rows read one `experiments/animals/shift_source_only.py:corruptions=all`
run per seed: the quick start trained on clean images, then evaluated on the corrupted test split
of each of the 19 corruptions (seen, unseen, generalised zero-shot, the permuted-names control,
and ConSE, training-free, on the same images; evaluators suffixed by the corruption). The other
rows run once per corruption (`average_over` the 19), as they adapt to it:
`shift_adapt.py` (the quick start plus an adaptation term on the unlabelled corrupted
`train[:90%]` images of the seen classes: the inductive setting; AdaBN re-estimates the image
tower's statistics on them, one split's heads per run, so its row also averages the 5 splits),
and `shift_tent.py` (TENT on the image tower, online over each head's corrupted test images: the
test-time setting, its own rows: as published, and keeping the tower's running statistics; no
GZSL column, as its calibration assumes a fixed model; the image tower runs in its evaluation;
the compute line under the table gives the runs' time).
AdaBN assumes a source model whose BatchNorm statistics are its source domain's; the locked
tower's are ImageNet's. So two rows repeat source only and AdaBN with `source_bn=True` (one
split's heads per run): the tower's statistics re-estimated on the clean `train[:90%]` images
of the split's seen classes before the heads train (`config.model.image.statistics='source'`),
and AdaBN then swapping in the corrupted images' statistics: AdaBN as published.
Each adaptation trade-off is 1, not tuned (no target label may tune it); the rule is `last`.
The seen-class penalty of the GZSL column is chosen per run on labelled corrupted `train[90%:]`
images of seen classes (one scalar, the same rule for every row). Transductive variants
(`shift_adapt.py:transductive=True`) read unseen-class images and belong in a table of their
own. Per-corruption seen and unseen accuracies are in the CSV.
"""

from xmodal_jax import xla_defaults
from xmodal_jax.data.corruptions import CORRUPTIONS
from xmodal_jax.tables import Column, Row, Table

SEVERITY = 3
SETS = tuple(f"corruption={c},severity={SEVERITY}" for c in CORRUPTIONS)
SEEN, UNSEEN, CONTROL, GZSL = "seen", "unseen", "control (names permuted)", "GZSL harmonic mean"
SOURCE = "experiments/animals/shift_source_only.py"
ADAPT = "experiments/animals/shift_adapt.py"
TENT = "experiments/animals/shift_tent.py"
PER_CORRUPTION = {f"unseen {c}": f"corruption={c},severity={SEVERITY}" for c in CORRUPTIONS}
PER_CORRUPTION_SEEN = {f"seen {c}": f"corruption={c},severity={SEVERITY}" for c in CORRUPTIONS}
COLUMNS = [
    Column(SEEN, "eval/shift_seen/accuracy"),
    Column(UNSEEN, "eval/shift_unseen/accuracy"),
    Column(CONTROL, "eval/shift_unseen_control/accuracy", bold=False),
    Column(GZSL, "eval/shift_gzsl/harmonic_mean"),
    *(Column(label, "eval/shift_seen/accuracy", csv_only=True) for label in PER_CORRUPTION_SEEN),
    *(Column(label, "eval/shift_unseen/accuracy", csv_only=True) for label in PER_CORRUPTION),
]
PER_CORRUPTION_COLUMNS = [UNSEEN, *PER_CORRUPTION]
COLUMN_ARGS = PER_CORRUPTION_SEEN | PER_CORRUPTION


def _row(label: str, config: str, args: str = "", **kw) -> Row:
    return Row(label, config, args, average_over=SETS, column_args=COLUMN_ARGS, **kw)


def _evaluated(evaluator: str, metric: str) -> tuple[str, ...]:
    """`eval/<evaluator>_<corruption>/<metric>` of a `corruptions=all` run, per corruption."""
    return tuple(f"eval/{evaluator}_{c}/{metric}" for c in CORRUPTIONS)


def _source_row(label: str, shown: dict[str, tuple[str, str]], args: str = "", **kw) -> Row:
    """A row read from the evaluators of one `shift_source_only.py:corruptions=all` run per
    seed (and `args`): `shown` maps the table's shown columns to (evaluator, metric)."""
    metrics = {col: _evaluated(*m) for col, m in shown.items()}
    metrics |= dict(zip(PER_CORRUPTION, metrics[UNSEEN], strict=True))
    if SEEN in metrics:
        metrics |= dict(zip(PER_CORRUPTION_SEEN, metrics[SEEN], strict=True))
    return Row(
        label, SOURCE, ",".join(filter(None, ["corruptions=all", args])), metrics=metrics, **kw
    )


SHOWN = {
    SEEN: ("shift_seen", "accuracy"),
    UNSEEN: ("shift_unseen", "accuracy"),
    CONTROL: ("shift_unseen_control", "accuracy"),
    GZSL: ("shift_gzsl", "harmonic_mean"),
}
SPLITS = tuple(f"split={k}" for k in range(5))
SILHOUETTE_STATISTICS = "source_bn=True"  # the heads on features of the source's statistics


def _adabn(label: str, args: str = "") -> Row:
    """One split's heads per run (the image tower is shared): the 19 x 5 runs averaged."""
    sets = tuple(f"{s},{k}" for s in SETS for k in SPLITS)
    column_args = {label: tuple(f"{s},{k}" for k in SPLITS) for label, s in COLUMN_ARGS.items()}
    args = ",".join(filter(None, ["method=none,adabn=True", args]))
    return Row(label, ADAPT, args, average_over=sets, column_args=column_args)


TABLE = Table(
    title=f"Zero-shot under corruptions (animal_silhouettes_c, severity {SEVERITY}, mean of 19): "
    "accuracy (%)",
    rows=[
        _source_row("source only (quick start)", SHOWN),
        _source_row(
            "ConSE (training-free)",
            {UNSEEN: ("shift_conse", "accuracy")},
            columns=PER_CORRUPTION_COLUMNS,
        ),
        _adabn("AdaBN (inductive)"),
        _source_row(
            "source only, heads on silhouette statistics (quick start)",
            SHOWN,
            SILHOUETTE_STATISTICS,
            average_over=SPLITS,
        ),
        _adabn("AdaBN, heads on silhouette statistics (inductive)", SILHOUETTE_STATISTICS),
        *(
            _row(
                f"TENT{label} (test-time)",
                TENT,
                args,
                columns=[SEEN, UNSEEN, CONTROL, *PER_CORRUPTION_SEEN, *PER_CORRUPTION],
                metrics={
                    **{k: "eval/shift_seen_tent/accuracy" for k in [SEEN, *PER_CORRUPTION_SEEN]},
                    CONTROL: "eval/shift_unseen_control_tent/accuracy",
                    **{k: "eval/shift_unseen_tent/accuracy" for k in PER_CORRUPTION_COLUMNS},
                },
            )
            for label, args in (("", ""), (", source statistics", "statistics=source"))
        ),
        *(
            _row(f"{name} (inductive)", ADAPT, f"method={method}")
            for name, method in (
                ("entropy", "entropy"),
                ("MCC", "mcc"),
                ("information maximisation", "im"),
                ("DANN", "dann"),
                ("CDAN", "cdan"),
            )
        ),
    ],
    columns=COLUMNS,
    seeds=(0, 1, 2),
    select="last",
    baseline="source only (quick start)",  # each cell's difference to it, with its standard error
    # Its first runs had YNNPACK run the convolutions (XLA's default then, before
    # `xla_defaults`); the rest do too, so that the table rests on one software stack.
    env={"XLA_FLAGS": f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}"},
)
