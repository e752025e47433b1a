"""Transformer building blocks of the towers: multi-head attention, the pre-/post-norm block,
the MLP, a layer stack with optional `nn.scan` + remat, attention pooling (MAP) and position
embedding resizing. Parameters are annotated with the logical axis names of `axes.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, residuals
from xmodal_jax.models.layers import (
    REMAT_POLICIES,
    Dense,
    Dtype,
    Initializer,
    activation,
    check_choice,
    layer_norm,
    param,
)


class _HeadsIn(nn.Module):
    """Projection `[.., D] -> [.., H, hd]` (attention query/key/value)."""

    num_heads: int
    head_dim: int
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype
    kernel_init: Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.num_heads, self.head_dim)
        kernel = param(
            self,
            "kernel",
            self.kernel_init,
            shape,
            (axes.EMBED, axes.HEADS, axes.KV),
            self.param_dtype,
        )
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(
                self,
                "bias",
                nn.initializers.zeros,
                shape[1:],
                (axes.HEADS, axes.KV),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class _HeadsOut(nn.Module):
    """Projection `[.., H, hd] -> [.., D]` (attention output)."""

    features: int
    use_bias: bool
    dtype: Dtype
    param_dtype: Dtype
    kernel_init: Initializer

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (*x.shape[-2:], self.features)
        kernel = param(
            self,
            "kernel",
            self.kernel_init,
            shape,
            (axes.HEADS, axes.KV, axes.EMBED),
            self.param_dtype,
        )
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(
                self,
                "bias",
                nn.initializers.zeros,
                (self.features,),
                (axes.EMBED,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with `query`/`key`/`value`/`out` projections.

    `mask` is boolean, broadcastable to `[B, H, Q, K]`, True where attention is allowed.
    Softmax runs in float32 whatever the compute dtype.
    """

    num_heads: int
    head_dim: int | None = None
    use_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(
        self,
        q_in: jax.Array,
        kv_in: jax.Array,
        mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        width = q_in.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise UserError(f"width {width} is not divisible by num_heads={self.num_heads}.")
        hd = self.head_dim or width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        proj = lambda name: _HeadsIn(self.num_heads, hd, self.use_bias, name=name, **kw)
        q, k, v = proj("query")(q_in), proj("key")(kv_in), proj("value")(kv_in)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if self.dropout > 0.0:
            probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return _HeadsOut(width, self.use_bias, name="out", **kw)(out)


class TransformerBlock(nn.Module):
    """Attention + MLP with residuals; pre-LN (`norm_first`, ViT/CLIP) or post-LN (BERT).

    Returns `(x, None)` so the same block can be stacked by `nn.scan`.
    """

    num_heads: int
    mlp_dim: int
    norm_first: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attn_dropout: float = 0.0
    deterministic: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm1 = layer_norm(self.norm_eps, name="norm1", **kw)
        norm2 = layer_norm(self.norm_eps, name="norm2", **kw)
        attn = MultiHeadAttention(self.num_heads, dropout=self.attn_dropout, name="attn", **kw)
        mlp = MlpBlock(self.mlp_dim, self.act, name="mlp", **kw)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=self.deterministic)
        # Each residual point computed once, value and gradient (see `residuals.py`).
        x = residuals.stored(x)
        if self.norm_first:
            y = norm1(x)
            x = residuals.stored(x + drop(attn(y, y, mask, self.deterministic)))
            x = x + drop(mlp(norm2(x)))
        else:
            x = residuals.stored(norm1(x + drop(attn(x, x, mask, self.deterministic))))
            x = norm2(x + drop(mlp(x)))
        return x.astype(self.dtype), None


class MlpBlock(nn.Module):
    """Transformer feed-forward block `fc2(act(fc1(x)))`, back to the input width."""

    hidden: int
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.xavier_uniform()
        width = x.shape[-1]
        x = Dense(self.hidden, (axes.EMBED, axes.MLP), kernel_init=init, name="fc1", **kw)(x)
        x = activation(self.act)(x)
        return Dense(width, (axes.MLP, axes.EMBED), kernel_init=init, name="fc2", **kw)(x)


class LayerStack(nn.Module):
    """`depth` copies of `block(**block_kwargs)` applied in sequence.

    Unscanned, the copies are children `layer_0 .. layer_{depth-1}`; with `scan_layers` they
    are one child `layers` whose parameters carry a leading `layers` axis of size `depth`
    (`transfer/surgery.py` converts between the two layouts). `remat_policy` ('none', 'full',
    'dots') wraps the block in `nn.remat` to trade compute for activation memory.
    """

    block: type[nn.Module]
    block_kwargs: Mapping[str, Any]
    depth: int
    scan_layers: bool = False
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        check_choice("remat_policy", self.remat_policy, ("none", *REMAT_POLICIES))
        block = self.block
        if self.remat_policy != "none":
            block = nn.remat(
                block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers
            )
        kwargs = dict(self.block_kwargs)
        if self.scan_layers:
            block = nn.scan(
                block,
                variable_axes={True: 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )
            x, _ = block(name="layers", **kwargs)(x, mask)
            return x
        for i in range(self.depth):
            x, _ = block(name=f"layer_{i}", **kwargs)(x, mask)
        return x


def encoder(
    tower: nn.Module,
    x: jax.Array,
    mask: jax.Array | None = None,
    *,
    train: bool,
    mlp_dim: int,
    norm_first: bool = True,
    attn_dropout: float = 0.0,
) -> jax.Array:
    """The `encoder` stack of a transformer tower (ViT, BERT, the CLIP and SigLIP text towers),
    called from the tower's compact method: `tower.depth` blocks with its heads, activation,
    LayerNorm epsilon, dropout, dtypes, layer scan and remat policy."""
    block_kwargs = dict(
        num_heads=tower.num_heads,
        mlp_dim=mlp_dim,
        norm_first=norm_first,
        act=tower.act,
        norm_eps=tower.norm_eps,
        dropout=tower.dropout,
        attn_dropout=attn_dropout,
        deterministic=not train,
        dtype=tower.dtype,
        param_dtype=tower.param_dtype,
    )
    stack = LayerStack(
        TransformerBlock,
        block_kwargs,
        tower.depth,
        tower.scan_layers,
        tower.remat_policy,
        name="encoder",
    )
    return stack(x, mask)


class MAPHead(nn.Module):
    """Multi-head attention pooling (a learned probe attends over the tokens), as in
    big_vision `big_vision/models/vit.py` `MAPHead`: probe -> attn -> x + mlp(norm(x))."""

    num_heads: int
    mlp_dim: int
    act: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        init = nn.initializers.xavier_uniform()
        probe = param(self, "probe", init, (1, 1, d), (None, None, axes.EMBED), self.param_dtype)
        probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
        x = MultiHeadAttention(self.num_heads, name="attn", **kw)(probe, x, mask)
        y = layer_norm(self.norm_eps, name="norm", **kw)(x)
        x = x + MlpBlock(self.mlp_dim, self.act, name="mlp", **kw)(y)
        return x[:, 0]


def resize_posemb(posemb: jax.Array, new_grid: tuple[int, int], num_prefix: int) -> jax.Array:
    """Bilinearly resize position embeddings `[1, prefix + h*w, D]` to a new `(h', w')` grid.

    The first `num_prefix` rows (a cls token's) are kept as they are; the old grid must be
    square. Half-pixel centres, no anti-aliasing (plain bilinear, also when shrinking).
    """
    prefix, grid = posemb[:, :num_prefix], posemb[:, num_prefix:]
    n, d = grid.shape[1], grid.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise UserError(
            f"Cannot resize position embeddings of shape {tuple(posemb.shape)}: {n} grid rows "
            f"(after {num_prefix} prefix rows) are not a square grid."
        )
    if (side, side) == tuple(new_grid):
        return posemb
    dtype = grid.dtype
    grid = jnp.asarray(grid, jnp.float32).reshape(side, side, d)
    grid = jax.image.resize(grid, (*new_grid, d), method="bilinear", antialias=False)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(dtype)
    return jnp.concatenate([jnp.asarray(prefix, dtype), grid], axis=1)
