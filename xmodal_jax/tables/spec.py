"""What a paper table is: rows (configs), columns (metrics), seeds, a grid, a selection rule.

A table definition is a Python file (`experiments/tables/NAME.py`) that sets `TABLE = Table(...)`;
`load(path)` reads it and checks it, so a typo fails before any job starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from xmodal_jax import config as config_lib
from xmodal_jax.errors import UserError

RULES = {
    "last": "last: the final evaluation (summary.json)",
    "source_val": "training-domain validation: the eval step with the best {metric}",
    "oracle": "oracle (uses target labels): the eval step with the best value of each column",
}


Metric = str | tuple[str, ...]


def metric_keys(metric: Metric) -> tuple[str, ...]:
    """The keys a column's metric reads: one, or several whose mean is the run's value."""
    return (metric,) if isinstance(metric, str) else tuple(metric)


def metric_text(metric: Metric) -> str:
    """How a legend names a metric: the key, or `mean of N (first, ..., last)`."""
    keys = metric_keys(metric)
    if len(keys) == 1:
        return keys[0]
    shown = ", ".join(keys) if len(keys) <= 3 else f"{keys[0]}, ..., {keys[-1]}"
    return f"mean of {len(keys)} ({shown})"


@dataclasses.dataclass(frozen=True)
class Column:
    """A metric of `summary.json` / `metrics.jsonl`; `args` are config arguments the column adds
    to every row (e.g. `direction=m2u`), so one config file can fill several columns;
    `bold=False` for a column where the best value means nothing (a control).

    `metric` may be a tuple of keys: a run's value is their mean (e.g. the accuracy over the
    19 corruptions of one severity, each its own evaluator), reported only when all are.
    `csv_only=True` keeps a column out of the Markdown and LaTeX tables and in the CSV (per-item
    figures too many to show, e.g. one column per corruption). `scale` and `digits` replace the
    table's for this column (e.g. a proxy A-distance, in [0, 2], beside accuracies in %)."""

    label: str
    metric: Metric
    args: str = ""
    higher_is_better: bool = True
    bold: bool = True
    csv_only: bool = False
    scale: float | None = None
    digits: int | None = None


@dataclasses.dataclass(frozen=True)
class Reference:
    """Published or independently measured numbers shown beside ours, in the table's units.

    `values` maps a column label to a mean or a (mean, std) pair; `source` says where they come
    from (a paper, or a repository and path)."""

    source: str
    values: Mapping[str, float | tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class Row:
    """One config (`path.py` plus its `args`), trained for every seed, grid point and column.

    `overrides` are `--config.key=value` settings of this row; `seeds` replaces the table's;
    `compete=False` keeps a row out of the best-in-column bolding (e.g. a target-label oracle);
    `columns` lists the column labels the row fills (default all; the others show 'n/a' and run
    nothing), for a config whose numbers do not mean what a column means; `metrics` maps a
    column label to the key this row reports it under, when it differs from the column's;
    `grid` replaces the table's grid for this row (a method's own trade-off values);
    `average_over` lists config-argument sets (e.g. `split=0` ... `split=4`) run for every seed,
    a seed's value being the mean over them (a config that trains one split per run, reported
    over all splits); `column_args` names, per column label, the argument set of
    `average_over` whose run alone fills that column (e.g. a split-0 column), or a tuple of them
    averaged instead of all (e.g. the corruptions of one severity); `needs` maps a
    config argument to the label of another row: each run gets that row's run of the same seed
    and arguments (and `average_over` set, if that row has them; else its one run serves all)
    as the argument's value (its workdir) and starts once it has finished (e.g. SHOT's
    `source=`, the source-only run it adapts).
    """

    label: str
    config: str
    args: str = ""
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: Reference | None = None
    seeds: Sequence[int] | None = None
    compete: bool = True
    columns: Sequence[str] | None = None
    metrics: Mapping[str, Metric] = dataclasses.field(default_factory=dict)
    grid: Mapping[str, Sequence[Any]] | None = None
    average_over: Sequence[str] = ()
    column_args: Mapping[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)
    needs: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def metric(self, column: Column) -> Metric:
        return self.metrics.get(column.label, column.metric)


@dataclasses.dataclass(frozen=True)
class Table:
    """A results table. `scale` multiplies metrics for display (100: percent).

    `grid` maps config keys to values tried (every combination, DomainBed-style); the selection
    rule picks one grid point per cell. `select_metric` is the training-domain validation metric
    (`eval/source/accuracy`): `source_val` needs it, and so does a grid under `last`. `baseline`
    names the row (e.g. source only) every other row's cells are compared with: the difference
    of means and its standard error are shown beside each cell. `env` sets environment variables
    for every run (replacing the caller's value), e.g. the XLA flags that keep one software
    stack across a table whose runs span several machines and days; it is not part of a job's
    key, and the runs' provenance records what they ran with.
    """

    title: str
    rows: Sequence[Row]
    columns: Sequence[Column]
    seeds: Sequence[int] = (0,)
    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    select: str = "last"
    select_metric: str | None = None
    scale: float = 100.0
    digits: int = 1
    notes: str = ""
    baseline: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def scale_of(self, column: Column) -> float:
        """What multiplies the column's metric for display: its own scale, else the table's."""
        return self.scale if column.scale is None else column.scale

    def digits_of(self, column: Column) -> int:
        return self.digits if column.digits is None else column.digits

    def seeds_of(self, row: Row) -> tuple[int, ...]:
        return tuple(row.seeds if row.seeds is not None else self.seeds)

    def fills(self, row: Row, column: Column) -> bool:
        return row.columns is None or column.label in row.columns

    def grid_of(self, row: Row) -> Mapping[str, Sequence[Any]]:
        """The grid this row is run over: its own, else the table's."""
        return self.grid if row.grid is None else row.grid

    def has_grid(self) -> bool:
        return any(self.grid_of(r) for r in self.rows)


def parse_args(text: str) -> dict[str, str]:
    """`"k=v,k2=v2"` as a dict of strings (the values are parsed by the config itself)."""
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"Config argument {item!r} is not key=value; write e.g. direction=m2u.")
        out[key.strip()] = value.strip()
    return out


def check(table: Table, path: str = "table") -> None:
    """Raises one UserError naming the first inconsistency of `table`."""
    if not table.rows or not table.columns:
        raise UserError(f"{path}: a table needs at least one row and one column.")
    for kind, labels in (
        ("row", [r.label for r in table.rows]),
        ("column", [c.label for c in table.columns]),
    ):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise UserError(f"{path}: {kind} labels {dup} appear twice; labels must be unique.")
    if all(c.csv_only for c in table.columns):
        raise UserError(f"{path}: every column is csv_only; show at least one in the table.")
    for col in table.columns:
        if not metric_keys(col.metric):
            raise UserError(f"{path}: column {col.label!r} reads no metric.")
        if not table.scale_of(col) > 0 or table.digits_of(col) < 0:
            raise UserError(
                f"{path}: column {col.label!r} has scale={table.scale_of(col)}, "
                f"digits={table.digits_of(col)}; use a scale > 0 and digits >= 0."
            )
    if table.select not in RULES:
        raise UserError(f"{path}: select={table.select!r}; use one of {sorted(RULES)}.")
    for name, value in table.env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not isinstance(value, str):
            raise UserError(
                f"{path}: env {name!r}={value!r}; give variable names (letters, digits, _) "
                "and string values."
            )
    if table.baseline is not None and table.baseline not in {r.label for r in table.rows}:
        raise UserError(f"{path}: baseline={table.baseline!r} is not a row label.")
    for row in table.rows:
        if not table.seeds_of(row):
            raise UserError(f"{path}: row {row.label!r} has no seeds.")
        labels = {c.label for c in table.columns}
        if row.columns is not None and not set(row.columns) <= labels:
            unknown = sorted(set(row.columns) - labels)
            raise UserError(f"{path}: row {row.label!r} lists unknown columns {unknown}.")
        if not set(row.metrics) <= labels:
            unknown = sorted(set(row.metrics) - labels)
            raise UserError(f"{path}: row {row.label!r} maps unknown columns {unknown}.")
        if not set(row.column_args) <= labels:
            unknown = sorted(set(row.column_args) - labels)
            raise UserError(
                f"{path}: row {row.label!r} gives arguments of unknown columns {unknown}."
            )
        named = {a for v in row.column_args.values() for a in ((v,) if isinstance(v, str) else v)}
        bad = sorted(named - set(row.average_over))
        if bad:
            raise UserError(
                f"{path}: row {row.label!r}: column_args {bad} are not among its average_over "
                f"{list(row.average_over)}."
            )
        if row.reference is not None:
            unknown = set(row.reference.values) - {c.label for c in table.columns}
            if unknown:
                raise UserError(
                    f"{path}: row {row.label!r} has references for {sorted(unknown)}, which are "
                    f"not column labels {[c.label for c in table.columns]}."
                )
        for col in table.columns:
            clash = set(parse_args(row.args)) & set(parse_args(col.args))
            for extra in row.average_over:
                clash |= set(parse_args(extra)) & (
                    set(parse_args(row.args)) | set(parse_args(col.args))
                )
            if clash:
                raise UserError(
                    f"{path}: row {row.label!r} and column {col.label!r} both set {sorted(clash)}."
                )
        _check_needs(table, row, path)
        clash = set(row.overrides) & set(table.grid_of(row))
        if clash:
            raise UserError(f"{path}: row {row.label!r} overrides grid keys {sorted(clash)}.")
    if any("seed" in table.grid_of(r) or "seed" in r.overrides for r in table.rows):
        raise UserError(f"{path}: set seeds with `seeds=`, not as a grid key or override.")


def _check_needs(table: Table, row: Row, path: str) -> None:
    """A row's `needs` names other rows that run once per seed and argument set it runs."""
    rows = {r.label: r for r in table.rows}
    for arg, label in row.needs.items():
        where = f"{path}: row {row.label!r} needs {arg}={label!r}"
        needed = rows.get(label)
        if needed is None or needed is row:
            raise UserError(f"{where}, which is not another row of the table.")
        if needed.needs:
            raise UserError(f"{where}, a row that needs another itself; chain one level only.")
        if table.grid_of(needed):
            raise UserError(f"{where}, which has a grid: which of its runs is meant is unclear.")
        if arg in parse_args(row.args) or arg in parse_args(needed.args):
            raise UserError(f"{where}, but {arg} is also set in the row's arguments.")
        if not set(table.seeds_of(row)) <= set(table.seeds_of(needed)):
            raise UserError(f"{where}, which does not run all of its seeds.")
        if needed.average_over and tuple(needed.average_over) != tuple(row.average_over):
            raise UserError(f"{where}, whose average_over differs from its own.")
        if any(table.fills(row, c) and not table.fills(needed, c) for c in table.columns):
            raise UserError(f"{where}, which does not fill every column it fills.")


def load(path: str) -> tuple[str, Table]:
    """Reads `TABLE` from a table file; returns (name, table), the name being the file stem."""
    if not os.path.isfile(path):
        raise UserError(f"Table file {path!r} does not exist; tables live in experiments/tables/.")
    name = os.path.splitext(os.path.basename(path))[0]
    module = config_lib.exec_file(path, "xmodal_table_")
    table = getattr(module, "TABLE", None)
    if not isinstance(table, Table):
        raise UserError(f"{path} defines no TABLE = xmodal_jax.tables.Table(...).")
    check(table, path)
    return name, table


def select_rule(table: Table, rule: str | None) -> tuple[str, str]:
    """The rule in force (the command line's, else the table's) and its description."""
    rule = rule or table.select
    if rule not in RULES:
        raise UserError(f"--select {rule}: use one of {sorted(RULES)}.")
    needs_metric = rule == "source_val" or (rule == "last" and table.has_grid())
    if needs_metric and not table.select_metric:
        raise UserError(
            f"Selection {rule!r} needs the table's select_metric (a training-domain validation "
            "metric such as 'eval/source/accuracy'); set it in the table file."
        )
    return rule, RULES[rule].format(metric=table.select_metric)
