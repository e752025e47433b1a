"""Building blocks shared by the towers: annotated dense/conv/norm layers, attention, a
transformer block, a layer stack with optional `nn.scan` + remat, and attention pooling.

Every parameter is created with `nn.with_logical_partitioning` using the names of `axes.py`.
Convolutions pad symmetrically (`k // 2` on each side, as PyTorch does), so converted
torchvision / HF weights give the same outputs also for strided convolutions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes

Dtype = Any
Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT, HF / timm ViT
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # big_vision ViT (flax default)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation function called `name` (see `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise UserError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a `UserError` naming the valid `choices` when `value` is not one of them."""
    if value not in choices:
        raise UserError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")


def param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: tuple[int, ...],
    names: tuple[str | None, ...],
    dtype: Dtype,
) -> jax.Array:
    """`module.param` annotated with logical axis `names` (one per dimension)."""
    assert len(names) == len(shape), (name, shape, names)
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype)


def norm_inits() -> dict[str, Initializer]:
    """Scale/bias initialisers for norm layers, annotated with the `norm` axis."""
    return {
        "scale_init": nn.with_logical_partitioning(nn.initializers.ones, (axes.NORM,)),
        "bias_init": nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,)),
    }


def layer_norm(
    eps: float, dtype: Dtype, param_dtype: Dtype, name: str, affine: bool = True
) -> nn.LayerNorm:
    """LayerNorm with two-pass variance (matches PyTorch to float32 rounding); `affine=False`:
    no scale and bias."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        use_scale=affine,
        use_bias=affine,
        name=name,
        **norm_inits(),
    )


class Dense(nn.Module):
    """`x @ kernel + bias` over the last axis; `names` are the kernel's logical axes."""

    features: int
    names: tuple[str | None, str | None] = (axes.EMBED, axes.MLP)
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1], self.features)
        kernel = param(self, "kernel", self.kernel_init, shape, self.names, self.param_dtype)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = param(
                self, "bias", self.bias_init, (self.features,), self.names[1:], self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """A lookup table `[num, features]`; `names` are its logical axes."""

    num: int
    features: int
    names: tuple[str | None, str | None] = (axes.VOCAB, axes.EMBED)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    init: Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = param(
            self, "embedding", self.init, (self.num, self.features), self.names, self.param_dtype
        )
        return jnp.take(table, ids, axis=0).astype(self.dtype)


def _standardise(kernel: jax.Array, eps: float) -> jax.Array:
    """Weight standardisation (Qiao et al. 2019; BiT): zero mean, unit variance per output."""
    mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + eps)


class Conv(nn.Module):
    """2-D convolution, NHWC, HWIO kernel `[k, k, in // groups, out]`, symmetric padding."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | None = None  # default k // 2 on every side
    groups: int = 1
    use_bias: bool = False
    weight_std: bool = False
    ws_eps: float = 1e-10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, cin = self.kernel_size, x.shape[-1]
        if cin % self.groups or self.features % self.groups:
            raise UserError(
                f"Conv {self.name}: channels in={cin} / out={self.features} are not divisible by "
                f"groups={self.groups}."
            )
        shape = (k, k, cin // self.groups, self.features)
        names = (None, None, axes.CONV_IN if self.groups == 1 else None, axes.CONV_OUT)
        kernel = param(self, "kernel", self.kernel_init, shape, names, self.param_dtype)
        if self.weight_std:
            kernel = _standardise(kernel.astype(jnp.float32), self.ws_eps)
        p = k // 2 if self.padding is None else self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.strides, self.strides),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.use_bias:
            bias = param(
                self,
                "bias",
                nn.initializers.zeros,
                (self.features,),
                (axes.CONV_OUT,),
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y


def depthwise_impl(impl: str) -> str:
    """Resolve `'auto'`: shifted multiply-adds on CPU, a grouped convolution elsewhere."""
    check_choice("depthwise implementation", impl, ("conv", "shift", "auto"))
    if impl == "auto":
        return "shift" if jax.default_backend() == "cpu" else "conv"
    return impl


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution with symmetric padding; kernel `[k, k, 1, C]` either way.

    `impl='conv'` is a grouped convolution (`feature_group_count=C`); `impl='shift'` sums k*k
    shifted, strided slices of the padded input times one kernel tap each. XLA:CPU runs the
    grouped form slowly, the shifted form is several times faster there; outputs are the same.
    """

    kernel_size: int = 3
    strides: int = 1
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, c = self.kernel_size, self.strides, x.shape[-1]
        names = (None, None, None, axes.CONV_OUT)
        kernel = param(self, "kernel", self.kernel_init, (k, k, 1, c), names, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        p = k // 2
        if depthwise_impl(self.impl) == "conv":
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(s, s),
                padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
        b, h, w, _ = x.shape
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        y = None
        for i in range(k):
            for j in range(k):
                tap = jax.lax.slice(
                    xp,
                    (0, i, j, 0),
                    (b, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c),
                    (1, s, s, 1),
                )
                y = tap * kernel[i, j, 0] if y is None else y + tap * kernel[i, j, 0]
        return y


def cnn_norm(
    kind: str,
    *,
    train: bool,
    name: str,
    groups: int = 32,
    momentum: float = 0.9,
    eps: float = 1e-5,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    zero_scale: bool = False,
) -> nn.Module:
    """BatchNorm (statistics in `batch_stats`; batch statistics when `train`) or GroupNorm.

    `zero_scale` starts the scale at 0 (a residual branch that begins as the identity)."""
    check_choice("norm", kind, ("batch", "group"))
    inits = norm_inits()
    if zero_scale:
        inits["scale_init"] = nn.with_logical_partitioning(nn.initializers.zeros, (axes.NORM,))
    common = dict(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
        **inits,
    )
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=momentum, **common)
    return nn.GroupNorm(num_groups=groups, **common)


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
        if self.norm_first:
            y = norm1(x)
            x = x + drop(attn(y, y, mask, self.deterministic))
            x = x + drop(mlp(norm2(x)))
        else:
            x = norm1(x + drop(attn(x, x, mask, self.deterministic)))
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


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of scalars in the `params` collection (boxed or not, concrete or abstract)."""
    leaves = jax.tree.leaves(nn.unbox(variables.get("params", variables)))
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))
