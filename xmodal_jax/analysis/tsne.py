"""t-SNE plot of source vs target features (a diagnostic, written as a PNG).

Van der Maaten & Hinton, "Visualizing Data using t-SNE", JMLR 2008 (scikit-learn's
``TSNE``). Well-aligned domains interleave in the plot; a source-only model usually shows two
separate clouds. Uses matplotlib's Agg canvas directly, so no display and no global backend
switch are needed.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


def tsne_embedding(
    features_s: Any, features_t: Any, *, seed: int = 0, perplexity: float = 30.0
) -> np.ndarray:
    """2-D t-SNE of the stacked [n_s + n_t, D] features (source rows first)."""
    from sklearn.manifold import TSNE  # here: a second of every trainer start otherwise
    from threadpoolctl import threadpool_limits

    xs = np.asarray(features_s, np.float64).reshape(len(features_s), -1)
    xt = np.asarray(features_t, np.float64).reshape(len(features_t), -1)
    if xs.shape[1] != xt.shape[1]:
        raise ValueError(f"source and target feature widths differ: {xs.shape} vs {xt.shape}.")
    x = np.concatenate([xs, xt])
    if len(x) < 5:
        raise ValueError(f"t-SNE needs at least 5 points in total, got {len(x)}.")
    # scikit-learn requires perplexity < n_samples.
    perplexity = min(perplexity, (len(x) - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    # One OpenMP thread: scikit-learn's idle OpenMP threads spin, and where the other cores are
    # busy (the trainer's own threads, a table's other jobs) that made the plot several times
    # slower than one thread; on idle cores one thread costs a few seconds. Scoped to this call:
    # the process's OpenMP runtime (PyTorch's too, in a notebook) keeps its settings.
    with threadpool_limits(1, user_api="openmp"):
        return tsne.fit_transform(x)


def plot_tsne(
    features_s: Any,
    features_t: Any,
    path: str,
    *,
    seed: int = 0,
    perplexity: float = 30.0,
    max_points: int = 2000,
    title: str | None = None,
) -> np.ndarray:
    """Write a t-SNE scatter (source blue, target red) to ``path`` (PNG); return the embedding.

    At most ``max_points`` per domain are used, chosen with ``seed``.
    """
    rng = np.random.default_rng(seed)
    xs, xt = np.asarray(features_s), np.asarray(features_t)
    if len(xs) > max_points:
        xs = xs[np.sort(rng.choice(len(xs), max_points, replace=False))]
    if len(xt) > max_points:
        xt = xt[np.sort(rng.choice(len(xt), max_points, replace=False))]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    emb = tsne_embedding(xs, xt, seed=seed, perplexity=perplexity)
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(*emb[: len(xs)].T, s=4, c="tab:blue", label="source")
    ax.scatter(*emb[len(xs) :].T, s=4, c="tab:red", label="target")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="best", markerscale=3)
    if title:
        ax.set_title(title)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png")
    return emb
