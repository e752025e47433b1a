"""Where a train step's time goes: a `jax.profiler` trace of a few steps, summarised as the ops
that took the most time (`xmodal bench --profile`).

The trace is written in Perfetto's JSON form (`create_perfetto_trace=True`) to a temporary
folder and read back: every complete event ("ph": "X") of the device's HLO-op timeline
(processes named `/device:...`, their "XLA Ops" line, which the program, step and kernel lines
beside it would count again; without one, the lines that are not such spans) or, on a CPU, of
XLA's worker threads, summed by op name;
runtime wrappers that contain the ops (waits, thread-pool awaits, the Python side) are left out.
On an accelerator the shares are of the time spent in ops. On a CPU they are of the traced
steps' wall time times the usable cores, and what no op's event covers is a row of its own
(`UNTRACED`): XLA:CPU's own convolutions run as Eigen tasks that the trace does not show (a
convolution's event ends when it has handed its work to Eigen's threads), so without that row
an XLA-convolution step's shares would be of the ops around its convolutions only. That row
also holds the time cores were idle and what the tracing itself cost. Only the summary is kept.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

# Events that wrap ops or wait for them rather than compute (XLA:CPU's thunk runtime).
WRAPPERS = ("ThunkExecutor::", "SlinkyThreadPool::", "end: ")
# A device's timelines: its HLO ops ("XLA Ops"), and beside them lines that span or repeat them
# (whole programs, steps, framework ops, the kernels of the GPU's streams).
DEVICE_OPS = "XLA Ops"
DEVICE_SPANS = ("XLA Modules", "Steps", "Framework Ops", "TensorFlow Ops", "TensorFlow Name Scope",
                "Launch Stats", "Source code")  # fmt: skip
# The row of a CPU profile for the cores' time in no traced op (see the module docstring).
UNTRACED = "(in no traced op: Eigen's tasks, such as XLA's convolutions, and idle cores)"


def trace(step: Callable[[], None], steps: int, folder: str) -> tuple[str, float]:
    """Runs `step` `steps` times under the profiler: the Perfetto trace file written and the
    steps' wall time in seconds."""
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
    return max(paths, key=os.path.getmtime), wall


def _metadata(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("ph") == "M" and e.get("name") == kind]


def top_ops(
    path: str, k: int | None = 15, cpu_capacity_ms: float | None = None
) -> list[dict[str, Any]]:
    """The `k` ops (None: all) with the most time in the trace at `path`: name, total ms, share
    and how many times it ran. The shares are of the time of every op counted; for a CPU trace
    with `cpu_capacity_ms` (the steps' wall time times the usable cores), of that, with a row
    `UNTRACED` for the rest (none where the ops' events add up to more, as when more threads
    than cores ran ops)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in _metadata(events, "process_name")}
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in _metadata(events, "thread_name")
    }
    on_device = any(str(n).startswith("/device:") for n in processes.values())
    device_lines = {
        key: str(name)
        for key, name in threads.items()
        if str(processes.get(key[0], "")).startswith("/device:")
    }
    ops_lines = {key for key, name in device_lines.items() if name == DEVICE_OPS}

    def counted(e: dict) -> bool:
        if e.get("ph") != "X" or str(e.get("name", "")).startswith(WRAPPERS):
            return False
        key = (e["pid"], e.get("tid"))
        if on_device:  # the "XLA Ops" lines where there are, else the lines of no span
            if not str(processes.get(e["pid"], "")).startswith("/device:"):
                return False
            if ops_lines:
                return key in ops_lines
            return not device_lines.get(key, "").startswith(DEVICE_SPANS)
        return str(threads.get(key, "")).startswith("tf_XLA")

    time_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in filter(counted, events):
        time_us[e["name"]] += float(e.get("dur", 0.0))
        calls[e["name"]] += 1
    traced = sum(time_us.values())
    if not on_device and cpu_capacity_ms is not None:
        if (rest := cpu_capacity_ms * 1e3 - traced) > 0:
            time_us[UNTRACED] = rest
        traced = max(traced, cpu_capacity_ms * 1e3)
    total = traced or 1.0
    return [
        {"name": name, "ms": us / 1e3, "share": us / total, "calls": calls[name]}
        for name, us in time_us.most_common(k)
    ]


def by_kind(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ops` summed by kind, the op name without XLA's numeric suffix (`dot.92` -> `dot`)."""
    kinds: dict[str, dict[str, Any]] = {}
    for op in ops:
        kind = op["name"] if op["name"] == UNTRACED else op["name"].split(".")[0]
        row = kinds.setdefault(kind, {"name": kind, "ms": 0.0, "share": 0.0, "calls": 0})
        for key in ("ms", "share", "calls"):
            row[key] += op[key]
    return sorted(kinds.values(), key=lambda r: -r["ms"])


def profile_step(step: Callable[[], None], steps: int = 3, k: int = 15) -> dict[str, Any]:
    """For `steps` calls of `step` (a warmed-up, blocking train step): the `k` ops with the most
    time (`top_ops`) and every op summed by kind (`by_kind`, top `k`); on a CPU the shares are
    of the steps' wall time times the usable cores (`wall_ms`, `cores`)."""
    with tempfile.TemporaryDirectory() as folder:
        path, wall = trace(step, steps, folder)
        out: dict[str, Any] = {"steps": steps}
        capacity = None
        if jax.default_backend() == "cpu":
            cores = len(os.sched_getaffinity(0))
            out |= {"wall_ms": wall * 1e3, "cores": cores}
            capacity = wall * 1e3 * cores
        ops = top_ops(path, None, capacity)  # read the trace once: it can be large
        out["top_ops"] = ops[:k]
        out["by_kind"] = by_kind(ops)[:k]
        return out
