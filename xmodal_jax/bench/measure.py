"""Counters behind `xmodal bench`: compile a jitted step ahead of time, read XLA's FLOP count and
memory plan of the compiled executable, time steps with the device work finished each time.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

from xmodal_jax.errors import UserError


@dataclasses.dataclass
class Compiled:
    """A compiled step with what XLA says about it before it runs."""

    fn: Any  # jax.stages.Compiled
    compile_s: float
    flops: float | None  # per call, from cost analysis
    peak_bytes: int | None  # from memory analysis
    flops_source: str = "compiled"  # which cost analysis `flops` comes from


def flops_of(compiled: Any) -> float | None:
    """FLOPs of one call of `compiled` (a `jax.stages.Compiled`) from XLA's cost analysis."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def peak_bytes_of(compiled: Any) -> int | None:
    """Bytes live at once while `compiled` runs: its buffer plan (arguments + outputs - donated,
    aliased buffers + temporaries, activations included), or XLA's own peak where that is larger.

    XLA:CPU's `peak_memory_in_bytes` counts about the arguments only (a ResNet-50 step's stayed
    flat from batch 2 to 16 while its temporaries grew), so it alone is not the step's peak."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if m is None:
        return None
    plan = int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return max(plan, int(getattr(m, "peak_memory_in_bytes", 0) or 0))


def plausible_flops(compiled: float | None, lowered: float | None) -> tuple[float | None, str]:
    """`(flops, source)`: the compiled program's count, or the lowered one's where the compiled
    count is missing or below half of it (XLA's optimisations do not remove that much work;
    GPU cost analyses have returned -1 or per-output counts for library GEMM calls, e.g.
    jax-ml/jax#16008 and #22249)."""
    if compiled is not None and (lowered is None or compiled >= 0.5 * lowered):
        return compiled, "compiled"
    return lowered, "lowered" if lowered is not None else "none"


def fused_instructions(hlo_text: str) -> int:
    """Instructions in the fused computations of a compiled program's HLO text
    (`jax.stages.Compiled.as_text()`), each counted as often as a fusion calls it: where the
    fusion pass duplicates producers into several consumers, this counts every copy
    (`models/residuals.py`)."""
    sizes: dict[str, int] = {}
    name = None
    for line in hlo_text.splitlines():
        if name is None:
            head = re.match(r"%?([\w.-]+) \(.*\) -> .* \{$", line)
            if head:
                name = head.group(1)
                sizes[name] = 0
        elif line.startswith("}"):
            name = None
        elif line.strip():
            sizes[name] += 1
    return sum(sizes.get(c, 0) for c in re.findall(r" fusion\(.*?calls=%?([\w.-]+)", hlo_text))


def compile_jit(jitted: Any, *args: Any) -> Compiled:
    """Lower and compile `jitted` for `args` (arrays or ShapeDtypeStructs), timing it."""
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    flops, source = plausible_flops(flops_of(compiled), flops_of(lowered))
    return Compiled(compiled, seconds, flops, peak_bytes_of(compiled), source)


def time_calls(call: Callable[[], Any], steps: int) -> list[float]:
    """Wall seconds of `steps` calls of `call`, each waited for (`call` must block)."""
    out = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mfu(achieved_flops_per_s: float | None, peak_flops_per_s: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak FLOP/s (None when either is unknown)."""
    if not achieved_flops_per_s or not peak_flops_per_s:
        return None
    if peak_flops_per_s < 0 or achieved_flops_per_s < 0:
        raise UserError("FLOP rates must be positive; check the measured peak.")
    return achieved_flops_per_s / peak_flops_per_s


class StepRunner:
    """Runs a compiled `(state, batch) -> (state, metrics)` step on device-resident inputs,
    threading the (possibly donated) state, with host transfers disallowed inside the loop."""

    def __init__(self, compiled: Compiled, state: Any, batch: Any):
        self.compiled, self.state, self.batch = compiled, state, batch

    def step(self) -> None:
        with jax.transfer_guard("disallow"):
            self.state, metrics = self.compiled.fn(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
