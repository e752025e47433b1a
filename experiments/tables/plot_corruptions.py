"""Accuracy against corruption severity, one line per method and a panel per dataset, from the
corruption table's CSV (`experiments/tables/corruptions.py`; `make tables` runs this).

    python experiments/tables/plot_corruptions.py experiments/tables/results/corruptions.csv

Writes `corruptions_severity.png` beside the CSV. A point is the mean over seeds of the mean
over the 19 corruptions of that severity (columns `<dataset> sev. <s>`), with the seeds' sample
std as an error bar; a method with no finished run of a severity has no point there.
"""

from __future__ import annotations

import csv
import os
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SEVERITIES = (1, 2, 3, 4, 5)


def series(path: str) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """dataset -> method -> [(severity, mean, std)] of the rows that have the figure."""
    out: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    with open(path) as f:
        for rec in csv.DictReader(f):
            dataset, _, group = rec["column"].partition(" ")
            if not group.startswith("sev. ") or not rec["mean"]:
                continue
            sev = int(group.removeprefix("sev. "))
            std = float(rec["std"]) if rec["std"] else 0.0
            out.setdefault(dataset, {}).setdefault(rec["row"], []).append(
                (sev, float(rec["mean"]), std)
            )
    return out


def plot(path: str) -> str:
    data = series(path)
    if not data:
        raise SystemExit(f"{path} has no severity columns with figures; run the table first.")
    fig = Figure(figsize=(5 * len(data), 4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (dataset, methods) in enumerate(sorted(data.items()), 1):
        ax = fig.add_subplot(1, len(data), i)
        for method, points in methods.items():
            sev, mean, std = zip(*sorted(points), strict=True)
            ax.errorbar(sev, mean, yerr=std, marker="o", capsize=3, label=method)
        ax.set(title=dataset, xlabel="severity", ylabel="accuracy (%)", xticks=SEVERITIES)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    out = os.path.join(os.path.dirname(os.path.abspath(path)), "corruptions_severity.png")
    fig.tight_layout()
    fig.savefig(out, format="png")
    return out


if __name__ == "__main__":
    print(
        "Wrote",
        plot(sys.argv[1] if len(sys.argv) > 1 else "experiments/tables/results/corruptions.csv"),
    )
