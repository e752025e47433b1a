"""JMMD (JAN): MMD under a joint kernel over several layers' activations.

Long et al., "Deep Transfer Learning with Joint Adaptation Networks", ICML 2017. The joint
kernel is the product over layers of each layer's kernel; here the layers are the features and
the softmax predictions, so the joint distribution of (features, predictions) is aligned.

Each layer's kernel is a sum of Gaussians with variances ``factor_u * m_l`` (``m_l``: mean
pairwise squared distance of layer l over the joint batch, as in ``mmd.py``), or one Gaussian
of fixed ``sigma_l``. By default the softmax layer uses sigma = 0.92, the value of the JAN
recipe in thuml/Transfer-Learning-Library (examples/domain_adaptation/image_classification/
jan.py). Linear and quadratic estimators as in ``mmd.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs
from xmodal_jax.objectives.adaptation.mmd import (
    FACTORS,
    check_layers,
    kernel_mmd,
    layer_bandwidths,
)

Array = jax.Array

DEFAULTS = {
    "weight": 1.0,
    "factors": FACTORS,  # bandwidth-rule factors for the feature layer
    "softmax_sigma": 0.92,  # fixed kernel sigma for the softmax layer; None: bandwidth rule
    "estimator": "linear",  # "linear" or "quadratic"
    "detach_bandwidth": True,
}


def jmmd(
    layers_s: Sequence[Array],
    layers_t: Sequence[Array],
    *,
    factors: Sequence[float] = FACTORS,
    sigmas: Sequence[float | None] | None = None,
    estimator: str = "linear",
    detach_bandwidth: bool = True,
) -> Array:
    """JMMD^2 between per-layer source and target activations.

    ``sigmas[l]`` fixes layer l's kernel to one Gaussian of that sigma; None (or ``sigmas``
    None) uses the bandwidth rule with ``factors``.
    """
    check_layers(layers_s, layers_t)
    sigmas = [None] * len(layers_s) if sigmas is None else list(sigmas)
    if len(sigmas) != len(layers_s):
        raise ValueError(
            f"give one sigma (or None) per layer: {len(layers_s)} layers, {len(sigmas)} sigmas."
        )
    s2 = [
        layer_bandwidths(zs, zt, factors, sigma=sg, detach=detach_bandwidth)
        for zs, zt, sg in zip(layers_s, layers_t, sigmas, strict=True)
    ]
    return kernel_mmd(layers_s, layers_t, s2, estimator)


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """JAN loss on (features, softmax(logits)) of both domains: ``(weight * jmmd, aux)``."""
    cfg = resolve_config(config, DEFAULTS, "jmmd")
    require(
        "jmmd",
        features_s=inputs.features_s,
        features_t=inputs.features_t,
        logits_s=inputs.logits_s,
        logits_t=inputs.logits_t,
    )
    value = jmmd(
        [inputs.features_s, jax.nn.softmax(inputs.logits_s.astype("float32"), axis=-1)],
        [inputs.features_t, jax.nn.softmax(inputs.logits_t.astype("float32"), axis=-1)],
        factors=tuple(cfg["factors"]),
        sigmas=(None, cfg["softmax_sigma"]),
        estimator=cfg["estimator"],
        detach_bandwidth=cfg["detach_bandwidth"],
    )
    return cfg["weight"] * value, {"loss": value}
