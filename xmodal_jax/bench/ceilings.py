"""The machine's ceilings, measured in the same run as the workloads: dense matmul FLOP/s in
float32 and bfloat16 (one large `jnp.dot`) and memory bandwidth (one large elementwise copy)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xmodal_jax.bench import measure

# Best of 20 products: on a 2-core CPU the best of 5 fell short of the machine's rate by up to a
# sixth in one run of 5 and not in the next, which moved every MFU of a run with it.
MATMUL_REPEATS = 20


def matmul_flops_per_s(n: int, dtype: jnp.dtype, repeats: int = MATMUL_REPEATS) -> float:
    """Best FLOP/s of an `n x n @ n x n` product in `dtype` (2 n^3 FLOPs per call)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    jax.block_until_ready(dot(a, b))
    seconds = measure.time_calls(lambda: jax.block_until_ready(dot(a, b)), repeats)
    return 2.0 * n**3 / min(seconds)


def copy_bytes_per_s(num_bytes: int, repeats: int = 5) -> float:
    """Best bandwidth of `y = x + 1` over a float32 array of `num_bytes` (read + write)."""
    x = jnp.zeros((num_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0).lower(x).compile()
    jax.block_until_ready(copy(x))
    seconds = measure.time_calls(lambda: jax.block_until_ready(copy(x)), repeats)
    return 2.0 * x.nbytes / min(seconds)


def measure_all(small: bool) -> dict[str, float]:
    """`{'matmul_f32_flops', 'matmul_bf16_flops', 'copy_bytes_per_s'}` at the run's size.

    Accelerators get an 8192-wide product so that one call outlasts its dispatch overhead."""
    cpu = jax.default_backend() == "cpu"
    n = 512 if small else (2048 if cpu else 8192)
    mib = 16 if small else (512 if cpu else 2048)
    size = mib << 20
    return {
        "matmul_n": n,
        "matmul_repeats": MATMUL_REPEATS,
        "matmul_f32_flops": matmul_flops_per_s(n, jnp.float32),
        "matmul_bf16_flops": matmul_flops_per_s(n, jnp.bfloat16),
        "copy_bytes": size,
        "copy_bytes_per_s": copy_bytes_per_s(size),
    }
