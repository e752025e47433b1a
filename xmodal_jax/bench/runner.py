"""Timing of our train steps, alone or alternating with the PyTorch references."""

from __future__ import annotations

import datetime
import os
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax import provenance, xla_defaults
from xmodal_jax.bench import measure, workloads
from xmodal_jax.models import layers, residuals

WARMUP = 2


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was."""
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": provenance.cpu_model(),
        "cpu_simd": provenance.cpu_simd(),  # the widest vector extension: AVX2, AVX-512, ...
        "cpu_family": provenance.cpu_family(),  # x86: tells generations behind one name apart
        "cores": len(os.sched_getaffinity(0)),
        "loadavg_1_5_15": list(os.getloadavg()),
        "backend": jax.default_backend(),
        "device": dev.device_kind,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_convolutions": xla_defaults.cpu_convolutions(),
        "cpu_depthwise": layers.cpu_depthwise(),  # what depthwise='auto' runs on CPU
        "cpu_residuals": residuals.cpu_residuals(),  # residual streams on CPU
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # malloc_defaults
    }


def alternate(runners: dict[str, Any], steps: int, rounds: int) -> dict[str, float]:
    """Median step seconds of each `() -> None` runner, timed in `rounds` alternating rounds.

    With several runners, each one's turn in a round starts with an untimed step: the first
    step after another runner's pays for the state that runner left in the shared process (with
    PyTorch beside us and huge-page malloc, our ResNet-50 step at batch 16 ran measurably slower
    for a step or two after PyTorch's, and PyTorch's did not after ours), which is not the cost
    of the step itself. Each runner is then timed in its steady state, as a process of its own
    would run it."""
    for call in runners.values():
        for _ in range(WARMUP):
            call()
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_round = [steps // rounds + (i < steps % rounds) for i in range(rounds)]
    for n in per_round:
        for k, call in runners.items():
            if n and len(runners) > 1:
                call()  # untimed: the step after the switch
            times[k] += measure.time_calls(call, n)
    return {k: measure.median(v) for k, v in times.items()}


def _summary(built: workloads.Built, step_s: float, peak: float, peak_name: str) -> dict:
    c = built.runner.compiled
    achieved = c.flops / step_s if c.flops else None
    return {
        "compile_s": c.compile_s,
        "step_s": step_s,
        "examples_per_step": built.examples_per_step,
        "examples_per_s": built.examples_per_step / step_s,
        "flops_per_step": c.flops,
        "flops_source": c.flops_source,  # compiled, lowered or unrolled (measure, workloads)
        "achieved_flops_per_s": achieved,
        "mfu": measure.mfu(achieved, peak),
        "mfu_peak": peak_name,
        "peak_bytes": c.peak_bytes,
        "params": built.params,
        "host_transfers_in_loop": "none (jax.transfer_guard('disallow'))",
    }


def run_step(
    name: str, args, peaks: dict, dtype: Any, with_torch: bool = True, **variant: Any
) -> dict[str, Any]:
    """Our step for `name` (and with `--torch` the references, alternating); its figures."""
    sz = workloads.sizes(name, args.small, args.batch)
    built = workloads.build(name, sz, dtype=dtype, **variant)
    runners = {"ours": built.runner.step}
    refs = {}
    if args.torch and with_torch:
        from xmodal_jax.bench import torch_ref

        torch_ref.set_threads(torch_ref.cores())
        bf16 = dtype == jnp.bfloat16
        for kind, compiled in (("torch_eager", False), ("torch_compile", True)):
            try:
                device = torch_ref.device_for(jax.default_backend())
                refs[kind] = torch_ref.Runner(name, sz, compiled, bf16, str(device))
                runners[kind] = refs[kind].step
            except Exception as e:  # noqa: BLE001 - a failed reference is reported, not fatal
                refs[kind] = e
    medians = alternate(runners, args.steps, args.rounds if len(runners) > 1 else 1)
    peak_name = "matmul_bf16_flops" if dtype == jnp.bfloat16 else "matmul_f32_flops"
    out = _summary(built, medians["ours"], peaks[peak_name], peak_name)
    out["sizes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sz.items()}
    out["dtype"] = jnp.dtype(dtype).name
    if variant:
        out["variant"] = dict(variant)
    if stats := jax.devices()[0].memory_stats():  # accelerators: the allocator's own figures
        keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
        out["device_memory"] = {k: stats[k] for k in keys if k in stats}
    if getattr(args, "profile", False):
        from xmodal_jax.bench import profile

        out["profile"] = profile.profile_step(built.runner.step)
    for kind, ref in refs.items():
        if isinstance(ref, Exception):
            out[kind] = {"error": f"{type(ref).__name__}: {str(ref)[:200]}"}
            continue
        out[kind] = {
            "compile_s": ref.compile_s,
            "step_s": medians[kind],
            "examples_per_s": built.examples_per_step / medians[kind],
            "speedup": medians[kind] / medians["ours"],
            "device": str(ref.device),
        }
    return out
