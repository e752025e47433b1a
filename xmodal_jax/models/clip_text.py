"""CLIP-style causal text transformer (Radford et al. 2021): token + position embeddings,
pre-LN causal transformer with quick-GELU, final LayerNorm, features taken at the end-of-text
token and projected without bias into the joint embedding space.

`pool='eos'` takes, per sequence, the position of the highest token id (the end-of-text token
has the largest id in CLIP's BPE vocabulary, which is what OpenAI CLIP does), or the first
position holding `eos_id` when it is set. `pool='mean'` averages the positions up to and
including that end-of-text position.

Causal attention already keeps the end-of-text features from seeing the padding after it, so
no padding mask is needed (CLIP pads with id 0, which is also the token '!'). `pad_id`, when
set, additionally masks keys holding that id.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, transformer


class CLIPText(nn.Module):
    """Text tower over int32 ids `[B, L]`: `{'pooled': [B, proj_dim or D], 'features': ...}`."""

    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    mlp_dim: int | None = None  # default 4 * width
    proj_dim: int = 512  # 0: no projection
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    pool: str = "eos"  # 'eos' | 'mean'
    eos_id: int | None = None  # None: position of the highest id (CLIP)
    pad_id: int | None = None  # mask keys with this id on top of the causal mask
    num_classes: int = 0
    dropout: float = 0.0
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        layers.check_choice("pool", self.pool, ("eos", "mean"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, length = ids.shape
        if length > self.context_length:
            raise UserError(
                f"Sequence length {length} exceeds context_length={self.context_length}; "
                "truncate the tokens or build the tower with a larger context_length."
            )
        x = layers.Embed(self.vocab_size, self.width, name="token_embedding", **kw)(ids)
        pos = layers.param(
            self,
            "pos_embedding",
            nn.initializers.normal(stddev=0.01),
            (self.context_length, self.width),
            (None, axes.EMBED),
            self.param_dtype,
        )
        x = x + pos[:length].astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        mask = causal if self.pad_id is None else causal & (ids != self.pad_id)[:, None, None, :]
        x = transformer.encoder(self, x, mask, train=train, mlp_dim=self.mlp_dim or 4 * self.width)
        x = layers.layer_norm(self.norm_eps, name="norm", **kw)(x)

        if self.eos_id is None:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == self.eos_id, axis=-1)
        valid = jnp.arange(length)[None] <= eos[:, None]
        if self.pool == "eos":
            pooled = x[jnp.arange(b), eos]
        else:
            w = valid[..., None].astype(jnp.float32)
            pooled = (jnp.sum(x.astype(jnp.float32) * w, 1) / w.sum(1)).astype(self.dtype)
        if self.proj_dim:
            pooled = layers.Dense(
                self.proj_dim, (axes.EMBED, None), use_bias=False, name="proj", **kw
            )(pooled)

        out = {"pooled": pooled, "features": x, "mask": valid}
        if self.num_classes:
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(pooled)
        return out
