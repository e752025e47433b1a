"""`xmodal bench --ablations conv_forms`: ResNet-50's 3x3 convolutions lowered three ways, and
the matrix product of the same size, forward and backward, side by side.

For each of ResNet-50's four stride-1 3x3 convolution shapes (56x56x64 ... 7x7x512 at the run's
`--batch`; `--small`: two tiny ones), one jitted call computes the output and, through `jax.vjp`,
the gradients of the input and of the kernel for a fixed output gradient, in each form:
- `xla`: `lax.conv_general_dilated` in NHWC/HWIO, as the models write it;
- `nchw`: the same convolution in NCHW/OIHW, the layout PyTorch's kernels take;
- `im2col`: the 9 shifted windows of the padded input concatenated on the channel axis and one
  matrix product `[B*H*W, 9C] @ [9C, C]` (the lowering whose product runs at the machine's
  GEMM rate, at the cost of a patch matrix 9x the input);
- `gemm`: the product of exactly that size on the input tiled 9 times (no windows), not a
  convolution: the rate of XLA's matrix product at that size, its operand built by a plain
  copy instead of `im2col`'s windows.
The forms are timed alternating in rounds (`runner.alternate`), each as GFLOP/s (3 products of
2*B*H*W*9*C*C FLOPs) and as a share of the run's float32 matmul ceiling; `nchw` and `im2col`
report their largest difference to `xla` over the output and both gradients, relative to the
largest `xla` value. It asks whether XLA:CPU's convolutions fall short of its matrix products,
which a GEMM lowering of the convolutions would then recover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xmodal_jax.bench import ablations, runner

# (height = width, channels) of ResNet-50's stride-1 3x3 convolutions, stage by stage.
SHAPES = ((56, 64), (28, 128), (14, 256), (7, 512))
SMALL_SHAPES = ((8, 8), (4, 16))
KERNEL = 3


def xla(x: jax.Array, w: jax.Array) -> jax.Array:
    dims = ("NHWC", "HWIO", "NHWC")
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)


def nchw(x: jax.Array, w: jax.Array) -> jax.Array:
    y = lax.conv_general_dilated(
        jnp.transpose(x, (0, 3, 1, 2)),
        jnp.transpose(w, (3, 2, 0, 1)),
        (1, 1),
        "SAME",
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
    )
    return jnp.transpose(y, (0, 2, 3, 1))


def im2col(x: jax.Array, w: jax.Array) -> jax.Array:
    """A stride-1 'SAME' convolution with an odd square kernel as one matrix product."""
    k, _, c_in, c_out = w.shape
    b, h, wd, _ = x.shape
    p = k // 2
    padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = [padded[:, i : i + h, j : j + wd, :] for i in range(k) for j in range(k)]
    patches = jnp.concatenate(windows, axis=-1).reshape(b * h * wd, k * k * c_in)
    return (patches @ w.reshape(k * k * c_in, c_out)).reshape(b, h, wd, c_out)


def gemm(x: jax.Array, w: jax.Array) -> jax.Array:
    """Not a convolution: the product of `im2col`'s size on the input tiled k*k times."""
    k, _, c_in, c_out = w.shape
    b, h, wd, _ = x.shape
    tiled = jnp.tile(x, (1, 1, 1, k * k)).reshape(b * h * wd, k * k * c_in)
    return (tiled @ w.reshape(k * k * c_in, c_out)).reshape(b, h, wd, c_out)


FORMS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "xla": xla,
    "nchw": nchw,
    "im2col": im2col,
    "gemm": gemm,
}
CONVOLUTIONS = ("xla", "nchw", "im2col")  # the forms that compute the convolution


def _forward_backward(form: Callable, dy: jax.Array) -> Callable:
    def call(x, w):
        y, vjp = jax.vjp(form, x, w)
        return (y, *vjp(dy))

    return jax.jit(call)


def ablation(args, peaks: dict) -> dict[str, Any]:
    """Per shape and form: median ms of output + both gradients, GFLOP/s, share of the float32
    matmul ceiling, and (convolutions) the largest difference to `xla`."""
    batch = args.batch or 4
    out: dict[str, Any] = {"batch": batch}
    rng = np.random.default_rng(0)
    for hw, c in SMALL_SHAPES if args.small else SHAPES:
        x = jnp.asarray(rng.standard_normal((batch, hw, hw, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((KERNEL, KERNEL, c, c)) / (3 * c**0.5), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((batch, hw, hw, c)), jnp.float32)
        calls, results = {}, {}
        for name, form in FORMS.items():
            fn = _forward_backward(form, dy)
            results[name] = jax.block_until_ready(fn(x, w))
            calls[name] = lambda fn=fn, x=x, w=w: jax.block_until_ready(fn(x, w))
        medians = runner.alternate(calls, args.steps, args.rounds)
        flops = 3 * 2 * batch * hw * hw * KERNEL * KERNEL * c * c
        row = {}
        for name, seconds in medians.items():
            row[name] = {
                "ms": seconds * 1e3,
                "gflops": flops / seconds / 1e9,
                "of_matmul_peak": flops / seconds / peaks["matmul_f32_flops"],
            }
            if name in CONVOLUTIONS and name != "xla":
                diff = ablations.max_rel_diff(results["xla"], results[name])
                row[name]["max_rel_diff_vs_xla"] = diff
        out[f"{hw}x{hw}x{c}"] = row
    return out
