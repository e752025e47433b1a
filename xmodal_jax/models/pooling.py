"""Max pooling over windows that tile the image (stride = window, no padding), with the gradient
computed elementwise.

`nn.max_pool`'s gradient is XLA's select-and-scatter, which is slow on XLA:CPU: about half of
the LeNet + DANN train step on 2 cores (`xmodal bench --ablations max_pool`). When the
windows do not overlap, every input position belongs to one window and receives either that
window's gradient or zero, so the same gradient is a compare and a select: the position gets it
iff it holds the window's first maximum in row-major order, which is the position
select-and-scatter chooses. Values and gradients equal `nn.max_pool`'s bit for bit
(tests/test_pooling.py); overlapping or padded windows (ResNet's stem) stay with `nn.max_pool`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


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
