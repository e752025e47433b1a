"""TENT: test-time entropy minimisation of the normalisation layers' affine parameters.

Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021. A source
model is adapted online, batch after batch of the test stream, by one gradient step per batch on
the mean Shannon entropy of its predictions (`entropy_loss`). Only the scale and bias of the
BatchNorm layers train; every BatchNorm normalises with the statistics of the current batch
(running statistics are neither used nor updated). A batch's predictions are the outputs of the
forward pass that computes that batch's loss, before its update, as `forward_and_adapt` in the
official code (repo DequanWang/tent, `tent.py`).

Here, as functions of any Flax module:

- `apply_with_batch_stats(module, variables, x, norm_params)`: the forward pass with every
  `nn.BatchNorm` normalising with the statistics of the current batch: called in eval mode
  (`train=False`, so dropout is off), an `nn.intercept_methods` interceptor replaces each BN's
  mean and (biased) variance by those of its input over the rows where the example `mask` is set
  (padding rows of a partial batch do not count), before that BN normalises, so gradients flow
  through the statistics as in PyTorch's train-mode BN. It returns the outputs and
  `norm_params`, the BN affine parameters in use. BN layers are found by module type, as the
  official `collect_params` selects `nn.BatchNorm2d` modules: the interceptor records the path
  of every `nn.BatchNorm` called, and `norm_params` is `{'/'.join(path): {'scale', 'bias'}}`
  taken from `params` at those paths. Passing `norm_params` back substitutes them, so
  `jax.grad` with respect to them is the TENT gradient, and nothing else of `variables` can
  change.
- `optimizer(opts)`: the official optimisers (`conf.py`): Adam (default; lr 1e-3, betas
  (0.9, 0.999)) or SGD with momentum 0.9, no dampening, Nesterov; no weight decay.

The evaluator `tent_classification` (`xmodal_jax.evaluators.adaptation`) runs the online loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xmodal_jax.objectives.adaptation.entropy import prediction_entropy

Array = jax.Array

# The official defaults (DequanWang/tent, conf.py: OPTIM.METHOD 'Adam', LR 1e-3, BETA 0.9,
# MOMENTUM 0.9, DAMPENING 0, NESTEROV True, WD 0, STEPS 1; MODEL.EPISODIC False).
DEFAULTS = {
    "optimizer": "adam",
    "lr": 1e-3,
    "beta": 0.9,
    "momentum": 0.9,
    "steps": 1,
    "episodic": False,
}
OPTIMIZERS = ("adam", "sgd")


def entropy_loss(logits: Array, mask: Array | None = None) -> Array:
    """Mean Shannon entropy (nats) of `softmax(logits)` over the rows of [B, C] `logits`, or over
    the rows where `mask` ([B], bool) is set."""
    h = prediction_entropy(logits)
    if mask is None:
        return jnp.mean(h)
    m = mask.astype(h.dtype)
    return jnp.sum(h * m) / jnp.maximum(jnp.sum(m), 1.0)


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A copy of nested dict `tree` with `value` at `path` (only the dicts on the way copied)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def apply_with_batch_stats(
    module: nn.Module,
    variables: Mapping[str, Any],
    x: Any,
    norm_params: Mapping[str, Any] | None = None,
    mask: Array | None = None,
    batch_statistics: bool = True,
    **apply_kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """`(outputs, norm_params)` of `module` on `x`, every BatchNorm normalising with the batch
    statistics of the rows where `mask` ([B], default all) is set (`batch_statistics=False`:
    with its running statistics, as loaded; only the affine parameters are then substituted).

    `norm_params` (`{path: {'scale', 'bias'}}`, as returned) replaces those BN parameters of
    `variables['params']`; None uses the given ones. `apply_kwargs` go to `module.apply` (e.g.
    `train=False`: dropout off). Raises ValueError when the module has no BatchNorm.
    """
    params = variables["params"]
    if norm_params is not None:
        for path, leaves in norm_params.items():
            key = tuple(path.split("/"))
            params = _set(params, key, {**_get(params, key), **leaves})
    found: list[tuple[str, ...]] = []

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if not (isinstance(mod, nn.BatchNorm) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        found.append(tuple(mod.path))
        if not batch_statistics:
            return next_fun(*args, **kwargs)
        h = args[0].astype(jnp.float32)
        feat = {a % h.ndim for a in (mod.axis if isinstance(mod.axis, tuple) else (mod.axis,))}
        red = tuple(i for i in range(h.ndim) if i not in feat)
        w = jnp.ones(h.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
        w = jnp.broadcast_to(w.reshape((-1,) + (1,) * (h.ndim - 1)), h.shape)
        count = jnp.maximum(jnp.sum(w, axis=red), 1.0)
        mean = jnp.sum(h * w, axis=red) / count
        var = jnp.sum(w * (h - jnp.expand_dims(mean, red)) ** 2, axis=red) / count
        old = mod.get_variable("batch_stats", "mean")
        mod.put_variable("batch_stats", "mean", mean.astype(old.dtype))
        mod.put_variable("batch_stats", "var", var.astype(old.dtype))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        # batch_stats is mutable only so that the interceptor can hand each BatchNorm the
        # batch's statistics; the updated collection is dropped (TENT keeps no statistics).
        out, _ = module.apply(
            {**variables, "params": params}, x, mutable=["batch_stats"], **apply_kwargs
        )
    if not found:
        raise ValueError("the model has no BatchNorm layer, and TENT adapts BatchNorm layers.")
    used = {}
    for path in found:
        leaves = _get(params, path)
        used["/".join(path)] = {k: leaves[k] for k in ("scale", "bias") if k in leaves}
    return out, used


def optimizer(opts: Mapping[str, Any]) -> optax.GradientTransformation:
    """The TENT optimiser of `opts` (`DEFAULTS` keys `optimizer`, `lr`, `beta`, `momentum`)."""
    name = opts["optimizer"]
    if name == "adam":
        return optax.adam(opts["lr"], b1=opts["beta"], b2=0.999, eps=1e-8)
    if name == "sgd":
        return optax.sgd(opts["lr"], momentum=opts["momentum"], nesterov=True)
    raise ValueError(f"TENT optimizer={name!r}: use one of {OPTIMIZERS}.")
