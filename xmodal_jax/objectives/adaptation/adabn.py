"""AdaBN: re-estimate BatchNorm statistics on the target domain.

Li et al., "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR Workshop 2017
(arXiv:1603.04779): domain knowledge sits in the BN statistics, so replacing every BN layer's
mean and variance by those of the target data adapts a source model without training.

``adapt_batch_norm`` runs the module over the given target batches and, for every
``nn.BatchNorm``, accumulates the exact mean and (biased, like Flax's batch variance) variance
of its input over all examples seen — a cumulative estimate, not an exponential moving average.
During the passes each BN layer normalises with the current batch's statistics, so later layers
see target-normalised inputs (as in training mode). Only ``batch_stats`` changes; ``params`` and
any other collection are returned untouched. Per-batch moments are combined on the host in
float64 (Chan et al.'s parallel update), so long runs lose no precision.

Limitations: masked BatchNorm, a BatchNorm module called more than once per forward pass, and
BatchNorm inside ``nn.scan`` / ``nn.vmap`` are not supported.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _feature_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = axis if isinstance(axis, tuple | list) else (axis,)
    return tuple(sorted(a % ndim for a in axes))


def _moments_fn(module: nn.Module, method: Any, apply_kwargs: dict):
    """A jittable ``(variables, batch) -> {path: (count, mean, m2)}`` over BatchNorm inputs."""

    def fn(variables, batch):
        found: dict[str, tuple[jax.Array, jax.Array, jax.Array]] = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if not (isinstance(mod, nn.BatchNorm) and context.method_name == "__call__"):
                return next_fun(*args, **kwargs)
            path = "/".join(mod.path)
            if kwargs.get("mask") is not None:
                raise ValueError(f"AdaBN does not support masked BatchNorm (layer {path!r}).")
            if path in found:
                raise ValueError(
                    f"BatchNorm {path!r} ran twice in one forward pass; AdaBN needs each BN "
                    "layer called once (no weight sharing, no nn.scan over BN layers)."
                )
            old = mod.get_variable("batch_stats", "mean")
            if old is None:
                raise ValueError(f"BatchNorm {path!r} has no batch_stats in the given variables.")
            x = args[0].astype(jnp.float32)
            feat = _feature_axes(x.ndim, mod.axis)
            red = tuple(i for i in range(x.ndim) if i not in feat)
            mean = jnp.mean(x, axis=red)
            m2 = jnp.sum((x - jnp.expand_dims(mean, red)) ** 2, axis=red)
            count = int(np.prod([x.shape[i] for i in red]))
            found[path] = (jnp.asarray(count, jnp.int32), mean, m2)
            # The layer normalises with this batch's statistics, whatever its mode.
            mod.put_variable("batch_stats", "mean", mean.astype(old.dtype))
            mod.put_variable("batch_stats", "var", (m2 / count).astype(old.dtype))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            module.apply(variables, batch, mutable=["batch_stats"], method=method, **apply_kwargs)
        return found

    return fn


def _set_path(tree: dict, path: list[str], leaf_values: dict) -> None:
    node = tree
    for key in path:
        if key not in node:
            raise ValueError(
                f"batch_stats has no entry {'/'.join(path)!r}; pass the module's own variables."
            )
        node[key] = dict(node[key])
        node = node[key]
    for name, value in leaf_values.items():
        node[name] = jnp.asarray(value, jnp.asarray(node[name]).dtype)


@functools.lru_cache(maxsize=16)
def _jitted_moments(module: nn.Module, method: Any, apply_kwargs: tuple) -> Any:
    """One jitted moments function per module, method and options: a run that re-estimates
    statistics many times (AdaBN at every evaluation, on every corruption) compiles it once
    per input shape."""
    return jax.jit(_moments_fn(module, method, dict(apply_kwargs)))


def adapt_batch_norm(
    module: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Any],
    *,
    method: Any = None,
    **apply_kwargs: Any,
) -> dict[str, Any]:
    """Variables whose ``batch_stats`` are the target statistics over ``batches``.

    Args:
      module: the Flax module (e.g. the whole classifier).
      variables: its variables, with ``params`` and ``batch_stats``.
      batches: iterable of target inputs; each is passed as the module's first positional
        argument (labels are not needed).
      method: optional module method to apply instead of ``__call__``.
      **apply_kwargs: passed to ``module.apply``, e.g. ``train=False`` (recommended: dropout
        off; the BN layers use batch statistics regardless).
    Returns:
      A new variables dict; ``params`` and other collections are the same objects as given.
    """
    if "batch_stats" not in variables:
        raise ValueError("variables have no 'batch_stats' collection: the module has no BatchNorm.")
    fn = _jitted_moments(module, method, tuple(sorted(apply_kwargs.items())))
    acc: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
    for batch in batches:
        for path, (count, mean, m2) in jax.device_get(fn(variables, batch)).items():
            nb, mb, m2b = float(count), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
            if path not in acc:
                acc[path] = (nb, mb, m2b)
                continue
            na, ma, m2a = acc[path]
            n = na + nb
            delta = mb - ma
            acc[path] = (n, ma + delta * nb / n, m2a + m2b + delta**2 * na * nb / n)
    if not acc:
        raise ValueError("no target batches were given, or the forward pass met no BatchNorm.")
    stats = jax.tree.map(lambda x: x, dict(variables["batch_stats"]))
    for path, (n, mean, m2) in acc.items():
        _set_path(stats, path.split("/") if path else [], {"mean": mean, "var": m2 / n})
    return {**variables, "batch_stats": stats}
