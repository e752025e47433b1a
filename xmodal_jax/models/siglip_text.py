"""SigLIP / LiT text tower (Zhai et al. 2022, 2023), as big_vision's
`big_vision/models/proj/image_text/text_transformer.py` and HF `SiglipTextModel` compute it:
token + learned position embeddings, a pre-LN transformer with *bidirectional* attention (no
causal mask, no padding mask), a final LayerNorm, one position pooled, then a linear head with
bias into the joint embedding space.

`pool='last'` (big_vision's default and every published SigLIP) takes the last position. Texts
are padded to the full `context_length` in training (SigLIP pads with the end-of-text id, so
the last position holds `</s>` or the last word of a truncated text), and the padding is
attended to: a shorter or longer padding changes the embedding. Feed ids padded to
`context_length`, as the tokenizer of a converted checkpoint does. `'first'`, `'mean'` (over
every position, padding included), `'max'` and `'map'` (attention pooling) are big_vision's
other `pool_type`s.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, transformer


class SigLIPText(nn.Module):
    """Text tower over int32 ids `[B, L]`, `L <= context_length`:
    `{'pooled': [B, proj_dim or D], 'features': [B, L, D]}`."""

    # Padding is part of the input (no mask, last position pooled): callers must not trim it.
    full_length_input: ClassVar[bool] = True

    vocab_size: int = 32_000
    context_length: int = 64
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # default 4 * width
    proj_dim: int = 768  # the head (with bias) into the joint space; 0: none
    act: str = "gelu_tanh"
    norm_eps: float = 1e-6
    pool: str = "last"  # 'last' | 'first' | 'mean' | 'max' | 'map'
    num_classes: int = 0
    dropout: float = 0.0
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        layers.check_choice("pool", self.pool, ("last", "first", "mean", "max", "map"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        length = ids.shape[1]
        if length > self.context_length:
            raise UserError(
                f"Sequence length {length} exceeds context_length={self.context_length}; "
                "truncate the tokens or build the tower with a larger context_length."
            )
        mlp_dim = self.mlp_dim or 4 * self.width
        x = layers.Embed(self.vocab_size, self.width, name="token_embedding", **kw)(ids)
        pos = layers.param(
            self,
            "pos_embedding",
            nn.initializers.normal(stddev=self.width**-0.5),
            (self.context_length, self.width),
            (None, axes.EMBED),
            self.param_dtype,
        )
        x = x + pos[:length].astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = transformer.encoder(self, x, train=train, mlp_dim=mlp_dim)
        x = layers.layer_norm(self.norm_eps, name="norm", **kw)(x)

        if self.pool == "last":
            pooled = x[:, -1]
        elif self.pool == "first":
            pooled = x[:, 0]
        elif self.pool == "mean":
            pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)
        elif self.pool == "max":
            pooled = jnp.max(x, axis=1)
        else:
            pooled = transformer.MAPHead(
                self.num_heads, mlp_dim, self.act, self.norm_eps, name="map_head", **kw
            )(x)
        if self.proj_dim:
            pooled = layers.Dense(self.proj_dim, (axes.EMBED, None), name="proj", **kw)(pooled)

        out = {"pooled": pooled, "features": x}
        if self.num_classes:
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(pooled)
        return out
