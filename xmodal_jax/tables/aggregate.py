"""Collects finished runs into table cells: mean ± std over seeds, with what is missing.

A cell is one row x one column. Every seed the table asks for is accounted for: finished and
reported, finished without the metric ('not reported'), or not finished ('missing': never run,
failed, still running, or stopped before the end). With a grid, the grid point with the best
mean selection score over its finished seeds fills the cell (DomainBed's protocol), and the cell
records which one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
from etils import epath

from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import records as records_lib
from xmodal_jax.tables import select
from xmodal_jax.tables.spec import Column, Row, Table, metric_keys
from xmodal_jax.train import metrics as metrics_lib


@dataclasses.dataclass
class Cell:
    expected: int  # seeds the table asks for (0: the row does not fill this column)
    hparams: dict[str, str] = dataclasses.field(default_factory=dict)  # selected grid point
    values: list[float] = dataclasses.field(default_factory=list)  # per reporting seed, unscaled
    seeds: list[int] = dataclasses.field(default_factory=list)  # the seeds of `values`
    steps: list[int | None] = dataclasses.field(default_factory=list)  # where each was read
    missing: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)  # (seed,
    # status, workdir) of runs not finished
    not_reported: list[int] = dataclasses.field(default_factory=list)  # finished, no metric
    points: int = 1  # grid points the cell was chosen from
    points_finished: int = 1  # of those, the ones whose every run finished or diverged
    points_diverged: int = 0  # of those, the ones with a diverged run (never chosen unless
    # their other seeds score best; a diverged run does not change when run again)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1) over seeds; NaN with fewer than two."""
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan


def difference(cell: Cell, base: Cell) -> tuple[float, float]:
    """(mean - base mean, its standard error sqrt(s²/n + s_b²/n_b)), the seeds of the two
    cells taken as independent samples; the error is NaN unless both have two seeds or more."""
    delta = cell.mean - base.mean
    if cell.n < 2 or base.n < 2:
        return delta, math.nan
    return delta, math.sqrt(cell.std**2 / cell.n + base.std**2 / base.n)


class _Runs:
    """Reads each finished workdir's summary and eval history once."""

    def __init__(self):
        self._cache: dict[str, tuple[dict, dict]] = {}

    def status(self, workdir: str) -> str:
        state = jobs_lib.status(workdir)
        if state != "diverged":
            return state
        marker = json.loads((epath.Path(workdir) / jobs_lib.DIVERGED).read_text())
        return records_lib.diverged_state(marker)

    def get(self, workdir: str) -> tuple[dict, dict]:
        if workdir not in self._cache:
            summary = json.loads((epath.Path(workdir) / "summary.json").read_text())
            history = select.eval_history(metrics_lib.read(workdir))
            self._cache[workdir] = (summary, history)
        return self._cache[workdir]


def _cell_for_point(
    jobs: list[jobs_lib.Job],
    workdirs: list[str],
    runs: _Runs,
    rule: str,
    metric: tuple[tuple[str, ...], bool],
    select_metric: str | None,
) -> tuple[Cell, list[float]]:
    """The cell of one grid point, and the selection scores of its finished seeds. A run's value
    is the mean of the column's metric keys (reported when all are). A seed with several runs
    (a row's `average_over`) counts when all of them finished and reported; its value and score
    are their means."""
    by_seed: dict[int, list[tuple[jobs_lib.Job, str]]] = {}
    for job, wd in zip(jobs, workdirs, strict=True):
        by_seed.setdefault(job.seed, []).append((job, wd))
    cell = Cell(expected=len(by_seed), hparams=dict(jobs[0].grid_point))
    scores = []
    for seed, seed_runs in by_seed.items():
        values, seed_scores, steps, finished = [], [], [], True
        for _, wd in seed_runs:
            state = runs.status(wd)
            if state != "done":
                cell.missing.append((seed, "not run" if state == "missing" else state, wd))
                finished = False
                continue
            summary, history = runs.get(wd)
            keys, higher = metric
            selected = select.selected(
                rule, summary, history, [(k, higher) for k in keys], select_metric
            )
            found = [selected[k][0] for k in keys]
            _, score, step = selected[keys[0]]
            values.append(None if None in found else float(np.mean(found)))
            seed_scores.append(score)
            steps.append(step)
        if not finished:
            continue
        if any(v is None for v in values):
            cell.not_reported.append(seed)
            continue
        cell.values.append(float(np.mean(values)))
        cell.seeds.append(seed)
        cell.steps.append(steps[0] if len(set(steps)) == 1 else None)
        if all(s is not None for s in seed_scores):
            scores.append(float(np.mean(seed_scores)))
    return cell, scores


def collect(
    table: Table, name: str, root: str, rule: str, runs: Any = None
) -> dict[tuple[str, str], Cell]:
    """Cells keyed by (row label, column label) from the workdirs under `root/name`, or from
    `runs` (`records.RecordRuns`: the same lookups answered by run records)."""
    runs = runs or _Runs()
    return {
        (row.label, col.label): _best_point(table, row, col, rule, root, name, runs)
        for row in table.rows
        for col in table.columns
    }


def _best_point(
    table: Table, row: Row, col: Column, rule: str, root: str, name: str, runs: Any
) -> Cell:
    if not table.fills(row, col):
        return Cell(expected=0)
    by_point: dict[tuple, list[jobs_lib.Job]] = {}
    only = row.column_args.get(col.label)
    only = (only,) if isinstance(only, str) else only
    for job in jobs_lib.row_jobs(table, row, col.args, only):
        by_point.setdefault(job.grid_point, []).append(job)
    best, best_score, unfinished, finished, points_diverged = None, None, [], 0, 0
    for point_jobs in by_point.values():
        workdirs = [j.workdir(root, name) for j in point_jobs]
        metric = (metric_keys(row.metric(col)), col.higher_is_better)
        cell, scores = _cell_for_point(
            point_jobs, workdirs, runs, rule, metric, table.select_metric
        )
        unfinished.append(cell.missing)
        diverged = [m for m in cell.missing if m[1].startswith("diverged")]
        finished += len(diverged) == len(cell.missing)
        points_diverged += bool(diverged)
        if best is None:
            best = cell
        if not scores:
            continue
        score = float(np.mean(scores))
        higher = col.higher_is_better if rule == "oracle" else True
        if best_score is None or (score > best_score if higher else score < best_score):
            best, best_score = cell, score
    # The runs a grid point still lacks are missing from the choice, whichever point it is.
    best.missing = [m for point in unfinished for m in point]
    best.points, best.points_finished = len(by_point), finished
    best.points_diverged = points_diverged
    return best
