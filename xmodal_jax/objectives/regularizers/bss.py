"""BSS: Batch Spectral Shrinkage.

Chen et al., "Catastrophic Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for
Safe Transfer Learning", NeurIPS 2019: penalising the k smallest singular values of the batch
feature matrix suppresses the feature directions that carry little transferable signal.
``Omega = eta * sum_{i=1..k} sigma_{-i}^2`` for the [B, D] features (the paper uses k = 1,
eta = 0.001).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.regularizers.api import RegularizerInputs

Array = jax.Array

DEFAULTS = {"eta": 0.001, "k": 1}


def batch_spectral_shrinkage(features: Array, k: int = 1) -> Array:
    """Sum of the ``k`` smallest squared singular values of [B, D] ``features``."""
    if features.ndim != 2:
        raise ValueError(f"BSS needs [B, D] features, got shape {features.shape}; pool first.")
    if not 1 <= k <= min(features.shape):
        raise ValueError(f"k must be in [1, min(B, D)] = [1, {min(features.shape)}], got {k}.")
    s = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # descending
    return jnp.sum(jnp.square(s[-k:]))


def loss(inputs: RegularizerInputs, config: Mapping[str, Any] | None = None):
    """``eta * BSS(inputs.features)``; aux has the unweighted value."""
    cfg = resolve_config(config, DEFAULTS, "bss")
    require("bss", features=inputs.features)
    value = batch_spectral_shrinkage(inputs.features, int(cfg["k"]))
    return cfg["eta"] * value, {"bss": value}
