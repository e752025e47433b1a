"""`materialized_cotangent`: an identity that makes XLA:CPU compute a residual stream's gradient
once per block instead of once per consumer.

In the backward pass of a deep residual stack, the gradient at block `l`'s residual point is the
gradient at block `l + 1`'s plus elementwise terms (the branches' LayerNorm backward). Each of
these is an elementwise op, which XLA:CPU's fusion pass counts as cheap and duplicates into every
consumer that can fuse it: the transposed copies feeding the weight gradients, the bias
gradients' reductions, the next block's terms. So each consumer recomputes the chain from the top
of the stack down to its block, and the work grows with the square of the depth
(`xmodal bench --ablations cotangent` measures the CLIP train step both ways: BENCHMARKS.md).

`jax.lax.optimization_barrier` does not stop it: XLA:CPU removes barriers before fusion (XLA:GPU
keeps them until after; openxla/xla `xla/service/cpu/cpu_compiler.cc`). A floating-point division
is an op XLA:CPU's fusion counts as expensive (`xla/service/cpu/cpu_instruction_fusion.cc`,
`IsExpensive`), and it never duplicates an expensive producer into several consumers
(`xla/service/instruction_fusion.cc`). So the backward divides the
cotangent by `x * 0 + 1`: one wherever `x` is finite, so the quotient is the cotangent bit for
bit, and not foldable by XLA, since `x` could be infinite or NaN (where the gradient is not finite
anyway). The chain is then written once per residual point and read by its consumers. The
gradients equal the plain identity's up to float32 rounding (the fusions, not the formulas,
change). Other backends get the plain identity.

Runs recorded before this ran the plain identity on CPU too (a record without `cpu_cotangent` in
its provenance); `XMODAL_CPU_COTANGENT=fused` gives it back, as the regression tier does for them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from xmodal_jax.errors import UserError

CPU_COTANGENT_ENV = "XMODAL_CPU_COTANGENT"
CPU_COTANGENT = ("materialized", "fused")


def cpu_cotangent(environ: Mapping[str, str] | None = None) -> str:
    """What `materialized_cotangent` does on CPU: `materialized` (the default), or `fused` (the
    plain identity, XLA's fusion left as it is) where `$XMODAL_CPU_COTANGENT=fused`."""
    value = (os.environ if environ is None else environ).get(CPU_COTANGENT_ENV) or "materialized"
    if value not in CPU_COTANGENT:
        raise UserError(
            f"${CPU_COTANGENT_ENV}={value!r} is not a CPU cotangent setting: use one of "
            f"{CPU_COTANGENT}, or unset it for the default ({CPU_COTANGENT[0]!r})."
        )
    return value


@jax.custom_vjp
def _divided(x: jax.Array) -> jax.Array:
    return x


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, x


def _backward(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (g / (x * 0 + 1).astype(g.dtype),)


_divided.defvjp(_forward, _backward)


def materialized_cotangent(x: jax.Array) -> jax.Array:
    """`x`, whose gradient XLA:CPU computes once and stores instead of recomputing it in each of
    its consumers (see the module docstring); the plain identity on other backends and where
    `cpu_cotangent()` is `fused`."""
    if jax.default_backend() != "cpu" or cpu_cotangent() == "fused":
        return x
    return _divided(x)
