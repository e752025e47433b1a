"""Max pooling with the gradient computed elementwise instead of by XLA's select-and-scatter.

`nn.max_pool`'s gradient is select-and-scatter (with an index-tracking reduce-window before it),
which is slow on XLA:CPU: about half of the LeNet + DANN train step on 2 cores (`xmodal bench
--ablations max_pool`, which also times ResNet-50 with either form of its stem pool; there the
elementwise form is not faster at every batch, so it is an option, not ResNet's default).
Both forms here give every window's gradient to the window's first maximum in row-major order,
the position select-and-scatter chooses, so values and gradients equal `nn.max_pool`'s bit for
bit (tests/test_pooling.py):
- `tiled_max_pool`: windows that tile the image (stride = window, no padding; LeNet). Every
  input position belongs to one window, so its gradient is a compare and a select.
- `max_pool`: any window, stride and padding (ResNet's 3x3/2 stem pool). The output is the
  maximum of the window's strided views of the padded input; each view's share of the gradient
  is placed back by padding, and the shares are summed in the order select-and-scatter adds
  them (windows in row-major order), so overlapping windows sum alike too.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from xmodal_jax.models.layers import window_spans, window_views


def tiled_max_pool(x: jax.Array, window: tuple[int, int]) -> jax.Array:
    """`nn.max_pool(x, window, strides=window)` on NHWC `x` (rows and columns that do not fill a
    window are dropped, as VALID padding does)."""
    kh, kw = window
    h, w = x.shape[1] // kh * kh, x.shape[2] // kw * kw
    return _pool(x[:, :h, :w], kh, kw)


def _windows(x: jax.Array, kh: int, kw: int) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // kh, kh, w // kw, kw, c)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _pool(x: jax.Array, kh: int, kw: int) -> jax.Array:
    # The elementwise maximum of the kh * kw strided views, not a max-reduce over the windows:
    # in an inference program XLA:CPU hands a reduce and the convolution feeding it to one
    # YNNPACK fusion, which ran a 3-channel LeNet forward about 4x slower than XLA's own
    # convolution (the project's default, `xla_defaults`) does. The maximum is exact, so the
    # values are the same either way.
    out = x[:, ::kh, ::kw]
    for i in range(kh):
        for j in range(kw):
            if i or j:
                out = jnp.maximum(out, x[:, i::kh, j::kw])
    return out


def _pool_fwd(x, kh, kw):
    return _pool(x, kh, kw), x


def _pool_bwd(kh, kw, x, g):
    # Both reads of `x` below must see the same values. Without the barrier XLA may compute an
    # elementwise producer of `x` once per read, and the copies need not round alike: in an
    # unoptimised program (JAX_DISABLE_MOST_OPTIMIZATIONS) a quarter of the windows of a
    # BatchNorm output got no gradient.
    windows = _windows(jax.lax.optimization_barrier(x), kh, kw)
    hit = windows == windows.max(axis=(2, 4), keepdims=True)
    order = jnp.arange(kh * kw, dtype=jnp.int32).reshape(1, 1, kh, 1, kw, 1)
    ranked = jnp.where(hit, order, kh * kw)
    first = hit & (ranked == ranked.min(axis=(2, 4), keepdims=True))
    dx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    return (dx.reshape(x.shape),)


_pool.defvjp(_pool_fwd, _pool_bwd)


Padding = tuple[tuple[int, int], tuple[int, int]]


def max_pool(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    padding: Padding = ((0, 0), (0, 0)),
) -> jax.Array:
    """`nn.max_pool(x, window, strides, padding)` on NHWC `x`, with `padding` as
    `((top, bottom), (left, right))` (padded positions never win a window)."""
    return _strided(x, tuple(window), tuple(strides), tuple(map(tuple, padding)))


def _padded(x: jax.Array, window, strides, padding) -> tuple[jax.Array, tuple[int, int]]:
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    out_hw = tuple((xp.shape[1 + a] - window[a]) // strides[a] + 1 for a in (0, 1))
    return xp, out_hw


def _maximum(views: list[tuple[int, int, jax.Array]]) -> jax.Array:
    out = views[0][2]
    for _, _, v in views[1:]:
        out = jnp.maximum(out, v)
    return out


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _strided(x: jax.Array, window, strides, padding) -> jax.Array:
    xp, out_hw = _padded(x, window, strides, padding)
    return _maximum(list(window_views(xp, window, strides, out_hw)))


def _strided_fwd(x, window, strides, padding):
    return _strided(x, window, strides, padding), x


def _strided_bwd(window, strides, padding, x, g):
    # The barrier as in `_pool_bwd`: every read of `x` must see the same values.
    xp, out_hw = _padded(jax.lax.optimization_barrier(x), window, strides, padding)
    views = list(window_views(xp, window, strides, out_hw))
    out = _maximum(views)
    # Each window's first maximum, as its offset's index (none: len(views)), kept in memory:
    # fused into the sum below, it would be recomputed for every share of every position.
    first = jnp.full(out.shape, len(views), jnp.int8)
    for k in reversed(range(len(views))):
        first = jnp.where(views[k][2] == out, jnp.int8(k), first)
    first = jax.lax.optimization_barrier(first)
    zero = jnp.zeros((), g.dtype)
    dxp = jnp.zeros(xp.shape, g.dtype)
    # An input position receives from windows in row-major order, which is offsets in reverse.
    for k in reversed(range(len(views))):
        i, j, _ = views[k]
        place = [
            (off, xp.shape[1 + a] - off - span, strides[a] - 1)
            for a, (off, span) in enumerate(zip((i, j), window_spans(strides, out_hw), strict=True))
        ]
        share = jnp.where(first == k, g, zero)
        dxp = dxp + jax.lax.pad(share, zero, [(0, 0, 0), *place, (0, 0, 0)])
    (top, _), (left, _) = padding
    return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


_strided.defvjp(_strided_fwd, _strided_bwd)
