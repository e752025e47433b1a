"""DELTA: keep the fine-tuned model's feature maps close to the pretrained model's.

Li et al., "DELTA: DEep Learning Transfer using Feature Map with Attention for Convolutional
Networks", ICLR 2019. For selected layers l with C_l channels (channels last, as in Flax):

``Omega = 1/2 sum_l mean_b sum_j a_lj * mean_spatial (FM_lj(w, x_b) - FM_lj(w0, x_b))^2``

with ``a_lj = 1`` (plain feature-map distance) or ``a_lj = C_l * W_lj`` (attention, so uniform
attention 1/C reproduces the plain distance). Averaging over the batch and the spatial positions
keeps the coefficient independent of batch size and resolution; the recipe in
thuml/Transfer-Learning-Library (``tllib/regularization/delta.py``) sums over the batch instead,
so its trade-offs correspond to ``weight / batch_size`` here.

Channel attention (the paper's supervised attention): ``W_lj`` is the softmax over channels of
the standardised increase of the pretrained model's loss when filter j of layer l is zeroed,
divided by a temperature (5, the value of the TLlib recipe). ``channel_loss_increase`` measures
the increase on one batch (average it over batches); ``channel_attention`` turns it into W.
Precomputed attention can be passed directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.regularizers.api import RegularizerInputs
from xmodal_jax.tree_paths import flatten_with_paths, map_with_paths

Array = jax.Array
PyTree = Any

DEFAULTS = {
    "weight": 0.01,  # coefficient of Omega
    "use_attention": False,  # True: weight channels by inputs.channel_attention
}


def feature_map_distance(
    feature_maps: Mapping[str, Array],
    pretrained_feature_maps: Mapping[str, Array],
    attention: Mapping[str, Array] | None = None,
) -> Array:
    """DELTA's Omega (see module doc); the pretrained maps receive no gradient."""
    if set(feature_maps) != set(pretrained_feature_maps):
        raise ValueError(
            f"feature maps and pretrained feature maps name different layers: "
            f"{sorted(feature_maps)} vs {sorted(pretrained_feature_maps)}."
        )
    if not feature_maps:
        raise ValueError("DELTA needs at least one feature map.")
    total = jnp.float32(0.0)
    for name, fm in feature_maps.items():
        fm0 = pretrained_feature_maps[name]
        if fm.shape != fm0.shape or fm.ndim < 2:
            raise ValueError(
                f"layer {name!r}: feature maps must be [B, ..., C] of equal shapes, got "
                f"{fm.shape} and {fm0.shape}."
            )
        diff = fm.astype(jnp.float32) - jax.lax.stop_gradient(fm0.astype(jnp.float32))
        per_channel = jnp.mean(jnp.square(diff), axis=tuple(range(1, fm.ndim - 1)))  # [B, C]
        if attention is not None:
            if name not in attention:
                raise ValueError(
                    f"no channel attention for layer {name!r}; have {sorted(attention)}."
                )
            att = jnp.asarray(attention[name], jnp.float32)
            if att.shape != (fm.shape[-1],):
                raise ValueError(
                    f"layer {name!r}: attention shape {att.shape}, expected ({fm.shape[-1]},)."
                )
            per_channel = per_channel * (fm.shape[-1] * jax.lax.stop_gradient(att))
        total = total + jnp.mean(jnp.sum(per_channel, axis=-1))
    return 0.5 * total


def channel_attention(loss_increase: Array, temperature: float = 5.0) -> Array:
    """``softmax(standardise(loss_increase) / temperature)`` over the last (channel) axis."""
    x = jnp.asarray(loss_increase, jnp.float32)
    z = (x - jnp.mean(x, axis=-1, keepdims=True)) / jnp.std(x, axis=-1, keepdims=True)
    return jax.nn.softmax(z / temperature, axis=-1)


def channel_loss_increase(
    loss_fn: Callable[[PyTree], Array], params: PyTree, kernel_path: str
) -> Array:
    """[C] ``loss_fn(params with output channel j of kernel_path zeroed) - loss_fn(params)``.

    ``kernel_path``: ``/``-joined path of a Dense/Conv kernel, output channels on its last axis.
    ``loss_fn`` closes over one batch of data (and the pretrained model's apply function).
    """
    flat = flatten_with_paths(params)
    if kernel_path not in flat:
        raise ValueError(f"no parameter {kernel_path!r}; paths look like {list(flat)[:3]}.")
    channels = flat[kernel_path].shape[-1]
    base = loss_fn(params)

    def increase(j):
        keep = 1.0 - jax.nn.one_hot(j, channels, dtype=flat[kernel_path].dtype)
        zeroed = map_with_paths(lambda p, x: x * keep if p == kernel_path else x, params)
        return loss_fn(zeroed) - base

    return jax.lax.map(increase, jnp.arange(channels))


def loss(inputs: RegularizerInputs, config: Mapping[str, Any] | None = None):
    """``weight * Omega`` on ``inputs.feature_maps`` vs ``inputs.pretrained_feature_maps``."""
    cfg = resolve_config(config, DEFAULTS, "delta")
    require(
        "delta",
        feature_maps=inputs.feature_maps,
        pretrained_feature_maps=inputs.pretrained_feature_maps,
    )
    attention = None
    if cfg["use_attention"]:
        require("delta (use_attention=True)", channel_attention=inputs.channel_attention)
        attention = inputs.channel_attention
    value = feature_map_distance(inputs.feature_maps, inputs.pretrained_feature_maps, attention)
    return cfg["weight"] * value, {"delta": value}
