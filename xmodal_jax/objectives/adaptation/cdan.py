"""CDAN and CDAN+E: conditional domain-adversarial training.

Long et al., "Conditional Adversarial Domain Adaptation", NeurIPS 2018. The discriminator sees
the features ``f`` conditioned on the classifier's predictions ``g = softmax(logits)``:

* multilinear map ``T(f, g) = flatten(g f^T)`` ([B, C * F], index ``c * F + k``), or, when
  ``F * C`` exceeds ``max_multilinear_dim`` (auto; or forced by ``randomized``), the randomised
  map ``T(f, g) = (f R_f) * (g R_g) / sqrt(d)`` with fixed standard-normal ``R_f`` [F, d] and
  ``R_g`` [C, d] drawn from ``random_seed``. The defaults (4096, d = 1024) follow the paper.
* CDAN+E weights each example's BCE by ``1 + exp(-H(g))``, normalised to mean 1 within each
  domain, so confident predictions condition more (the per-domain normalisation of the
  authors' code, thuml/CDAN ``pytorch/loss.py``).

``g`` and the weights carry no gradient (the authors' code also sends a reversed gradient
through the entropy weights; thuml/Transfer-Learning-Library treats them as constants, as here);
the conditioned input passes the gradient reversal layer with the DANN schedule, and the BCE is
the balanced one of ``dann.domain_bce``.

Trainer contract as in ``dann.py``, plus ``logits_s`` / ``logits_t``; initialise the
discriminator on ``[1, discriminator_input_dim(feature_dim, num_classes, config)]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs
from xmodal_jax.objectives.adaptation.dann import domain_bce, domain_logits
from xmodal_jax.objectives.adaptation.dann import make_discriminator as make_discriminator
from xmodal_jax.objectives.adaptation.entropy import prediction_entropy
from xmodal_jax.objectives.adaptation.grl import dann_coefficient, gradient_reversal

Array = jax.Array

DEFAULTS = {
    "weight": 1.0,
    "gamma": 10.0,  # GRL schedule, as in dann.py
    "lo": 0.0,
    "hi": 1.0,
    "hidden": (1024, 1024),  # discriminator hidden widths
    "dropout_rate": 0.0,
    "entropy_conditioning": False,  # True: CDAN+E
    "randomized": None,  # None: auto (randomised iff F * C > max_multilinear_dim)
    "max_multilinear_dim": 4096,
    "randomized_dim": 1024,
    "random_seed": 0,  # seed of R_f, R_g
}


def use_randomized(
    feature_dim: int, num_classes: int, randomized: bool | None, max_multilinear_dim: int
) -> bool:
    """Whether the randomised map is used: ``randomized`` if given, else by the size rule."""
    if randomized is not None:
        return bool(randomized)
    return feature_dim * num_classes > max_multilinear_dim


def discriminator_input_dim(
    feature_dim: int, num_classes: int, config: Mapping[str, Any] | None = None
) -> int:
    """Width of the conditioned representation the discriminator receives."""
    cfg = resolve_config(config, DEFAULTS, "cdan")
    if use_randomized(feature_dim, num_classes, cfg["randomized"], cfg["max_multilinear_dim"]):
        return int(cfg["randomized_dim"])
    return feature_dim * num_classes


def multilinear_map(f: Array, g: Array) -> Array:
    """``flatten(g f^T)``: [B, F], [B, C] -> [B, C * F]."""
    return (g[:, :, None] * f[:, None, :]).reshape(f.shape[0], -1)


def random_matrices(feature_dim: int, num_classes: int, dim: int, seed: int = 0):
    """Fixed standard-normal ``R_f`` [F, dim] and ``R_g`` [C, dim] for the randomised map."""
    kf, kg = jax.random.split(jax.random.key(seed))
    return (
        jax.random.normal(kf, (feature_dim, dim), jnp.float32),
        jax.random.normal(kg, (num_classes, dim), jnp.float32),
    )


def randomized_multilinear_map(f: Array, g: Array, r_f: Array, r_g: Array) -> Array:
    """``(f R_f) * (g R_g) / sqrt(d)``: [B, F], [B, C] -> [B, d]."""
    return (f @ r_f) * (g @ r_g) / math.sqrt(r_f.shape[1])


def entropy_weights(logits: Array) -> Array:
    """``1 + exp(-H(softmax(logits)))`` per row of [B, C] logits, normalised to mean 1."""
    w = 1.0 + jnp.exp(-prediction_entropy(jax.lax.stop_gradient(logits)))
    return w / jnp.mean(w)


def cdan_loss(
    discriminator: Callable[[Array], Array],
    features_s: Array,
    features_t: Array,
    logits_s: Array,
    logits_t: Array,
    coeff: Any,
    *,
    entropy_conditioning: bool = False,
    randomized: bool | None = None,
    max_multilinear_dim: int = 4096,
    randomized_dim: int = 1024,
    random_seed: int = 0,
) -> tuple[Array, Array]:
    """Conditional domain BCE on gradient-reversed ``T(f, g)``; returns (loss, accuracy)."""
    if logits_s.shape[1] != logits_t.shape[1] or features_s.shape[1] != features_t.shape[1]:
        raise ValueError(
            f"source and target widths differ: features {features_s.shape} vs "
            f"{features_t.shape}, logits {logits_s.shape} vs {logits_t.shape}."
        )
    n_s = features_s.shape[0]
    feat_dim, num_classes = features_s.shape[1], logits_s.shape[1]
    f = jnp.concatenate([features_s, features_t], axis=0).astype(jnp.float32)
    logits = jnp.concatenate([logits_s, logits_t], axis=0).astype(jnp.float32)
    g = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
    if use_randomized(feat_dim, num_classes, randomized, max_multilinear_dim):
        r_f, r_g = random_matrices(feat_dim, num_classes, randomized_dim, random_seed)
        h = randomized_multilinear_map(f, g, r_f, r_g)
    else:
        h = multilinear_map(f, g)
    d = domain_logits(discriminator, gradient_reversal(h, coeff))
    w_s = w_t = None
    if entropy_conditioning:
        w_s, w_t = entropy_weights(logits[:n_s]), entropy_weights(logits[n_s:])
    return domain_bce(d[:n_s], d[n_s:], w_s, w_t)


def _loss(inputs: AdaptationInputs, cfg: dict, name: str):
    require(
        name,
        features_s=inputs.features_s,
        features_t=inputs.features_t,
        logits_s=inputs.logits_s,
        logits_t=inputs.logits_t,
        discriminator=inputs.discriminator,
    )
    coeff = dann_coefficient(inputs.progress, cfg["gamma"], cfg["lo"], cfg["hi"])
    value, acc = cdan_loss(
        inputs.discriminator,
        inputs.features_s,
        inputs.features_t,
        inputs.logits_s,
        inputs.logits_t,
        coeff,
        entropy_conditioning=cfg["entropy_conditioning"],
        randomized=cfg["randomized"],
        max_multilinear_dim=cfg["max_multilinear_dim"],
        randomized_dim=cfg["randomized_dim"],
        random_seed=cfg["random_seed"],
    )
    return cfg["weight"] * value, {"loss": value, "domain_accuracy": acc, "grl_coeff": coeff}


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """CDAN (CDAN+E if ``entropy_conditioning``) loss for the train step."""
    return _loss(inputs, resolve_config(config, DEFAULTS, "cdan"), "cdan")


def loss_e(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """CDAN+E: ``loss`` with ``entropy_conditioning`` defaulting to True."""
    defaults = {**DEFAULTS, "entropy_conditioning": True}
    return _loss(inputs, resolve_config(config, defaults, "cdan_e"), "cdan_e")
