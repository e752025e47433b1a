"""The ModifiedResNet image tower of CLIP (Radford et al. 2021, section 2.4; OpenAI CLIP and
open_clip `RN50`, `RN101`, `RN50x4`, `RN50x16`, `RN50x64`).

Three changes to a ResNet-50-style network: a stem of three 3x3 convolutions (the first with
stride 2) followed by a 2x2 average pool instead of one 7x7 convolution and a max pool;
anti-aliased downsampling, where a block that strides does so by a 2x2 average pool after its
3x3 convolution (and before the 1x1 convolution of its shortcut) rather than by a strided
convolution; and attention pooling: the mean of the final feature map, prepended to its
positions, is the one query of a multi-head attention over all of them (learned position
embeddings), whose output projection gives the joint-space embedding.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, transformer

# blocks per stage, width, image size, embedding size: the RN50 .. RN50x64 models of CLIP.
VARIANTS = {
    "50": dict(stage_sizes=(3, 4, 6, 3), width=64, image_size=224, proj_dim=1024),
    "101": dict(stage_sizes=(3, 4, 23, 3), width=64, image_size=224, proj_dim=512),
    "50x4": dict(stage_sizes=(4, 6, 10, 6), width=80, image_size=288, proj_dim=640),
    "50x16": dict(stage_sizes=(6, 8, 18, 8), width=96, image_size=384, proj_dim=768),
    "50x64": dict(stage_sizes=(3, 15, 36, 10), width=128, image_size=448, proj_dim=1024),
}


def _avg_pool(x: jax.Array, size: int) -> jax.Array:
    """Non-overlapping `size` x `size` average pool (floors odd sizes, as PyTorch does)."""
    return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class AttentionPool(nn.Module):
    """Multi-head attention with the mean token as the only query: `[B, H, W, C] -> [B, out]`.

    `pos_embedding` has `1 + grid * grid` rows (mean token first); another input grid gets a
    bilinearly resized table."""

    num_heads: int
    out_dim: int
    grid: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        if c % self.num_heads:
            raise UserError(f"width {c} is not divisible by num_heads={self.num_heads}.")
        x = x.reshape(b, h * w, c)
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        pos = layers.param(
            self,
            "pos_embedding",
            nn.initializers.normal(stddev=c**-0.5),
            (1, 1 + self.grid * self.grid, c),
            (None, None, axes.EMBED),
            self.param_dtype,
        )
        if (h, w) != (self.grid, self.grid):
            pos = transformer.resize_posemb(pos, (h, w), 1)
        x = x + pos.astype(self.dtype)
        dense = lambda n, name: layers.Dense(n, (axes.EMBED, axes.MLP), name=name, **kw)
        hd = c // self.num_heads
        q = dense(c, "query")(x[:, :1]).reshape(b, 1, self.num_heads, hd)
        k = dense(c, "key")(x).reshape(b, -1, self.num_heads, hd)
        v = dense(c, "value")(x).reshape(b, -1, self.num_heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, c)
        return layers.Dense(self.out_dim, (axes.MLP, axes.EMBED), name="out", **kw)(out)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet tower: `{'pooled': [B, proj_dim], 'features': [B, H, W, 32 * width],
    'logits'?}`; `num_heads` of the attention pool (CLIP: `32 * width // 64`)."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    image_size: int = 224
    num_heads: int = 32
    proj_dim: int = 1024
    num_classes: int = 0
    norm_eps: float = 1e-5
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def conv_bn(y: jax.Array, features: int, k: int, name: str, stride: int = 1) -> jax.Array:
            y = layers.Conv(features, k, strides=stride, name=f"{name}_conv", **kw)(y)
            norm = layers.cnn_norm(
                "batch", train=train, name=f"{name}_norm", momentum=self.bn_momentum,
                eps=self.norm_eps, **kw,
            )  # fmt: skip
            return norm(y)

        w = self.width
        x = x.astype(self.dtype)
        x = jax.nn.relu(conv_bn(x, w // 2, 3, "stem1", stride=2))
        x = jax.nn.relu(conv_bn(x, w // 2, 3, "stem2"))
        x = jax.nn.relu(conv_bn(x, w, 3, "stem3"))
        x = _avg_pool(x, 2)

        for i, n_blocks in enumerate(self.stage_sizes):
            mid = w * 2**i
            out = 4 * mid
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                name = f"stage{i + 1}_block{j + 1}"
                residual = x
                if stride > 1 or x.shape[-1] != out:
                    residual = conv_bn(_avg_pool(x, stride), out, 1, f"{name}_proj")
                y = jax.nn.relu(conv_bn(x, mid, 1, f"{name}_1"))
                y = jax.nn.relu(conv_bn(y, mid, 3, f"{name}_2"))
                y = conv_bn(_avg_pool(y, stride), out, 1, f"{name}_3")
                x = jax.nn.relu(y + residual)

        grid = self.image_size // 32
        pooled = AttentionPool(self.num_heads, self.proj_dim, grid, name="attn_pool", **kw)(x)
        result = {"pooled": pooled, "features": x}
        if self.num_classes:
            result["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(pooled)
        return result
