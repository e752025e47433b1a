"""Image<->text retrieval recall at k from a similarity matrix.

Several captions may belong to one image. Image->text: an image counts as retrieved at k when
any of its captions ranks in the top k. Text->image: a caption counts when its image ranks in
the top k. Ties are counted against the query (a negative scoring equal to the best positive
ranks above it), so a constant similarity matrix scores 0 and not 1.
"""

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def retrieval_ranks(
    similarity: ArrayLike, text_to_image: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """0-based ranks of the best match for every image [Ni] and every text [Nt].

    `similarity` is [Ni, Nt] (image rows, text columns); `text_to_image[j]` is the index of
    the image that caption j describes.
    """
    sim, t2i = np.asarray(similarity, np.float64), np.asarray(text_to_image)
    if sim.ndim != 2 or t2i.shape != (sim.shape[1],):
        raise ValueError(
            f"similarity must be [Ni, Nt] and text_to_image [Nt]; got {sim.shape} and {t2i.shape}."
        )
    n_img, n_txt = sim.shape
    if not np.issubdtype(t2i.dtype, np.integer) or t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(f"text_to_image must hold image indices in [0, {n_img}).")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity contains NaN or inf.")
    missing = np.setdiff1d(np.arange(n_img), t2i)
    if missing.size:
        raise ValueError(
            f"Images {missing[:10].tolist()} have no caption; drop them from the similarity "
            "matrix or add their captions."
        )
    positive = t2i[None, :] == np.arange(n_img)[:, None]
    best_pos = np.where(positive, sim, -np.inf).max(axis=1)
    i2t = np.sum((sim >= best_pos[:, None]) & ~positive, axis=1)
    own = sim[t2i, np.arange(n_txt)]
    t2i_rank = np.sum((sim >= own[None, :]) & ~positive, axis=0)
    return i2t, t2i_rank


def retrieval_metrics(
    similarity: ArrayLike, text_to_image: ArrayLike, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k (fractions in [0, 1]) as {'i2t_R@k': ..., 't2i_R@k': ...} for each k."""
    i2t, t2i = retrieval_ranks(similarity, text_to_image)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float(np.mean(i2t < k))
        out[f"t2i_R@{k}"] = float(np.mean(t2i < k))
    return out
