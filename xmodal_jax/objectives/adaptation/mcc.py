"""MCC: Minimum Class Confusion on target predictions.

Jin et al., "Minimum Class Confusion for Versatile Domain Adaptation", ECCV 2020. With
temperature-scaled target probabilities ``Y = softmax(logits / T)`` ([B, C]) and example weights
``w_i = B (1 + e^{-H(Y_i)}) / sum_j (1 + e^{-H(Y_j)})`` (confident examples count more; no
gradient flows through the weights), the class correlation ``C = Y^T diag(w) Y`` is normalised
per row, ``C~_jk = C_jk / sum_k' C_jk'`` (the paper's category normalisation), and the loss is
the between-class confusion ``(sum_jk C~_jk - trace C~) / C``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs
from xmodal_jax.objectives.adaptation.entropy import prediction_entropy

Array = jax.Array

DEFAULTS = {"weight": 1.0, "temperature": 2.5}


def mcc(logits: Array, temperature: float = 2.5) -> Array:
    """Minimum-class-confusion loss of [B, C] target ``logits`` (see module doc)."""
    if logits.ndim != 2:
        raise ValueError(f"MCC needs [B, C] logits, got shape {logits.shape}.")
    b, c = logits.shape
    scaled = logits.astype(jnp.float32) / temperature
    probs = jax.nn.softmax(scaled, axis=-1)
    w = 1.0 + jnp.exp(-jax.lax.stop_gradient(prediction_entropy(scaled)))
    w = b * w / jnp.sum(w)
    conf = (probs * w[:, None]).T @ probs
    conf = conf / jnp.sum(conf, axis=1, keepdims=True)
    return (jnp.sum(conf) - jnp.trace(conf)) / c


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """MCC on the target logits (``logits_t``) for the train step."""
    cfg = resolve_config(config, DEFAULTS, "mcc")
    require("mcc", logits_t=inputs.logits_t)
    value = mcc(inputs.logits_t, cfg["temperature"])
    return cfg["weight"] * value, {"loss": value}
