"""Each cell of a table against its `baseline` row (e.g. source only): the difference of the
means, its standard error, and whether it is beyond two of them, per cell and per column."""

from __future__ import annotations

import math

from xmodal_jax.tables.aggregate import Cell, difference
from xmodal_jax.tables.spec import Column, Table


def versus(
    table: Table, row, col: Column, cells: dict[tuple[str, str], Cell]
) -> tuple[float, float, int] | None:
    """(difference to the baseline row's mean, its standard error, verdict) of a cell, unscaled;
    the verdict is 1 (better by more than 2 standard errors), -1 (worse by more) or 0. None for
    the baseline row itself, without a baseline, or where either cell has no number."""
    if table.baseline is None or row.label == table.baseline:
        return None
    cell, base = cells[row.label, col.label], cells[table.baseline, col.label]
    if not cell.n or not base.n:
        return None
    delta, se = difference(cell, base)
    signed = delta if col.higher_is_better else -delta
    if math.isnan(se) or abs(signed) <= 2 * se:
        return delta, se, 0
    return delta, se, 1 if signed > 0 else -1


ARROWS = {1: " ↑", -1: " ↓", 0: ""}


def versus_text(table: Table, col: Column, vs: tuple[float, float, int] | None) -> str:
    """`, Δ +9.2 ± 1.7 ↑` (↑ / ↓: better / worse than the baseline by more than 2 standard
    errors)."""
    if vs is None:
        return ""
    delta, se, verdict = vs
    scale, d = table.scale_of(col), table.digits_of(col)
    text = f", Δ {delta * scale:+.{d}f}"
    if not math.isnan(se):
        text += f" ± {se * scale:.{d}f}"
    return text + ARROWS[verdict]


def verdict_lines(table: Table, cells: dict[tuple[str, str], Cell]) -> list[str]:
    """Per shown column: the rows better / worse than the baseline by more than 2 standard
    errors and those within, judged only where every seed (and grid point) of the cell and of
    the baseline's cell has finished; the others are named as not judged yet."""
    if table.baseline is None:
        return []
    lines = []
    for col in (c for c in table.columns if not c.csv_only):
        base = cells[table.baseline, col.label]
        groups: dict[str, list[str]] = {"↑": [], "↓": [], "within 2 SE": [], "not judged": []}
        for row in table.rows:
            if row.label == table.baseline or not row.compete or not table.fills(row, col):
                continue
            cell = cells[row.label, col.label]
            vs = versus(table, row, col, cells)
            done = all(c.n == c.expected and c.points_finished == c.points for c in (cell, base))
            if vs is None or not done:
                groups["not judged"].append(row.label)
                continue
            groups[{1: "↑", -1: "↓", 0: "within 2 SE"}[vs[2]]].append(row.label)
        parts = [f"{k} {', '.join(v)}" for k, v in groups.items() if v]
        if parts:
            lines.append(f"- {col.label}: " + "; ".join(parts) + ".")
    if not lines:
        return []
    head = (
        f"Against {table.baseline} (↑ / ↓: better / worse by more than 2 standard errors; "
        "'not judged': a run of the cell or of its baseline has not finished):"
    )
    return [head, *lines]
