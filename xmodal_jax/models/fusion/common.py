"""What the fusion heads share: the towers' layers (`models/layers.py`) at the heads' defaults,
and the check of their common inputs."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import layers

Dtype = Any


def dense(
    features: int,
    names: tuple[str | None, str | None],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
) -> nn.Module:
    """The towers' `layers.Dense` (LeCun-normal kernel, zero bias, logical axes `names`)."""
    return layers.Dense(features, names, use_bias=use_bias, dtype=dtype, name=name)


def layer_norm(*, name: str, affine: bool = True, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """The towers' `layers.layer_norm` (two-pass variance) at flax's default epsilon."""
    return layers.layer_norm(1e-6, dtype, jnp.float32, name, affine=affine)


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
