"""Vision Transformer (Dosovitskiy et al. 2021): patch embedding, learned position embeddings,
pre-LN transformer, pooling by cls token, global average or multi-head attention (MAP).

The position table has a row for the cls token when there is one (`pool='cls'`, or
`cls_token=True`: open_clip keeps it also when it pools by the patch tokens' mean);
inputs whose patch grid differs from `image_size // patch_size` get a bilinearly resized
table. `pre_norm` (a LayerNorm before the encoder) and `proj_dim` (a bias-free projection of
the pooled features) give the CLIP image tower; `proj_bias` gives that projection a bias (the
image head of a big_vision two-tower model, e.g. LiT).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, transformer

# width, depth, mlp_dim, heads: Table 1 of Dosovitskiy et al. (B, L) and Touvron et al. 2021
# (Ti, S), as in big_vision `big_vision/models/vit.py` `decode_variant`.
VARIANTS = {
    "ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "s": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "b": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "l": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


class ViT(nn.Module):
    """ViT tower: `{'pooled': [B, D], 'features': [B, N, D], 'logits'?}` (features after the
    final norm unless `norm_after_pool`, prefix token included)."""

    num_classes: int = 0
    patch_size: int = 16
    image_size: int = 224
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None  # default 4 * width
    num_heads: int = 12
    pool: str = "cls"  # 'cls' | 'gap' | 'map'
    cls_token: bool | None = None  # prepend a cls token; default: only when pool='cls'
    norm_after_pool: bool = False  # final LayerNorm on the pooled vector, not on every token
    act: str = "gelu"
    norm_eps: float = 1e-6
    pre_norm: bool = False
    patch_bias: bool = True
    proj_dim: int = 0
    proj_bias: bool = False
    dropout: float = 0.0
    attn_dropout: float = 0.0
    head_zeroinit: bool = True
    scan_layers: bool = False
    remat_policy: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        layers.check_choice("pool", self.pool, ("cls", "gap", "map"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, d = self.patch_size, self.width
        mlp_dim = self.mlp_dim or 4 * d

        x = layers.Conv(
            d,
            p,
            strides=p,
            padding=0,
            use_bias=self.patch_bias,
            kernel_init=nn.initializers.lecun_normal(),
            name="embedding",
            **kw,
        )(images)
        b, h, w, _ = x.shape
        x = x.reshape(b, h * w, d)

        prefix = int(self.pool == "cls" if self.cls_token is None else self.cls_token)
        if self.pool == "cls" and not prefix:
            raise UserError("pool='cls' needs the cls token; set cls_token=True (or None).")
        if prefix:
            cls = layers.param(
                self,
                "cls",
                nn.initializers.zeros,
                (1, 1, d),
                (None, None, axes.EMBED),
                self.param_dtype,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
        grid = self.image_size // p
        posemb = layers.param(
            self,
            "pos_embedding",
            nn.initializers.normal(stddev=0.02),
            (1, prefix + grid * grid, d),
            (None, None, axes.EMBED),
            self.param_dtype,
        )
        if (h, w) != (grid, grid):
            posemb = transformer.resize_posemb(posemb, (h, w), prefix)
        x = x + posemb.astype(self.dtype)

        if self.pre_norm:
            x = layers.layer_norm(self.norm_eps, name="norm_pre", **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = transformer.encoder(
            self, x, train=train, mlp_dim=mlp_dim, attn_dropout=self.attn_dropout
        )
        norm = layers.layer_norm(self.norm_eps, name="norm", **kw)
        if not self.norm_after_pool:
            x = norm(x)

        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "gap":  # the patch tokens' mean (a cls token is left out)
            pooled = jnp.mean(x[:, prefix:], axis=1)
        else:
            pooled = transformer.MAPHead(
                self.num_heads, mlp_dim, self.act, self.norm_eps, name="map_head", **kw
            )(x)
        if self.norm_after_pool:
            pooled = norm(pooled)
        if self.proj_dim:
            pooled = layers.Dense(
                self.proj_dim, (axes.EMBED, None), use_bias=self.proj_bias, name="proj", **kw
            )(pooled)

        out = {"pooled": pooled, "features": x}
        if self.num_classes:
            init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), kernel_init=init, name="head", **kw
            )(pooled)
        return out
