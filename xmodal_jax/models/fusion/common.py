"""Building blocks shared by the fusion heads: logically partitioned layers and input checks."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """A Dense layer whose kernel and bias carry logical axis names (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
        name=name,
    )


def layer_norm(*, name: str, affine: bool = True, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    return nn.LayerNorm(
        use_scale=affine,
        use_bias=affine,
        dtype=dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


def check_inputs(
    head: str,
    image_feats: jax.Array,
    text_feats: jax.Array,
    image_tokens: jax.Array | None = None,
    text_tokens: jax.Array | None = None,
    text_mask: jax.Array | None = None,
) -> None:
    """Checks the shared fusion-head interface; raises one message naming the bad input."""

    def fail(what: str) -> None:
        raise ValueError(f"{head}: {what}")

    if image_feats.ndim != 2 or text_feats.ndim != 2:
        fail(
            f"image_feats and text_feats must be pooled [B, D]; got {image_feats.shape} and "
            f"{text_feats.shape}. Pool the towers' token outputs first and pass the tokens as "
            "image_tokens / text_tokens."
        )
    b = image_feats.shape[0]
    if text_feats.shape[0] != b:
        fail(f"batch sizes differ: image_feats {image_feats.shape}, text_feats {text_feats.shape}.")
    for label, tokens in (("image_tokens", image_tokens), ("text_tokens", text_tokens)):
        if tokens is not None and (tokens.ndim != 3 or tokens.shape[0] != b):
            fail(
                f"{label} must be [B={b}, N, D]; got {tokens.shape}. Flatten CNN maps "
                "[B, H, W, C] to [B, H*W, C]."
            )
    if text_mask is not None:
        n = text_tokens.shape[1] if text_tokens is not None else None
        if text_tokens is None or text_mask.shape != (b, n):
            fail(f"text_mask must be [B, N] matching text_tokens; got {text_mask.shape}.")


def activation(name: str):
    """Looks up an activation by name (relu, gelu, tanh, silu)."""
    table = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "silu": nn.silu}
    if name not in table:
        raise ValueError(f"Unknown activation {name!r}; use one of {sorted(table)}.")
    return table[name]
