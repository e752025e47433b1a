"""Plots written to `<workdir>/plots/`: training curves and confusion matrices.

The workdir may be remote (`gs://...`): figures are rendered in memory and written through
`etils.epath`.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from xmodal_jax.train import metrics


def figure(**kwargs) -> Any:
    """A matplotlib `Figure` on its own Agg canvas: no display, no global backend, nothing to
    close. matplotlib is imported here, on the first plot, not with the trainer (most of a
    second of every start otherwise)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: epath.PathLike) -> None:
    """Writes `fig` as a PNG to a local or remote `path`."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    metrics.write_bytes(path, buffer.getvalue())


# A legend of more series than this would not fit beside the panel (a run evaluating every
# corruption and severity has hundreds): the panel then shows the lines without one.
MAX_LEGEND = 12


def curves(rows: Sequence[dict], path: epath.PathLike) -> None:
    """One panel for `train/loss`, one for the evaluations' accuracies (top-1, few-shot;
    per-class series are left to TensorBoard)."""

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return np.asarray(pts).T if pts else None

    keys = sorted(
        {
            k
            for r in rows
            for k in r
            if k.startswith("eval/") and k.endswith("accuracy") and "class_accuracy" not in k
        }
    )
    fig = figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    loss = series("train/loss")
    if loss is not None:
        ax_loss.plot(*loss, label="train/loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    labelled = len(keys) <= MAX_LEGEND
    for k in keys:
        ax_acc.plot(*series(k), marker="o", label=k if labelled else None)
    title = "evaluations" if labelled else f"{len(keys)} evaluations (see summary.json)"
    ax_acc.set(xlabel="step", ylabel="accuracy", title=title, ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def confusion(
    matrix: np.ndarray, class_names: Sequence[str], title: str, path: epath.PathLike
) -> None:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    m = np.asarray(matrix, np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(class_names)
    fig = figure(figsize=(1.0 + 0.5 * n, 0.8 + 0.5 * n))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), class_names, fontsize=7)
    for i in range(n):
        for j in range(n):
            if m[i, j]:
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    _save(fig, path)


def write_all(workdir: epath.PathLike, rows: Sequence[dict], evaluators: dict) -> list[str]:
    """Curves, one confusion matrix per evaluator that has one, and each evaluator's own plots
    (`ev.plot(out_dir)`: zero-shot per-split bars, t-SNE of A-distance features); returns the
    paths."""
    out_dir = metrics.workdir_path(workdir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "curves.png"]
    curves(rows, paths[0])
    for name, ev in evaluators.items():
        if getattr(ev, "confusion", None) is not None:
            paths.append(out_dir / f"confusion_{name}.png")
            confusion(ev.confusion, ev.class_names, f"{name}: confusion", paths[-1])
        if callable(getattr(ev, "plot", None)):
            paths += _evaluator_plots(ev, out_dir)
    return [os.fspath(p) for p in paths]


def _evaluator_plots(ev, out_dir: epath.Path) -> list[epath.Path]:
    """`ev.plot` writes with local file calls: into a remote `out_dir` through a local
    temporary directory whose files are then copied over."""
    if not metrics.is_remote(out_dir):
        return [epath.Path(p) for p in ev.plot(os.fspath(out_dir))]
    local = tempfile.mkdtemp(prefix="xmodal_plots_")
    try:
        written = ev.plot(local)
        return [epath.Path(p).copy(out_dir / os.path.basename(p), overwrite=True) for p in written]
    finally:
        shutil.rmtree(local, ignore_errors=True)
