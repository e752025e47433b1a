"""Helpers shared by the contrastive losses: normalisation and batch-sharding checks."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scales each row of `x` to unit L2 norm (rows of norm < eps are scaled by 1/eps)."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def prepare(x: jax.Array, normalize: bool) -> jax.Array:
    """Casts to float32 (logits are computed in f32 whatever the tower dtype) and normalises."""
    x = x.astype(jnp.float32)
    return l2_normalize(x) if normalize else x


def check_pair(image_emb: jax.Array, text_emb: jax.Array) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"Contrastive losses take paired embeddings of equal shape [N, D]; got image "
            f"{image_emb.shape} and text {text_emb.shape}. Pool the towers' outputs and project "
            "both to the same width, one text per image."
        )


def batch_shards(mesh: Mesh, batch_axes: Sequence[str], batch_size: int) -> int:
    """Returns the number of batch shards, checking the axes exist and divide the batch."""
    missing = [a for a in batch_axes if a not in mesh.shape]
    if missing:
        raise ValueError(
            f"Batch axes {missing} are not in the mesh axes {tuple(mesh.shape)}; pass "
            "batch_axes naming existing mesh axes."
        )
    shards = 1
    for a in batch_axes:
        shards *= mesh.shape[a]
    if batch_size % shards:
        raise ValueError(
            f"Global batch {batch_size} is not divisible by the {shards} batch shards of mesh "
            f"axes {tuple(batch_axes)}; choose a batch size that is a multiple of {shards}."
        )
    return shards


def batch_spec(batch_axes: Sequence[str]) -> PartitionSpec:
    """Rows sharded over the batch axes, features replicated."""
    return PartitionSpec(tuple(batch_axes), None)
