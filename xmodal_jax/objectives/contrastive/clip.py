"""CLIP softmax contrastive loss (symmetric InfoNCE), plain and sharded over the batch.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision":
logits = exp(log_scale) * z_i z_t^T over L2-normalised embeddings, cross-entropy with the
matching pair as target in both directions, averaged. `log_scale` starts at log(1/0.07) and is
clamped to <= log(100) after every optimiser step (`clamp_logit_scale`).

The sharded version is the "local loss" of mlfoundations/open_clip (`open_clip/loss.py`): each
device scores its own rows against the gathered columns, so it holds an [N/P, N] block only.
The gradient of `all_gather` is a reduce-scatter, so every device receives the gradient its
rows get from the other devices' blocks.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from xmodal_jax.objectives.contrastive.common import (
    BATCH_AXES,
    batch_shards,
    batch_spec,
    check_pair,
    prepare,
)

LOG_SCALE_INIT: float = math.log(1 / 0.07)
LOG_SCALE_MAX: float = math.log(100.0)


class LogitScale(nn.Module):
    """Holds CLIP's learnable temperature as the parameter `log_scale` (a scalar)."""

    init_value: float = LOG_SCALE_INIT

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.constant(self.init_value)
        return self.param("log_scale", nn.with_logical_partitioning(init, ()), (), jnp.float32)


def clamp_logit_scale(params: Any, max_value: float = LOG_SCALE_MAX) -> Any:
    """Returns `params` with every leaf named `log_scale` clamped to <= max_value.

    Call it on the new params after each optimiser step (CLIP clamps the scale at 100 so the
    softmax cannot become arbitrarily sharp). Works on boxed (logically partitioned) or plain
    trees and under `jax.jit`.
    """
    found = []

    def clamp(path, leaf):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        if names and names[-1] == "log_scale":
            found.append(path)
            return jnp.minimum(leaf, max_value)
        return leaf

    out = jax.tree_util.tree_map_with_path(clamp, params)
    if not found:
        raise ValueError(
            "clamp_logit_scale found no parameter named 'log_scale'; pass the params tree that "
            "holds the LogitScale module, or do not clamp for losses without a temperature."
        )
    return out


def clip_loss(
    image_emb: jax.Array, text_emb: jax.Array, log_scale: jax.Array, *, normalize: bool = True
) -> jax.Array:
    """Mean symmetric InfoNCE over a batch of N matched pairs; row i of each input is pair i."""
    check_pair(image_emb, text_emb)
    zi, zt = prepare(image_emb, normalize), prepare(text_emb, normalize)
    logits = jnp.exp(log_scale.astype(jnp.float32)) * (zi @ zt.T)
    pos = jnp.diagonal(logits)
    i2t = jax.nn.logsumexp(logits, axis=1) - pos
    t2i = jax.nn.logsumexp(logits, axis=0) - pos
    return 0.5 * (jnp.mean(i2t) + jnp.mean(t2i))


def clip_loss_sharded(
    image_emb: jax.Array,
    text_emb: jax.Array,
    log_scale: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    normalize: bool = True,
) -> jax.Array:
    """`clip_loss` with the batch sharded over `batch_axes`; returns the same global mean.

    Each device computes the [N/P, N] image->text and text->image blocks of its own rows
    against all-gathered columns; the per-device sums are `psum`-ed and divided by 2N.
    """
    check_pair(image_emb, text_emb)
    n_global = image_emb.shape[0]
    batch_shards(mesh, batch_axes, n_global)
    axes = tuple(batch_axes)

    def local(img, txt, log_scale):
        zi, zt = prepare(img, normalize), prepare(txt, normalize)
        all_i = jax.lax.all_gather(zi, axes, tiled=True)
        all_t = jax.lax.all_gather(zt, axes, tiled=True)
        scale = jnp.exp(log_scale.astype(jnp.float32))
        pos = scale * jnp.sum(zi * zt, axis=-1)
        i2t = jax.nn.logsumexp(scale * (zi @ all_t.T), axis=1) - pos
        t2i = jax.nn.logsumexp(scale * (zt @ all_i.T), axis=1) - pos
        return jax.lax.psum(jnp.sum(i2t) + jnp.sum(t2i), axes) / (2 * n_global)

    spec = batch_spec(axes)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, PartitionSpec()), out_specs=PartitionSpec()
    )
    return fn(image_emb, text_emb, log_scale)
