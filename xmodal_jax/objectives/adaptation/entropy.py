"""Entropy minimisation on target predictions.

Grandvalet & Bengio, "Semi-supervised Learning by Entropy Minimization", NeurIPS 2004: pushing
unlabelled (target) examples to confident predictions moves the decision boundary into
low-density regions. Loss: mean over the target batch of ``H(softmax(logits))`` in nats.
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


def prediction_entropy(logits: Array, axis: int = -1) -> Array:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``axis``, from log-probabilities."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=axis)
    return -jnp.sum(jnp.exp(logp) * logp, axis=axis)


def entropy_loss(logits: Array) -> Array:
    """Mean Shannon entropy of the softmax of [B, C] ``logits``."""
    return jnp.mean(prediction_entropy(logits))


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """Entropy of the target predictions (``logits_t``) for the train step."""
    cfg = resolve_config(config, DEFAULTS, "entropy")
    require("entropy", logits_t=inputs.logits_t)
    value = entropy_loss(inputs.logits_t)
    return cfg["weight"] * value, {"loss": value}
