"""`stored`: an identity that makes XLA:CPU compute a residual stream once per block, its value
in the forward pass and its gradient in the backward, instead of once per consumer.

A residual stack's stream is a chain of elementwise ops: in the forward pass each block's output
is its input plus the branch (after a BatchNorm and ReLU in a ResNet), in the backward pass the
gradient at each residual point is the one above it plus the branch's (LayerNorm's backward in a
transformer). XLA:CPU's fusion pass counts elementwise ops as cheap and duplicates them into
every consumer that can fuse them: the transposed copies feeding the weight gradients, the bias
gradients' reductions, the ReLU masks of the backward pass, the next block's terms. So each
consumer recomputes the chain back to the start of the stack or stage, and the work grows with
the square of the depth (`xmodal bench --ablations residuals` measures the CLIP and ResNet-50
train steps both ways: BENCHMARKS.md).

`jax.lax.optimization_barrier` does not stop it: XLA:CPU removes barriers before fusion (XLA:GPU
keeps them until after; openxla/xla `xla/service/cpu/cpu_compiler.cc`). A floating-point division
is an op XLA:CPU's fusion counts as expensive (`xla/service/cpu/cpu_instruction_fusion.cc`,
`IsExpensive`), and it never duplicates an expensive producer into several consumers
(`xla/service/instruction_fusion.cc`). So `stored` divides the value, and its backward the
gradient, by `x * 0 + 1`: one wherever `x` is finite, so each quotient is its dividend bit for
bit, and not foldable by XLA, since `x` could be infinite or NaN (then the quotient is NaN; the
step is not finite there anyway). Value and gradient are then written once per residual point
and read by their consumers. Results equal the plain identity's up to float32 rounding (the
fusions, not the formulas, change). Other backends get the plain identity.

Runs recorded before this ran the plain identity on CPU too (a record without `cpu_residuals` in
its provenance); `XMODAL_CPU_RESIDUALS=fused` gives it back, as the regression tier does for them.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from xmodal_jax.models import layers

CPU_RESIDUALS_ENV = "XMODAL_CPU_RESIDUALS"
CPU_RESIDUALS = ("stored", "fused")


def cpu_residuals(environ: Mapping[str, str] | None = None) -> str:
    """What `stored` does on CPU: `stored` (the default), or `fused` (the plain identity, XLA's
    fusion left as it is) where `$XMODAL_CPU_RESIDUALS=fused`."""
    return layers.env_choice(CPU_RESIDUALS_ENV, CPU_RESIDUALS, "CPU residuals setting", environ)


def _divided(y: jax.Array, x: jax.Array) -> jax.Array:
    return y / (x * 0 + 1).astype(y.dtype)


@jax.custom_vjp
def _stored(x: jax.Array) -> jax.Array:
    return _divided(x, x)


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _divided(x, x), x


def _backward(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (_divided(g, x),)


_stored.defvjp(_forward, _backward)


def stored(x: jax.Array) -> jax.Array:
    """`x`, which XLA:CPU computes once and stores, and whose gradient it does the same with,
    instead of recomputing either in each of its consumers (see the module docstring); the plain
    identity on other backends and where `cpu_residuals()` is `fused`."""
    if jax.default_backend() != "cpu" or cpu_residuals() == "fused":
        return x
    return _stored(x)
