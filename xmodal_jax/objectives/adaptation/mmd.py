"""MK-MMD (DAN): multi-kernel maximum mean discrepancy between source and target features.

Long et al., "Learning Transferable Features with Deep Adaptation Networks", ICML 2015 (DAN);
Gretton et al., "A Kernel Two-Sample Test", JMLR 2012 (the estimators).

Kernel: a sum of Gaussians ``k(a, b) = sum_u exp(-||a - b||^2 / (2 sigma_u^2))`` with
``sigma_u^2 = factor_u * m``, where ``m`` is the mean squared distance over distinct pairs of the
joint source+target batch (not back-propagated through by default) and the factors default to
{1/8, 1/4, 1/2, 1, 2}.

Estimators of MMD^2 (``estimator``):
* ``"linear"``: Gretton et al. (2012, Sec. 6) linear-time statistic as used by DAN: with equal
  batch sizes n, split into n // 2 quad-tuples ``(s_2i, s_2i+1, t_2i, t_2i+1)`` and average
  ``h = k(s_2i, s_2i+1) + k(t_2i, t_2i+1) - k(s_2i, t_2i+1) - k(s_2i+1, t_2i)``.
* ``"quadratic"``: the unbiased U-statistic (Gretton et al. 2012, Eq. 3),
  ``sum_{i!=j} k(s_i, s_j) / (n_s (n_s - 1)) + sum_{i!=j} k(t_i, t_j) / (n_t (n_t - 1))
  - 2 sum_{i,j} k(s_i, t_j) / (n_s n_t)``; batch sizes may differ.
Both are unbiased, so a batch estimate can be slightly negative when the domains match.

``kernel_mmd`` takes several layers and multiplies their kernels: JMMD (``jmmd.py``) reuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.adaptation.api import AdaptationInputs

Array = jax.Array

FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
ESTIMATORS = ("linear", "quadratic")

DEFAULTS = {
    "weight": 1.0,
    "factors": FACTORS,  # sigma_u^2 = factor_u * mean pairwise squared distance
    "estimator": "linear",  # "linear" (DAN) or "quadratic" (unbiased U-statistic)
    "detach_bandwidth": True,  # no gradient through the bandwidth rule
}


def mean_pairwise_sq_dist(z: Array) -> Array:
    """Mean of ``||z_i - z_j||^2`` over pairs i != j of the rows of [N, D] ``z``, in O(N D).

    Uses ``sum_{i,j} ||z_i - z_j||^2 = 2 N sum_i ||z_i - mean||^2``.
    """
    n = z.shape[0]
    zc = z - jnp.mean(z, axis=0, keepdims=True)
    return 2.0 * jnp.sum(zc * zc) / (n - 1)


def layer_bandwidths(
    z_s: Array,
    z_t: Array,
    factors: Sequence[float] = FACTORS,
    sigma: float | None = None,
    detach: bool = True,
) -> Array:
    """Kernel variances ``sigma_u^2`` for one layer: ``[sigma^2]`` if fixed, else the rule."""
    if sigma is not None:
        return jnp.asarray([float(sigma) ** 2], jnp.float32)
    base = mean_pairwise_sq_dist(jnp.concatenate([_flat(z_s), _flat(z_t)], axis=0))
    if detach:
        base = jax.lax.stop_gradient(base)
    return base * jnp.asarray(factors, jnp.float32)


def _flat(z: Array) -> Array:
    return jnp.reshape(z, (z.shape[0], -1)).astype(jnp.float32)


def _gaussians(d2: Array, sigma2s: Array) -> Array:
    """Sum over kernels of ``exp(-d2 / (2 sigma^2))``, elementwise in ``d2``."""
    return jnp.sum(jnp.exp(-d2[..., None] / (2.0 * sigma2s)), axis=-1)


def _sq_dist_matrix(z: Array) -> Array:
    z = z - jnp.mean(z, axis=0, keepdims=True)  # distances are shift invariant; less cancellation
    sq = jnp.sum(z * z, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)


def _quadratic_weights(n_s: int, n_t: int) -> np.ndarray:
    w = np.zeros((n_s + n_t, n_s + n_t), np.float32)
    w[:n_s, :n_s] = 1.0 / (n_s * (n_s - 1))
    w[n_s:, n_s:] = 1.0 / (n_t * (n_t - 1))
    w[:n_s, n_s:] = w[n_s:, :n_s] = -1.0 / (n_s * n_t)
    np.fill_diagonal(w, 0.0)
    return w


def check_layers(layers_s: Sequence[Array], layers_t: Sequence[Array]) -> tuple[int, int]:
    """Validate per-layer activations; return the source and target batch sizes."""
    if len(layers_s) != len(layers_t) or not layers_s:
        raise ValueError(
            f"give the same non-zero number of source and target layers; got "
            f"{len(layers_s)} and {len(layers_t)}."
        )
    n_s, n_t = layers_s[0].shape[0], layers_t[0].shape[0]
    for zs, zt in zip(layers_s, layers_t, strict=True):
        if zs.shape[0] != n_s or zt.shape[0] != n_t or zs.shape[1:] != zt.shape[1:]:
            raise ValueError(
                f"every layer needs [n_s={n_s}, ...] source and [n_t={n_t}, ...] target "
                f"activations of the same feature shape; got {zs.shape} and {zt.shape}."
            )
    return n_s, n_t


def kernel_mmd(
    layers_s: Sequence[Array],
    layers_t: Sequence[Array],
    sigma2s: Sequence[Array],
    estimator: str = "linear",
) -> Array:
    """MMD^2 with the joint kernel ``prod_l sum_u exp(-||a_l - b_l||^2 / (2 sigma2s[l][u]))``.

    ``layers_s[l]``: [n_s, ...] activations of layer l (flattened per example), same for
    ``layers_t``; ``sigma2s[l]``: [U_l] kernel variances of layer l.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    if len(sigma2s) != len(layers_s):
        raise ValueError(
            f"give one bandwidth set per layer, got {len(sigma2s)} for {len(layers_s)}."
        )
    n_s, n_t = check_layers(layers_s, layers_t)
    if estimator == "linear":
        if n_s != n_t or n_s < 2:
            raise ValueError(
                f"the linear MMD estimator needs equal source and target batch sizes >= 2, "
                f"got {n_s} and {n_t}; use equal batches or estimator='quadratic'."
            )
        m = n_s // 2
        k = 1.0
        for zs, zt, s2 in zip(layers_s, layers_t, sigma2s, strict=True):
            zs, zt = _flat(zs), _flat(zt)
            s0, s1 = zs[0 : 2 * m : 2], zs[1 : 2 * m : 2]
            t0, t1 = zt[0 : 2 * m : 2], zt[1 : 2 * m : 2]
            a = jnp.stack([s0, t0, s0, s1])  # [4, m, D]: pairs (ss, tt, st, st)
            b = jnp.stack([s1, t1, t1, t0])
            k = k * _gaussians(jnp.sum((a - b) ** 2, axis=-1), s2)
        return jnp.mean(k[0] + k[1] - k[2] - k[3])
    if n_s < 2 or n_t < 2:
        raise ValueError(
            f"the quadratic MMD estimator needs >= 2 examples per domain, got {n_s}, {n_t}."
        )
    k = 1.0
    for zs, zt, s2 in zip(layers_s, layers_t, sigma2s, strict=True):
        z = jnp.concatenate([_flat(zs), _flat(zt)], axis=0)
        k = k * _gaussians(_sq_dist_matrix(z), s2)
    return jnp.sum(k * _quadratic_weights(n_s, n_t))


def mk_mmd(
    z_s: Array,
    z_t: Array,
    *,
    factors: Sequence[float] = FACTORS,
    estimator: str = "linear",
    detach_bandwidth: bool = True,
) -> Array:
    """MK-MMD^2 between [n_s, ...] source and [n_t, ...] target activations (see module doc)."""
    check_layers([z_s], [z_t])
    s2 = layer_bandwidths(z_s, z_t, factors, detach=detach_bandwidth)
    return kernel_mmd([z_s], [z_t], [s2], estimator)


def loss(inputs: AdaptationInputs, config: Mapping[str, Any] | None = None):
    """DAN loss for the train step on ``features_s`` / ``features_t``: ``(weight * mmd, aux)``."""
    cfg = resolve_config(config, DEFAULTS, "mmd")
    require("mmd", features_s=inputs.features_s, features_t=inputs.features_t)
    value = mk_mmd(
        inputs.features_s,
        inputs.features_t,
        factors=tuple(cfg["factors"]),
        estimator=cfg["estimator"],
        detach_bandwidth=cfg["detach_bandwidth"],
    )
    return cfg["weight"] * value, {"loss": value}
