"""Model selection within one run: which evaluation's numbers a table reports.

- `last`: the final evaluation (`summary.json`);
- `source_val` (training-domain validation): the eval step of `metrics.jsonl` with the best
  value of the table's `select_metric` (e.g. `eval/source/accuracy`; ties go to the earliest
  step), and every column read at that step;
- `oracle`: for each column the eval step with its best value: it looks at target labels, so
  it is an upper bound, and the table says so.

`score` is what a hyper-parameter grid is ranked by: the selection metric (`last`,
`source_val`) or the column itself (`oracle`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from xmodal_jax.errors import UserError


def eval_history(rows: Iterable[Mapping]) -> dict[int, dict[str, float]]:
    """Eval metrics by step: the `eval/...` keys of every row, rows of one step merged."""
    steps: dict[int, dict[str, float]] = {}
    for row in rows:
        evals = {k: v for k, v in row.items() if k.startswith("eval/")}
        if evals and "step" in row:
            steps.setdefault(int(row["step"]), {}).update(evals)
    return dict(sorted(steps.items()))


def _best_step(history: Mapping[int, Mapping], metric: str, higher: bool) -> int | None:
    best = None
    for step, values in history.items():  # ascending steps: ties keep the earliest
        v = values.get(metric)
        if v is None:
            continue
        if best is None or (v > history[best][metric] if higher else v < history[best][metric]):
            best = step
    return best


def selected(
    rule: str,
    summary: Mapping[str, float],
    history: Mapping[int, Mapping[str, float]],
    metrics: Sequence[tuple[str, bool]],
    select_metric: str | None = None,
) -> dict[str, tuple[float | None, float | None, int | None]]:
    """For each (metric, higher_is_better): (value, score, step) under `rule`; None where the run
    did not report the metric."""
    out: dict[str, tuple[float | None, float | None, int | None]] = {}
    if rule == "last":
        score = summary.get(select_metric) if select_metric else None
        for metric, _ in metrics:
            out[metric] = (summary.get(metric), score, summary.get("step"))
        return out
    if rule == "source_val":
        step = _best_step(history, select_metric, True)
        if step is None:
            found = sorted({k for v in history.values() for k in v})
            raise UserError(
                f"No evaluation in metrics.jsonl reports the selection metric {select_metric!r}; "
                f"the run logged {found[:12]}. Set the table's select_metric to one of them."
            )
        score = history[step][select_metric]
        for metric, _ in metrics:
            out[metric] = (history[step].get(metric), score, step)
        return out
    if rule == "oracle":
        for metric, higher in metrics:
            step = _best_step(history, metric, higher)
            value = None if step is None else history[step][metric]
            out[metric] = (value, value, step)
        return out
    raise UserError(f"Unknown selection rule {rule!r}; use last, source_val or oracle.")
