"""Importance weighting of source examples by a domain classifier's density ratio.

Under covariate shift the target risk is the source risk weighted by ``p_t(x) / p_s(x)``
(Shimodaira, 2000). A probabilistic domain classifier trained on ``n_s`` source and ``n_t``
target examples gives ``p(t|x) / p(s|x) = (n_t p_t(x)) / (n_s p_s(x))`` (Bickel et al., ICML
2007), so ``w(x) = (n_s / n_t) p(t|x) / p(s|x) = (n_s / n_t) exp(-logit)`` with the package's
domain-logit convention ``logit = log p(source|x) / p(target|x)``. ``n_s / n_t`` is the class
ratio the classifier was trained with: 1 for the balanced loss of ``dann.domain_bce``.

Weights may be self-normalised to mean 1 over the batch and clipped at ``clip_max``, both of
which trade a little bias for much less variance. With self-normalisation the clip applies to the
normalised weights: ``w_i = min(clip_max, a * raw_i)`` with ``a`` chosen so the mean is 1. When
the domains are nearly separable every raw source weight is tiny, a clip on the raw scale never
acts, and normalisation alone hands most of a batch's weight to one or two examples.

``loss(inputs, config)`` replaces the plain source cross-entropy: it returns the weighted source
cross-entropy plus the BCE that trains the domain classifier on stop-gradient features (the
classifier learns the ratio; it does not shape the features).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xmodal_jax.errors import UserError
from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs
from xmodal_jax.objectives.adaptation.dann import domain_bce, domain_logits

Array = jax.Array

DEFAULTS = {
    "weight": 1.0,  # multiplies the weighted cross-entropy
    "discriminator_weight": 1.0,  # multiplies the domain classifier's BCE
    "clip_max": 10.0,  # None: no clipping
    "self_normalize": True,
    "hidden": (1024, 1024),  # domain classifier widths (dann.make_discriminator)
    "dropout_rate": 0.0,
}


def importance_weights(
    domain_logits: Array,
    *,
    n_source: float = 1.0,
    n_target: float = 1.0,
    clip_max: float | None = None,
    self_normalize: bool = False,
) -> Array:
    """``w = (n_s / n_t) exp(-logit)`` per example, clipped at ``clip_max``; with
    ``self_normalize``, ``min(clip_max, a * w)`` with ``a`` such that the mean is 1.

    ``domain_logits``: [B] ``log p(source|x) / p(target|x)`` of the source examples. Computed
    in log space so extreme logits cannot overflow. No gradient flows to the classifier.
    """
    logits = jax.lax.stop_gradient(jnp.asarray(domain_logits, jnp.float32))
    log_w = math.log(n_source / n_target) - logits
    if not self_normalize:
        return jnp.exp(log_w if clip_max is None else jnp.minimum(log_w, math.log(clip_max)))
    if clip_max is None:
        return log_w.shape[0] * jax.nn.softmax(log_w)  # mean 1, in log space: no overflow
    if clip_max < 1:
        raise UserError(
            f"config.adaptation.clip_max={clip_max} cannot bound weights whose mean is 1: "
            "use a value >= 1 (default 10) or None."
        )
    return _capped_mean_one(log_w, clip_max)


def _capped_mean_one(log_w: Array, cap: float) -> Array:
    """``min(cap, a * exp(log_w))`` with the ``a`` that makes the mean 1 (water-filling: with the
    weights sorted, the largest ``k`` sit at the cap and the rest share what is left)."""
    n = log_w.shape[0]
    log_u = jax.nn.log_softmax(log_w)
    s = jnp.sort(log_u)[::-1]
    log_tail = jax.lax.cumlogsumexp(s, reverse=True)  # log of sum_{i >= k} u_(i)
    left = 1.0 - jnp.arange(n) * cap / n  # probability mass left when k weights are capped
    log_a = jnp.log(jnp.maximum(left, 1e-30)) - log_tail
    fits = (left > 0) & (log_a + s <= math.log(cap / n) + 1e-6)
    k = jnp.argmax(fits)  # the fewest capped weights for which the largest free one fits
    return jnp.minimum(cap, n * jnp.exp(log_a[k] + log_u))


def weighted_cross_entropy(logits: Array, labels: Array, weights: Array) -> Array:
    """``mean_i(w_i * CE(logits_i, labels_i))`` for [B, C] logits and [B] integer labels."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return jnp.mean(jax.lax.stop_gradient(weights) * ce)


def discriminator_input_dim(
    feature_dim: int, num_classes: int, config: Mapping[str, Any] | None = None
) -> int:
    """The domain classifier reads the features."""
    del num_classes, config
    return feature_dim


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """Weighted source CE + domain-classifier BCE; the train step drops its plain source CE."""
    cfg = resolve_config(config, DEFAULTS, "importance")
    require(
        "importance",
        features_s=inputs.features_s,
        features_t=inputs.features_t,
        logits_s=inputs.logits_s,
        labels_s=inputs.labels_s,
        discriminator=inputs.discriminator,
    )
    n_s = inputs.features_s.shape[0]
    h = jax.lax.stop_gradient(jnp.concatenate([inputs.features_s, inputs.features_t], axis=0))
    d = domain_logits(inputs.discriminator, h)
    bce, acc = domain_bce(d[:n_s], d[n_s:])
    w = importance_weights(d[:n_s], clip_max=cfg["clip_max"], self_normalize=cfg["self_normalize"])
    ce = weighted_cross_entropy(inputs.logits_s, inputs.labels_s, w)
    total = cfg["weight"] * ce + cfg["discriminator_weight"] * bce
    aux = {
        "loss": ce,
        "domain_loss": bce,
        "domain_accuracy": acc,
        "weight_mean": jnp.mean(w),
        "weight_max": jnp.max(w),
    }
    return total, aux
