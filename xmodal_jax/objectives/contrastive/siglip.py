"""SigLIP pairwise sigmoid loss, plain and chunked over the batch shards.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training": logits = exp(t') z_i z_t^T + b
over L2-normalised embeddings, labels y = +1 on the diagonal and -1 elsewhere, and
loss = -(1/N) sum_ij log sigmoid(y_ij * logit_ij): a sum over all N^2 pairs divided by the
batch size, not by N^2 (as in google-research/big_vision,
`big_vision/trainers/proj/image_text/siglip.py`: sum over the text axis, mean over images).
t' = log 10 and b = -10 at init.

The chunked version keeps each device's image rows fixed and passes the text chunks round a
ring with `ppermute`: after P steps every device has scored its rows against every text chunk,
holding one [N/P, N/P] block at a time; only the first (own) chunk contains positives.
"""

import math
from collections.abc import Sequence

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

LOG_SCALE_INIT: float = math.log(10.0)
BIAS_INIT: float = -10.0


class SigLIPLogitParams(nn.Module):
    """Holds SigLIP's learnable `log_scale` (t') and `bias` (b), both scalars."""

    log_scale_init: float = LOG_SCALE_INIT
    bias_init: float = BIAS_INIT

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        def scalar(name, value):
            init = nn.with_logical_partitioning(nn.initializers.constant(value), ())
            return self.param(name, init, (), jnp.float32)

        return scalar("log_scale", self.log_scale_init), scalar("bias", self.bias_init)


def _block_nll(zi, zt, scale, bias, with_positives: bool) -> jax.Array:
    """Summed -log sigmoid(y * logit) over one block of pairs."""
    logits = scale * (zi @ zt.T) + bias
    if with_positives:
        labels = 2.0 * jnp.eye(zi.shape[0], zt.shape[0], dtype=logits.dtype) - 1.0
    else:
        labels = -1.0
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits))


def siglip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    log_scale: jax.Array,
    bias: jax.Array,
    *,
    normalize: bool = True,
) -> jax.Array:
    """Sigmoid loss over all N^2 pairs of a batch, divided by N; row i of each input is pair i."""
    check_pair(image_emb, text_emb)
    zi, zt = prepare(image_emb, normalize), prepare(text_emb, normalize)
    scale = jnp.exp(log_scale.astype(jnp.float32))
    return _block_nll(zi, zt, scale, bias.astype(jnp.float32), True) / zi.shape[0]


def siglip_loss_sharded(
    image_emb: jax.Array,
    text_emb: jax.Array,
    log_scale: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str] = BATCH_AXES,
    normalize: bool = True,
) -> jax.Array:
    """`siglip_loss` with the batch sharded over `batch_axes`; returns the same global value.

    No device ever holds more than an [N/P, N/P] block of logits.
    """
    check_pair(image_emb, text_emb)
    n_global = image_emb.shape[0]
    shards = batch_shards(mesh, batch_axes, n_global)
    axes = tuple(batch_axes)
    ring = [(j, (j + 1) % shards) for j in range(shards)]

    def local(img, txt, log_scale, bias):
        zi, zt = prepare(img, normalize), prepare(txt, normalize)
        scale, b = jnp.exp(log_scale.astype(jnp.float32)), bias.astype(jnp.float32)
        total = _block_nll(zi, zt, scale, b, True)

        def step(_, carry):
            chunk, total = carry
            chunk = jax.lax.ppermute(chunk, axes, ring)
            return chunk, total + _block_nll(zi, chunk, scale, b, False)

        _, total = jax.lax.fori_loop(0, shards - 1, step, (zt, total))
        return jax.lax.psum(total, axes) / n_global

    spec = batch_spec(axes)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    return fn(image_emb, text_emb, log_scale, bias)
