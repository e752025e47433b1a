"""ConSE: zero-shot recognition by a convex combination of semantic embeddings (Norouzi et al.,
"Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014).

A classifier trained on source classes (here ImageNet-1k) gives p(y | x); an image is embedded
as the probability-weighted mean of the text embeddings s(y) of its top-T source classes,

    f(x) = 1/Z sum_{t=1..T} p(y_t | x) s(y_t),   Z = sum_{t=1..T} p(y_t | x)   (Eq. 1),

and assigned to the target class whose embedding is most cosine-similar to f(x). No training:
the classifier and the text encoder are used as they are.
"""

from __future__ import annotations

import numpy as np


def conse_embeddings(logits: np.ndarray, source_emb: np.ndarray, top_t: int) -> np.ndarray:
    """`[N, D]` ConSE embeddings of images with source-class `logits` [N, K], given the text
    embeddings of the K source classes `source_emb` [K, D] and the number of top classes T."""
    logits = np.asarray(logits, np.float64)
    if not 1 <= top_t <= logits.shape[1]:
        raise ValueError(f"top_t={top_t}: use 1..{logits.shape[1]} (the number of classes).")
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :top_t]
    weights = np.take_along_axis(probs, top, axis=1)
    weights /= weights.sum(axis=1, keepdims=True)
    return np.einsum("nt,ntd->nd", weights, np.asarray(source_emb, np.float64)[top])


def conse_predict(
    logits: np.ndarray, source_emb: np.ndarray, target_emb: np.ndarray, top_t: int
) -> np.ndarray:
    """Index (into `target_emb` [C, D]) of the target class nearest each image's ConSE
    embedding by cosine similarity."""
    f = conse_embeddings(logits, source_emb, top_t)
    f /= np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    t = np.asarray(target_emb, np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    return np.argmax(f @ t.T, axis=1)
