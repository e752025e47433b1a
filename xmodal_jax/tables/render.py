"""Writes collected cells as markdown, LaTeX (booktabs) and CSV.

Every format shows mean ± std over seeds with the number of seeds, the best value of each column
in bold (rows with `compete=False` excluded), reference numbers beside ours, the selection rule,
and every run that is missing: a missing run is marked, never dropped.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from xmodal_jax.tables.aggregate import Cell
from xmodal_jax.tables.baseline import verdict_lines, versus, versus_text
from xmodal_jax.tables.spec import Column, Reference, Table, metric_keys, metric_text

DASH = "—"


def number(cell: Cell, scale: float, digits: int) -> str | None:
    """`mean ± std` in display units; None when no seed reported the metric."""
    if not cell.n:
        return None
    text = f"{cell.mean * scale:.{digits}f}"
    if cell.n > 1:
        text += f" ± {cell.std * scale:.{digits}f}"
    return text


def _empty(cell: Cell, missing: str, dash: str) -> str:
    """A cell without a number: 'n/a' (the row does not fill it), missing runs, or not reported."""
    return "n/a" if not cell.expected else missing if cell.missing else dash


def count(cell: Cell) -> str:
    """`(3)` when every seed reported, `(2 of 3)` when some did not."""
    return f"({cell.n})" if cell.n == cell.expected else f"({cell.n} of {cell.expected})"


def best_rows(table: Table, cells: dict[tuple[str, str], Cell]) -> set[tuple[str, str]]:
    """(row, column) pairs holding the best displayed mean of their column (ties all bold)."""
    out = set()
    for col in (c for c in table.columns if c.bold and not c.csv_only):
        scale, digits = table.scale_of(col), table.digits_of(col)
        shown = {
            r.label: round(cells[r.label, col.label].mean * scale, digits)
            for r in table.rows
            if r.compete and cells[r.label, col.label].n
        }
        if shown:
            best = max(shown.values()) if col.higher_is_better else min(shown.values())
            out |= {(label, col.label) for label, v in shown.items() if v == best}
    return out


def reference_text(ref: Reference | None, column: str, digits: int) -> str | None:
    if ref is None or column not in ref.values:
        return None
    value = ref.values[column]
    if isinstance(value, tuple | list):
        return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
    return f"{value:.{digits}f}"


def _ref_columns(table: Table) -> set[str]:
    return {c for r in table.rows if r.reference for c in r.reference.values}


def _sources(table: Table) -> list[str]:
    return list(dict.fromkeys(r.reference.source for r in table.rows if r.reference))


def _header(table: Table) -> list[tuple[str, Column, bool]]:
    refs = _ref_columns(table)
    out = []
    for col in (c for c in table.columns if not c.csv_only):
        out.append((col.label, col, False))
        if col.label in refs:
            out.append(("ref.", col, True))
    return out


# A row with more unfinished runs than this is summarised in one line (a cluster-sized row
# would otherwise list thousands); `--dry-run` prints them all.
MAX_LISTED = 6


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _missing_lines(
    table: Table, cells: dict[tuple[str, str], Cell], walls: Mapping[str, float]
) -> tuple[int, list[str], str]:
    """How many runs have not finished or finished without a metric, the lines saying so (one
    per run, with the columns it leaves short when it does not fill every column of its row,
    or one per row when a row has more than `MAX_LISTED` of them), and the compute the runs
    still to run would take at their rows' median wall times (`walls`, seconds a run)."""
    runs: dict[str, tuple[str, int, str, list[str]]] = {}
    unreported: dict[str, list[str]] = {}
    for row in table.rows:
        for col in table.columns:
            cell = cells[row.label, col.label]
            for seed, state, wd in cell.missing:
                runs.setdefault(wd, (row.label, seed, state, []))[3].append(col.label)
            if cell.not_reported:
                seeds = ", ".join(map(str, cell.not_reported))
                unreported.setdefault(row.label, []).append(
                    f"{row.label} / {col.label}: seeds {seeds} finished without it"
                )
    shown = {c.label for c in table.columns if not c.csv_only}
    by_row: dict[str, list[str]] = {}
    states: dict[str, list[str]] = {}
    for wd, (label, seed, state, cols) in runs.items():
        row = next(r for r in table.rows if r.label == label)
        filled = [c.label for c in table.columns if table.fills(row, c)]
        named = [c for c in cols if c in shown]
        where = "" if cols == filled or not named else f" [{', '.join(named)}]"
        by_row.setdefault(label, []).append(f"{label}, seed {seed}: {state}{where} ({wd})")
        states.setdefault(label, []).append(state)
    lines, to_run, untimed = [], {}, []
    for label, listed in by_row.items():
        # a diverged run is its seed's result: never run again
        to_run[label] = sum(not s.startswith("diverged") for s in states[label])
        if to_run[label] and label not in walls:
            untimed.append(label)
        if len(listed) <= MAX_LISTED:
            lines += listed
            continue
        counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(states[label]).items()))
        line = f"{label}: {len(listed)} runs not finished ({counts}); --dry-run lists them"
        if to_run[label] and label in walls:
            est = to_run[label] * walls[label]
            line += f"; about {_hours(est)} at the row's median {walls[label]:.0f} s a run"
        lines.append(line)
    for label, listed in unreported.items():
        if len(listed) <= MAX_LISTED:
            lines += listed
        else:
            lines.append(f"{label}: {len(listed)} columns have seeds that finished without them")
    estimate = ""
    if any(to_run.values()) and walls:
        total = sum(n * walls[label] for label, n in to_run.items() if label in walls)
        if total:
            estimate = f"about {_hours(total)} of compute for the runs left, at their rows' "
            estimate += "median wall time a run"
            if untimed:
                estimate += f" ({', '.join(untimed)}: no timed run yet, not counted)"
    return len(runs) + sum(map(len, unreported.values())), lines, estimate


def _legend(table: Table, rule_text: str) -> list[str]:
    excluded = [r.label for r in table.rows if not r.compete]
    unit = " (x100)" if table.scale == 100 else "" if table.scale == 1 else f" (x{table.scale:g})"
    lines = [
        f"Model selection: {rule_text}.",
        f"Cells: mean ± sample std (ddof=1) over seeds{unit}, seeds in parentheses "
        "('2 of 3': a run is missing, listed below); bold: best in column"
        + (f" ({', '.join(excluded)} excluded, marked †)" if excluded else "")
        + f"; 'missing': no finished run; '{DASH}': not reported by the config; 'n/a': not "
        "applicable to the row.",
        "Columns: "
        + "; ".join(_column_text(table, c) for c in table.columns if not c.csv_only)
        + ".",
    ]
    if table.baseline:
        lines.append(
            f"Δ: difference to the {table.baseline} row's mean ± its standard error "
            "(sqrt(s²/n + s_b²/n_b), the seeds as independent samples); ↑ / ↓: better / worse "
            f"than {table.baseline} by more than 2 standard errors."
        )
    hidden = [c.label for c in table.columns if c.csv_only]
    if hidden:
        lines.append(f"The CSV also has {len(hidden)} columns: {', '.join(hidden)}.")
    shown = {c.label for c in table.columns if not c.csv_only}
    for row in table.rows:
        own = "; ".join(
            f"{label} = {metric_text(m)}" for label, m in row.metrics.items() if label in shown
        )
        if own:
            lines.append(f"Row {row.label}: {own}.")
    for row in table.rows:
        if row.average_over:
            own = "; ".join(
                f"{label} reads {a} only" if isinstance(a, str) else f"{label}: {_listed(a)}"
                for label, a in row.column_args.items()
                if label in shown
            )
            lines.append(
                f"Row {row.label}: a seed's value is the mean over the runs "
                f"{_listed(row.average_over)}" + (f" ({own})" if own else "") + "."
            )
    if table.grid:
        lines.append(
            f"Grid: {dict(table.grid)}; the selected point of each cell is in the CSV (a tie "
            "goes to the point listed first)."
        )
    for row in table.rows:
        if row.grid:
            lines.append(
                f"Row {row.label}: grid {dict(row.grid)}; the selected point is beside each cell "
                "(a tie goes to the point listed first)."
            )
    return lines


def _column_text(table: Table, col: Column) -> str:
    """`label = metric with args`, and its own unit and direction where they differ."""
    text = f"{col.label} = {metric_text(col.metric)}" + (f" with {col.args}" if col.args else "")
    own = []
    if table.scale_of(col) != table.scale:
        own.append(f"x{table.scale_of(col):g}, not x{table.scale:g}")
    if not col.higher_is_better:
        own.append("lower is better: ↑ marks a lower value")
    return text + (f" ({'; '.join(own)})" if own else "")


def _listed(items) -> str:
    """Up to 3 items in full, else `N: first, ..., last`."""
    items = list(items)
    return ", ".join(items) if len(items) <= 3 else f"{len(items)}: {items[0]}, ..., {items[-1]}"


def _chosen(row, cell: Cell) -> str:
    """The selected grid point of a row with a grid of its own, shown in its cells."""
    if not row.grid or not cell.hparams:
        return ""
    chosen = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in cell.hparams.items())
    if cell.points_finished < cell.points:  # the choice may change as the others finish
        chosen += f"; {cell.points_finished} of {cell.points} points finished"
    if cell.points_diverged:  # chosen from the others: a diverged run is its seed's outcome
        chosen += f"; {cell.points_diverged} of {cell.points} points diverged"
    return f" [{chosen}]"


def _row_label(row, tex: bool = False) -> str:
    label = tex_escape(row.label) if tex else row.label
    return label if row.compete else label + (r"$^\dagger$" if tex else " †")


def markdown(
    table: Table,
    cells: dict[tuple[str, str], Cell],
    rule: str,
    rule_text: str,
    runs: Sequence[str] = (),
    walls: Mapping[str, float] | None = None,
) -> str:
    """The table in Markdown; `runs`: lines on what its runs rest on (`records.describe`);
    `walls`: each row's median wall time a run (`records.median_walls`), for the estimate of
    the compute left."""
    bold, sources = best_rows(table, cells), _sources(table)
    header = _header(table)
    suffix = " (oracle selection)" if rule == "oracle" else ""
    out = [f"# {table.title}{suffix}", "", *_legend(table, rule_text), ""]
    out.append("| | " + " | ".join(h for h, _, _ in header) + " |")
    out.append("|---|" + "---|" * len(header))
    for row in table.rows:
        parts = []
        for _, col, is_ref in header:
            if is_ref:
                text = reference_text(row.reference, col.label, table.digits_of(col))
                mark = f" [{sources.index(row.reference.source) + 1}]" if text else ""
                parts.append(text + mark if text else DASH)
                continue
            cell = cells[row.label, col.label]
            text = number(cell, table.scale_of(col), table.digits_of(col))
            if text is None:
                parts.append(_empty(cell, f"missing {count(cell)}", DASH))
                continue
            if (row.label, col.label) in bold:
                text = f"**{text}**"
            vs = versus_text(table, col, versus(table, row, col, cells))
            parts.append(f"{text} {count(cell)}{_chosen(row, cell)}{vs}")
        out.append(f"| {_row_label(row)} | " + " | ".join(parts) + " |")
    verdicts = verdict_lines(table, cells)
    if verdicts:
        out += ["", *verdicts]
    if sources:
        out += ["", "References:", ""]
        out += [f"[{i}] {s}" for i, s in enumerate(sources, 1)]
    if table.notes:
        out += ["", table.notes.strip()]
    if runs:
        out += ["", "What the runs rest on (their records):", *(f"- {line}" for line in runs)]
    n, missing, estimate = _missing_lines(table, cells, walls or {})
    out += ["", f"Missing: {n or 'none'}" + (f"; {estimate}." if estimate else ".")]
    out += [f"- {line}" for line in missing]
    return "\n".join(out) + "\n"


def tex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("→", r"$\to$"), ("±", r"$\pm$"),
                 ("†", r"$^\dagger$"), ("—", "--"), ("Δ", r"$\Delta$"), ("↑", r"$\uparrow$"),
                 ("↓", r"$\downarrow$"), ("²", r"$^2$")):  # fmt: skip
        text = text.replace(a, b)
    return text


def latex(table: Table, cells: dict[tuple[str, str], Cell], rule: str, rule_text: str) -> str:
    bold, sources = best_rows(table, cells), _sources(table)
    header = _header(table)
    suffix = " (oracle selection)" if rule == "oracle" else ""
    caption = tex_escape(f"{table.title}{suffix}. " + " ".join(_legend(table, rule_text)))
    out = [
        "% booktabs table written by `xmodal table`; needs \\usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        r"\begin{tabular}{l" + "c" * len(header) + "}",
        r"\toprule",
        " & ".join(["", *(tex_escape(h) for h, _, _ in header)]) + r" \\",
        r"\midrule",
    ]
    for row in table.rows:
        parts = [_row_label(row, tex=True)]
        for _, col, is_ref in header:
            if is_ref:
                text = reference_text(row.reference, col.label, table.digits_of(col))
                if text is None:
                    parts.append("--")
                    continue
                mark = f"\\textsuperscript{{[{sources.index(row.reference.source) + 1}]}}"
                parts.append(tex_escape(text) + mark)
                continue
            cell = cells[row.label, col.label]
            text = number(cell, table.scale_of(col), table.digits_of(col))
            if text is None:
                parts.append(_empty(cell, rf"\textit{{missing}} {count(cell)}", "--"))
                continue
            text = tex_escape(text)
            if (row.label, col.label) in bold:
                text = rf"\textbf{{{text}}}"
            chosen = tex_escape(
                _chosen(row, cell) + versus_text(table, col, versus(table, row, col, cells))
            )
            parts.append(f"{text} {{\\scriptsize {count(cell)}{chosen}}}")
        out.append(" & ".join(parts) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if sources:
        refs = "; ".join(f"[{i}] {s}" for i, s in enumerate(sources, 1))
        out.append(rf"\par\smallskip{{\scriptsize References: {tex_escape(refs)}}}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


CSV_FIELDS = (
    "row", "column", "metric", "selection", "mean", "std", "n", "expected", "seeds",
    "missing_seeds", "not_reported_seeds", "steps", "hparams", "best", "ref_mean", "ref_std",
    "ref_source", "delta", "delta_se", "better_than_baseline", "worse_than_baseline",
)  # fmt: skip


def csv_text(table: Table, cells: dict[tuple[str, str], Cell], rule: str) -> str:
    """One line per cell; means, stds and references in display units (x `scale`)."""
    bold = best_rows(table, cells)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        for col in table.columns:
            cell = cells[row.label, col.label]
            ref = row.reference.values.get(col.label) if row.reference else None
            ref_mean, ref_std = ref if isinstance(ref, tuple | list) else (ref, None)
            vs, scale = versus(table, row, col, cells), table.scale_of(col)
            writer.writerow(
                {
                    "row": row.label,
                    "column": col.label,
                    "metric": " ".join(metric_keys(row.metric(col))),
                    "selection": rule,
                    "mean": _num(cell.mean * scale),
                    "std": _num(cell.std * scale),
                    "n": cell.n,
                    "expected": cell.expected,
                    "seeds": " ".join(map(str, cell.seeds)),
                    "missing_seeds": " ".join(f"{s}:{st}" for s, st, _ in cell.missing),
                    "not_reported_seeds": " ".join(map(str, cell.not_reported)),
                    "steps": " ".join(str(s) for s in cell.steps),
                    "hparams": " ".join(f"{k}={v}" for k, v in cell.hparams.items()),
                    "best": int((row.label, col.label) in bold),
                    "ref_mean": "" if ref_mean is None else ref_mean,
                    "ref_std": "" if ref_std is None else ref_std,
                    "ref_source": row.reference.source if ref is not None else "",
                    "delta": "" if vs is None else _num(vs[0] * scale),
                    "delta_se": "" if vs is None else _num(vs[1] * scale),
                    "better_than_baseline": "" if vs is None else int(vs[2] == 1),
                    "worse_than_baseline": "" if vs is None else int(vs[2] == -1),
                }
            )
    return buf.getvalue()


def _num(x: float) -> str:
    return "" if math.isnan(x) else repr(round(x, 6))
