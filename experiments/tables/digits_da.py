"""Digits domain adaptation (MNIST <-> UCI optdigits): every method of experiments/digits/.

    xmodal table experiments/tables/digits_da.py --root workdirs/tables --jobs 2 \
        --records experiments/tables/results/digits_da.runs.jsonl

126 runs (12 configs without a grid and 3 with a 3-point grid, x 2 directions x seeds 0, 1, 2;
the compute line under the table gives their time); with `--records` the table resumes from the
committed records.
Target test accuracy at the final step (`last`); where a row has a grid (a method's trade-off),
the point with the best mean accuracy on the source's held-out validation split
(`eval/source_val/accuracy`, `train[90%:]` of the source) fills the cell: no target label and
no test split chooses anything. SHOT adapts the same seed's `source_only` run, source-free.
No reference column: published digit figures are on other datasets (MNIST<->USPS), given as
context in experiments/digits/README.md.
"""

from xmodal_jax import xla_defaults
from xmodal_jax.tables import Column, Row, Table

METHODS = (
    "source_only", "dann", "dan", "jan", "coral", "cdan", "cdan_e", "mcc", "entropy", "bnm",
    "importance", "adabn", "tent", "shot", "target_oracle",
)  # fmt: skip
GRIDS = {  # the trade-offs chosen by the source validation accuracy
    "mcc": {"adaptation.weight": (0.3, 1.0, 3.0)},
    "entropy": {"adaptation.weight": (0.1, 0.3, 1.0)},
    "importance": {"adaptation.clip_max": (2.0, 5.0, 10.0)},
}
NEEDS = {"shot": {"source": "source_only"}}  # SHOT adapts this row's run of the same seed
M2U, U2M = "MNIST→UCI", "UCI→MNIST"

# AdaBN's and TENT's source model is a LeNet with BatchNorm (the others have none): their runs
# also evaluate it unadapted (the same model in both, seed for seed), shown as its own row after
# theirs, so their gain over their own source model can be read beside the one over source_only.
BN_SOURCE = "source_only (BatchNorm LeNet: AdaBN's and TENT's source)"
BN_SOURCE_METRIC = "eval/target_no_adabn/accuracy"


def rows(columns: list[str]) -> list[Row]:
    """The digits rows, for a table with these column labels."""
    out = []
    for m in METHODS:
        out.append(
            Row(
                label=m,
                config=f"experiments/digits/{m}.py",
                compete=m != "target_oracle",  # trained on target labels: an upper bound
                grid=GRIDS.get(m),
                needs=NEEDS.get(m, {}),
            )
        )
        if m == "tent":  # reads the adabn row's runs (no run of its own)
            metrics = dict.fromkeys(columns, BN_SOURCE_METRIC)
            out.append(Row(BN_SOURCE, "experiments/digits/adabn.py", metrics=metrics))
    return out


TABLE = Table(
    title="Digits domain adaptation: target test accuracy (%)",
    rows=rows([M2U, U2M]),
    columns=[
        Column(M2U, "eval/target/accuracy", args="direction=m2u"),
        Column(U2M, "eval/target/accuracy", args="direction=u2m"),
    ],
    seeds=(0, 1, 2),
    select="last",
    baseline="source_only",  # each cell's difference to it, with its standard error
    select_metric="eval/source_val/accuracy",  # held out of source training
    # Its runs had YNNPACK run the convolutions (XLA's default then, before `xla_defaults`);
    # runs made later keep that stack.
    env={"XLA_FLAGS": f"{xla_defaults.NAME}=+{xla_defaults.CONVOLUTIONS}"},
)
