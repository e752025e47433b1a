"""SHOT: source-free adaptation by information maximisation and self-supervised pseudo-labels.

Liang et al., "Do We Really Need to Access the Source Data? Source Hypothesis Transfer for
Unsupervised Domain Adaptation", ICML 2020. The source classifier (the hypothesis) is frozen and
the feature extractor is trained on unlabelled target data only, with

- information maximisation (eq. 2-3): `L_ent + L_div`, the mean entropy of the predictions
  `delta(f(x))` minus the entropy of their mean `p_bar` (`L_div = sum_k p_bar_k log p_bar_k`),
  so each prediction is confident and the classes are used evenly (`information_maximization`);
- self-supervised pseudo-labels (eq. 4-6, `pseudo_labels`): class centroids of the features
  `g(x)` weighted by the predicted probabilities, `c_k = sum_x delta_k g(x) / sum_x delta_k`,
  each example labelled with the nearest centroid by cosine distance; then one refinement
  round: centroids of the examples so labelled, and the nearest of those. The loss adds
  `beta * CE(logits, pseudo-labels)` (`beta` 0.3 in the paper and in the official digits script,
  tim-learn/SHOT `digit/uda_digit.py`, `cls_par`).

Logs are natural logarithms of the probabilities computed from log-softmax (the official code
uses `log(p + 1e-5)`); cosine distance is `1 - a.b / (|a| |b|)`. The official `obtain_label`
also appends a constant 1 to every feature before the cosine distance; the paper's equations do
not, nor does this module. A class no example is assigned to in the first round has no
refined centroid and is never chosen in the second (the official code divides by `1e-8 +`
its empty count, giving a zero centroid; its `threshold` 0 excludes such classes likewise).
The train step (`xmodal_jax.tasks.source_free`) decides over which examples the centroids are
formed.
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

DEFAULTS = {"beta": 0.3, "im_weight": 1.0}
IM_DEFAULTS = {"weight": 1.0}


def information_maximization(logits: Array) -> tuple[Array, dict[str, Array]]:
    """`(L_ent + L_div, {'entropy': L_ent, 'diversity': H(p_bar)})` of [B, C] `logits`:
    mean prediction entropy minus the entropy of the mean prediction, in nats."""
    if logits.ndim != 2:
        raise ValueError(f"information maximisation needs [B, C] logits, got {logits.shape}.")
    logits = logits.astype(jnp.float32)
    ent = jnp.mean(prediction_entropy(logits))
    logp = jax.nn.log_softmax(logits, axis=-1)
    log_mean = jax.nn.logsumexp(logp, axis=0) - jnp.log(logits.shape[0])
    div = -jnp.sum(jnp.exp(log_mean) * log_mean)
    return ent - div, {"entropy": ent, "diversity": div}


def im_loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """Information maximisation on the target logits (``logits_t``) as a registered adaptation
    loss (``im``), beside a source loss: ``(weight * (L_ent - H(p_bar)), aux)``."""
    cfg = resolve_config(config, IM_DEFAULTS, "im")
    require("im", logits_t=inputs.logits_t)
    value, aux = information_maximization(inputs.logits_t)
    return cfg["weight"] * value, {"loss": value, **aux}


def cosine_distance(a: Array, b: Array, eps: float = 1e-12) -> Array:
    """[N, K] cosine distances `1 - cos` between the rows of [N, D] `a` and [K, D] `b`."""
    na = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
    nb = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
    return 1.0 - na @ nb.T


def pseudo_labels(features: Array, logits: Array) -> Array:
    """SHOT's pseudo-labels (eq. 4-6) of [N, D] `features` with [N, C] `logits`: nearest
    probability-weighted centroid, then nearest centroid of that labelling. No gradient."""
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    probs = jax.nn.softmax(jax.lax.stop_gradient(logits.astype(jnp.float32)), axis=-1)

    def nearest(weights: Array) -> Array:
        mass = jnp.sum(weights, axis=0)  # [C]
        centroids = (weights.T @ features) / jnp.maximum(mass, 1e-12)[:, None]
        dist = jnp.where(mass[None, :] > 0, cosine_distance(features, centroids), jnp.inf)
        return jnp.argmin(dist, axis=-1)

    first = nearest(probs)
    return nearest(jax.nn.one_hot(first, probs.shape[-1], dtype=jnp.float32))
