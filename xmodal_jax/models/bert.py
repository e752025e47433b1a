"""BERT-style text encoder (Devlin et al. 2019): word + absolute position + token-type
embeddings, post-LN transformer, mean / cls / pooler pooling. Holds BERT and MiniLM weights
(MiniLM, Wang et al. 2020, is a narrower, shallower BERT).

Token id `pad_id` (0 in BERT vocabularies) marks padding: padded keys are masked out of
attention and padded positions out of mean pooling.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, transformer


class Bert(nn.Module):
    """Text tower over int32 ids `[B, L]`: `{'pooled': [B, D], 'features': [B, L, D], ...}`."""

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int | None = None  # default 4 * width
    act: str = "gelu"
    norm_eps: float = 1e-12
    pool: str = "mean"  # 'mean' | 'cls' | 'pooler' (tanh dense on the cls token, as BERT's NSP)
    pad_id: int = 0
    num_classes: int = 0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        ids: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        layers.check_choice("pool", self.pool, ("mean", "cls", "pooler"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, length = ids.shape
        if length > self.max_len:
            raise UserError(
                f"Sequence length {length} exceeds max_len={self.max_len} position embeddings; "
                "truncate the tokens (tokenizer max_len) or build the tower with a larger max_len."
            )
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        valid = ids != self.pad_id

        x = layers.Embed(self.vocab_size, self.width, name="word_embeddings", **kw)(ids)
        pos = layers.Embed(
            self.max_len, self.width, (None, axes.EMBED), name="position_embeddings", **kw
        )
        x = x + pos(jnp.arange(length))[None]
        types = layers.Embed(
            self.type_vocab_size, self.width, (None, axes.EMBED), name="token_type_embeddings", **kw
        )
        x = x + types(token_type_ids)
        x = layers.layer_norm(self.norm_eps, name="embed_norm", **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)

        mask = valid[:, None, None, :]
        x = transformer.encoder(
            self,
            x,
            mask,
            train=train,
            mlp_dim=self.mlp_dim or 4 * self.width,
            norm_first=False,  # BERT's post-LN blocks
            attn_dropout=self.attn_dropout,
        )

        if self.pool == "mean":
            w = valid[..., None].astype(jnp.float32)
            pooled = jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(w.sum(axis=1), 1e-9)
            pooled = pooled.astype(self.dtype)
        elif self.pool == "cls":
            pooled = x[:, 0]
        else:
            dense = layers.Dense(self.width, (axes.EMBED, None), name="pooler", **kw)
            pooled = jnp.tanh(dense(x[:, 0]))

        out = {"pooled": pooled, "features": x, "mask": valid}
        if self.num_classes:
            h = nn.Dropout(self.dropout)(pooled, deterministic=not train)
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(h)
        return out
