"""Building blocks shared by the towers and heads: annotated dense, embedding, convolution
(plain, weight-standardised, depthwise) and normalisation layers, activations, parameter counts.
The transformer blocks are in `transformer.py`.

Every parameter is created with `nn.with_logical_partitioning` using the names of `axes.py`.
Convolutions pad symmetrically (`k // 2` on each side, as PyTorch does), so converted
torchvision / HF weights give the same outputs also for strided convolutions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from functools import partial
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


# What `depthwise='auto'` runs on CPU; runs recorded before `shift_vjp` became the default ran
# `shift` (provenance `cpu_depthwise`; the regression tier sets it from a record).
CPU_DEPTHWISE_ENV = "XMODAL_CPU_DEPTHWISE"
CPU_DEPTHWISE = ("shift_vjp", "shift")


def env_choice(
    name: str, choices: tuple[str, ...], what: str, environ: Mapping[str, str] | None = None
) -> str:
    """`$name` from `environ` (default: this process's), one of `choices`; unset or empty gives
    the first. Another value raises a `UserError` naming the choices (`what`: what they are)."""
    value = (os.environ if environ is None else environ).get(name) or choices[0]
    if value not in choices:
        raise UserError(
            f"${name}={value!r} is not a {what}: use one of {choices}, or unset it for the "
            f"default ({choices[0]!r})."
        )
    return value


def cpu_depthwise(environ: Mapping[str, str] | None = None) -> str:
    """The depthwise form `'auto'` picks on CPU: `shift_vjp` (the fastest there, BENCHMARKS.md),
    or `shift` (autodiff's gradient, bit for bit as runs made before it) where
    `$XMODAL_CPU_DEPTHWISE=shift`."""
    return env_choice(CPU_DEPTHWISE_ENV, CPU_DEPTHWISE, "CPU depthwise form", environ)


def depthwise_impl(impl: str) -> str:
    """Resolve `'auto'`: shifted multiply-adds on CPU (`cpu_depthwise()`), a grouped convolution
    elsewhere."""
    check_choice("depthwise implementation", impl, ("conv", "shift", "shift_vjp", "auto"))
    if impl == "auto":
        return cpu_depthwise() if jax.default_backend() == "cpu" else "conv"
    return impl


def window_spans(strides: tuple[int, int], out_hw: tuple[int, int]) -> tuple[int, int]:
    """Rows and columns of a padded input that one window offset's strided view covers."""
    return strides[0] * (out_hw[0] - 1) + 1, strides[1] * (out_hw[1] - 1) + 1


def window_views(
    xp: jax.Array, window: tuple[int, int], strides: tuple[int, int], out_hw: tuple[int, int]
) -> Iterator[tuple[int, int, jax.Array]]:
    """`(i, j, view)` in row-major order of (i, j): the element at offset (i, j) of every window
    of the padded NHWC `xp` (the shifted depthwise form's taps, the strided max-pool's views).
    A generator: each slice is traced when taken, so a caller's operations on one view come
    before the next slice in the program, the order autodiff then sums the gradients in."""
    (kh, kw), (sh, sw), (rows, cols) = window, strides, window_spans(strides, out_hw)
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), (n, i + rows, j + cols, c), (1, sh, sw, 1))


def _shifted(x: jax.Array, kernel: jax.Array, k: int, s: int, p: int) -> jax.Array:
    h, w = x.shape[1:3]
    out_hw = ((h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    y = None
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    for i, j, tap in window_views(xp, (k, k), (s, s), out_hw):
        y = tap * kernel[i, j, 0] if y is None else y + tap * kernel[i, j, 0]
    return y


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _shifted_vjp(x: jax.Array, kernel: jax.Array, k: int, s: int, p: int) -> jax.Array:
    return _shifted(x, kernel, k, s, p)


def _shifted_vjp_fwd(x, kernel, k, s, p):
    return _shifted(x, kernel, k, s, p), (x, kernel)


def _shifted_vjp_bwd(k, s, p, res, dy):
    # The input gradient of a stride-1 layer is the same shifted form over the output gradient,
    # padded once, with the kernel flipped: one pass over `dy`, where autodiff pads and adds k*k
    # products. Other strides keep autodiff's gradient. The kernel gradient is autodiff's.
    x, kernel = res
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    taps = window_views(xp, (k, k), (s, s), dy.shape[1:3])  # row-major, as the kernel's axes
    dk = jnp.stack([jnp.sum(tap * dy, axis=(0, 1, 2)) for _, _, tap in taps])
    dk = dk.reshape(kernel.shape).astype(kernel.dtype)
    if s != 1:
        return jax.vjp(lambda x: _shifted(x, kernel, k, s, p), x)[1](dy)[0], dk
    flipped = kernel[::-1, ::-1]
    return _shifted(dy, flipped, k, 1, k - 1 - p)[:, : x.shape[1], : x.shape[2]], dk


_shifted_vjp.defvjp(_shifted_vjp_fwd, _shifted_vjp_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution with symmetric padding (`padding`, default k // 2, on every
    side); kernel `[k, k, 1, C]` either way.

    `impl='conv'` is a grouped convolution (`feature_group_count=C`); `impl='shift'` sums k*k
    shifted, strided slices of the padded input times one kernel tap each. XLA:CPU runs the
    grouped form slowly, the shifted form is several times faster there; outputs are the same.
    `impl='shift_vjp'` is the shifted form with its own input gradient at stride 1 (the shifted
    form over the output gradient, kernel flipped), faster than autodiff's on CPU
    (`xmodal bench --ablations depthwise`) and equal to it up to float32 rounding (its forward
    is `shift`'s, bit for bit). `auto` picks `cpu_depthwise()` on CPU, `conv` elsewhere.
    """

    kernel_size: int = 3
    strides: int = 1
    impl: str = "auto"
    padding: int | None = None  # default k // 2 on every side
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, c = self.kernel_size, self.strides, x.shape[-1]
        names = (None, None, None, axes.CONV_OUT)
        kernel = param(self, "kernel", self.kernel_init, (k, k, 1, c), names, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        p = k // 2 if self.padding is None else self.padding
        impl = depthwise_impl(self.impl)
        if impl == "conv":
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(s, s),
                padding=((p, p), (p, p)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
        return (_shifted_vjp if impl == "shift_vjp" else _shifted)(x, kernel, k, s, p)


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


def count_params(variables: Mapping[str, Any]) -> int:
    """Number of scalars in the `params` collection (boxed or not, concrete or abstract)."""
    leaves = jax.tree.leaves(nn.unbox(variables.get("params", variables)))
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in leaves))
