"""Cross-attention fusion: text tokens attend to image patches / spatial features.

A few pre-LayerNorm transformer blocks over the text tokens (as in the fusion encoders of
ALBEF, Li et al. 2021): masked self-attention among text tokens, cross-attention from text
queries to image keys/values, and an MLP, each with a residual connection. `text_mask` is the
key mask of the self-attention and the pooling mask, so padded text tokens influence nothing.
Without tokens, the pooled features stand in as a single token.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import layers
from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense, layer_norm

POOLS = ("mean", "first")


def _attention(num_heads: int, width: int, dropout_rate: float, dtype: Dtype, name: str):
    part = nn.with_logical_partitioning
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads,
        qkv_features=width,
        out_features=width,
        dropout_rate=dropout_rate,
        dtype=dtype,
        kernel_init=part(nn.initializers.xavier_uniform(), ("embed", "heads", "kv")),
        bias_init=part(nn.initializers.zeros, ("heads", "kv")),
        out_kernel_init=part(nn.initializers.xavier_uniform(), ("heads", "kv", "embed")),
        out_bias_init=part(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class CrossAttentionBlock(nn.Module):
    """x <- x + SelfAttn(LN x); x <- x + CrossAttn(LN x, LN kv); x <- x + MLP(LN x)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    self_attention: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, kv: jax.Array, key_mask: jax.Array | None, train: bool
    ) -> jax.Array:
        width, det = x.shape[-1], not train
        drop = nn.Dropout(self.dropout_rate, deterministic=det)
        attn = lambda name: _attention(self.num_heads, width, self.dropout_rate, self.dtype, name)
        if self.self_attention:
            mask = None
            if key_mask is not None:
                mask = nn.make_attention_mask(jnp.ones(key_mask.shape, bool), key_mask)
            y = layer_norm(name="norm_self", dtype=self.dtype)(x)
            x = x + drop(attn("self_attention")(y, y, mask=mask, deterministic=det))
        y = layer_norm(name="norm_query", dtype=self.dtype)(x)
        kv = layer_norm(name="norm_kv", dtype=self.dtype)(kv)
        x = x + drop(attn("cross_attention")(y, kv, deterministic=det))
        y = layer_norm(name="norm_mlp", dtype=self.dtype)(x)
        y = layers.activation("gelu")(
            dense(self.mlp_dim, ("embed", "mlp"), name="mlp_in", dtype=self.dtype)(y)
        )
        y = dense(width, ("mlp", "embed"), name="mlp_out", dtype=self.dtype)(drop(y))
        return x + drop(y)


class CrossAttentionFusion(nn.Module):
    out_dim: int
    width: int = 256
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 1024
    dropout_rate: float = 0.0
    self_attention: bool = True
    pool: str = "mean"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_feats: jax.Array,
        text_feats: jax.Array,
        *,
        image_tokens: jax.Array | None = None,
        text_tokens: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        check_inputs(
            "cross_attention", image_feats, text_feats, image_tokens, text_tokens, text_mask
        )
        if self.width % self.num_heads:
            raise ValueError(
                f"cross_attention: width {self.width} is not divisible by num_heads "
                f"{self.num_heads}; pick a width that is a multiple of num_heads."
            )
        if self.pool not in POOLS:
            raise ValueError(f"cross_attention: pool must be one of {POOLS}; got {self.pool!r}.")
        kw = dict(dtype=self.dtype)
        text = text_tokens if text_tokens is not None else text_feats[:, None, :]
        image = image_tokens if image_tokens is not None else image_feats[:, None, :]
        x = dense(self.width, (None, "embed"), name="text_in", **kw)(text)
        kv = dense(self.width, (None, "embed"), name="image_in", **kw)(image)
        mask = None if text_mask is None else text_mask.astype(bool)
        for i in range(self.num_layers):
            block = CrossAttentionBlock(
                self.num_heads,
                self.mlp_dim,
                self.dropout_rate,
                self.self_attention,
                self.dtype,
                name=f"block_{i}",
            )
            x = block(x, kv, mask, train)
        x = layer_norm(name="norm_out", **kw)(x)
        if self.pool == "first":
            pooled = x[:, 0]
        elif mask is None:
            pooled = jnp.mean(x, axis=1)
        else:
            w = mask.astype(x.dtype)[..., None]
            pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        fused = dense(self.out_dim, ("embed", None), name="out", **kw)(pooled)
        return {"fused": fused}
