"""DANN: domain-adversarial training through a gradient reversal layer.

Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016. A discriminator
learns to tell source (label 1) from target (label 0) features by binary cross-entropy; the
features reach it through the gradient reversal layer, so the same loss pushes the feature
extractor towards domain-invariant features. The reversal strength follows
``grl.dann_coefficient(progress)``.

Trainer contract: ``loss(inputs, config)`` reads ``features_s``, ``features_t``, ``progress`` and
``discriminator`` (a ``DomainDiscriminator`` from ``make_discriminator(config)``, initialised on
``[1, discriminator_input_dim(...)]`` inputs, its params trained by the same optimiser step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from xmodal_jax.models.discriminator import DomainDiscriminator
from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs
from xmodal_jax.objectives.adaptation.grl import dann_coefficient, gradient_reversal

Array = jax.Array

DEFAULTS = {
    "weight": 1.0,  # trade-off multiplying the returned loss
    "gamma": 10.0,  # GRL schedule: lo + (hi - lo) * (2 / (1 + exp(-gamma p)) - 1)
    "lo": 0.0,
    "hi": 1.0,
    "hidden": (1024, 1024),  # discriminator hidden widths
    "dropout_rate": 0.0,  # discriminator dropout after each hidden layer
}


def make_discriminator(config: Mapping[str, Any] | None = None) -> DomainDiscriminator:
    """The discriminator a DANN / CDAN / importance config asks for."""
    hidden = (config or {}).get("hidden", DEFAULTS["hidden"])
    rate = (config or {}).get("dropout_rate", DEFAULTS["dropout_rate"])
    return DomainDiscriminator(hidden=tuple(int(h) for h in hidden), dropout_rate=float(rate))


def discriminator_input_dim(
    feature_dim: int, num_classes: int, config: Mapping[str, Any] | None = None
) -> int:
    """Width of the discriminator's input: the feature width."""
    del num_classes, config
    return feature_dim


def domain_logits(discriminator: Callable[[Array], Array], h: Array) -> Array:
    """Apply ``discriminator`` to [B, K] and return [B] float32 logits (checks the shape)."""
    d = discriminator(h)
    if d.ndim == 2 and d.shape[-1] == 1:
        d = d[:, 0]
    if d.shape != (h.shape[0],):
        raise ValueError(
            f"the domain discriminator must map [B, K] to [B] (or [B, 1]) logits; it returned "
            f"shape {d.shape} for input {h.shape}. Use DomainDiscriminator or end with Dense(1)."
        )
    return d.astype(jnp.float32)


def domain_bce(
    logits_s: Array,
    logits_t: Array,
    weights_s: Array | None = None,
    weights_t: Array | None = None,
) -> tuple[Array, Array]:
    """Balanced binary cross-entropy, source = 1 and target = 0, and discriminator accuracy.

    ``loss = (mean_s(w_s * bce_s) + mean_t(w_t * bce_t)) / 2`` (weights default to 1), so both
    domains count equally whatever their batch sizes; accuracy is averaged the same way.
    """
    bce_s = optax.sigmoid_binary_cross_entropy(logits_s, jnp.ones_like(logits_s))
    bce_t = optax.sigmoid_binary_cross_entropy(logits_t, jnp.zeros_like(logits_t))
    if weights_s is not None:
        bce_s = bce_s * weights_s
    if weights_t is not None:
        bce_t = bce_t * weights_t
    loss = 0.5 * (jnp.mean(bce_s) + jnp.mean(bce_t))
    acc = 0.5 * (jnp.mean(logits_s > 0) + jnp.mean(logits_t < 0))
    return loss, acc


def dann_loss(
    discriminator: Callable[[Array], Array], features_s: Array, features_t: Array, coeff: Any
) -> tuple[Array, Array]:
    """Domain BCE of ``discriminator`` on gradient-reversed features; returns (loss, accuracy).

    Gradients reach the discriminator unchanged and the features multiplied by ``-coeff``.
    """
    n_s = features_s.shape[0]
    h = gradient_reversal(jnp.concatenate([features_s, features_t], axis=0), coeff)
    d = domain_logits(discriminator, h)
    return domain_bce(d[:n_s], d[n_s:])


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """DANN loss for the train step: ``(weight * bce, aux)``; aux: loss, accuracy, GRL coeff."""
    cfg = resolve_config(config, DEFAULTS, "dann")
    require(
        "dann",
        features_s=inputs.features_s,
        features_t=inputs.features_t,
        discriminator=inputs.discriminator,
    )
    coeff = dann_coefficient(inputs.progress, cfg["gamma"], cfg["lo"], cfg["hi"])
    value, acc = dann_loss(inputs.discriminator, inputs.features_s, inputs.features_t, coeff)
    return cfg["weight"] * value, {"loss": value, "domain_accuracy": acc, "grl_coeff": coeff}
