"""Deep CORAL: align the second-order statistics of source and target features.

Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV Workshops
2016: ``loss = ||C_s - C_t||_F^2 / (4 d^2)`` with the unbiased covariances
``C = (X - mean)^T (X - mean) / (n - 1)`` of the [n, d] feature batches. That is what this
module computes, nothing more.

Note on thuml/Transfer-Learning-Library, ``tllib/alignment/coral.py``
(``CorrelationAlignmentLoss``): its docstring states the formula above, but its ``forward``
returns ``mean((C_s - C_t)^2) + mean((mu_s - mu_t)^2)``, i.e. ``||C_s - C_t||_F^2 / d^2`` (four
times the documented value) plus the mean squared difference of the feature means. Trade-offs
taken from its recipes are therefore not directly comparable with this loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs

Array = jax.Array

DEFAULTS = {"weight": 1.0}


def covariance(x: Array) -> Array:
    """Unbiased [d, d] covariance of the rows of [n, d] ``x`` (divides by n - 1)."""
    x = x.astype(jnp.float32)
    xc = x - jnp.mean(x, axis=0, keepdims=True)
    return xc.T @ xc / (x.shape[0] - 1)


def coral(features_s: Array, features_t: Array) -> Array:
    """``||C_s - C_t||_F^2 / (4 d^2)`` for [n_s, d] and [n_t, d] features."""
    if features_s.ndim != 2 or features_t.ndim != 2 or features_s.shape[1] != features_t.shape[1]:
        raise ValueError(
            f"CORAL needs [n_s, d] and [n_t, d] features of the same width d; got "
            f"{features_s.shape} and {features_t.shape}. Pool or flatten features first."
        )
    if features_s.shape[0] < 2 or features_t.shape[0] < 2:
        raise ValueError("CORAL needs at least 2 examples per domain for a covariance.")
    d = features_s.shape[1]
    diff = covariance(features_s) - covariance(features_t)
    return jnp.sum(diff * diff) / (4.0 * d * d)


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """CORAL loss for the train step on ``features_s`` / ``features_t``."""
    cfg = resolve_config(config, DEFAULTS, "coral")
    require("coral", features_s=inputs.features_s, features_t=inputs.features_t)
    value = coral(inputs.features_s, inputs.features_t)
    return cfg["weight"] * value, {"loss": value}
