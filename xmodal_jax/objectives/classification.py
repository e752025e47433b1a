"""Supervised classification loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_xent(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    *,
    label_smoothing: float = 0.0,
    weights: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Mean cross-entropy over integer labels; optional per-example weights (normalised)."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
    if weights is None:
        return per_example.mean()
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1e-12)
