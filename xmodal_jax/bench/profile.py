"""Where a train step's time goes: a `jax.profiler` trace of a few steps, summarised as the ops
that took the most time (`xmodal bench --profile`).

The trace is written in Perfetto's JSON form (`create_perfetto_trace=True`) to a temporary
folder and read back: every complete event ("ph": "X") of the device's own timelines (processes
named `/device:...`, the GPU streams) or, on a CPU, of XLA's worker threads, summed by op name;
runtime wrappers that contain the ops (waits, thread-pool awaits, the Python side) are left out,
so the shares are of the time spent in ops. Only the summary is kept.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax

# Events that wrap ops or wait for them rather than compute (XLA:CPU's thunk runtime).
WRAPPERS = ("ThunkExecutor::", "SlinkyThreadPool::", "end: ")


def trace(step: Callable[[], None], steps: int, folder: str) -> str:
    """Runs `step` `steps` times under the profiler; the Perfetto trace file written."""
    with jax.profiler.trace(folder, create_perfetto_trace=True):
        for _ in range(steps):
            step()
    paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {folder}")
    return max(paths, key=os.path.getmtime)


def _metadata(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e.get("ph") == "M" and e.get("name") == kind]


def top_ops(path: str, k: int | None = 15) -> list[dict[str, Any]]:
    """The `k` ops (None: all) with the most time in the trace at `path`: name, total ms, share
    of the time of every op counted, and how many times it ran."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in _metadata(events, "process_name")}
    threads = {
        (e["pid"], e.get("tid")): e["args"]["name"] for e in _metadata(events, "thread_name")
    }
    on_device = any(str(n).startswith("/device:") for n in processes.values())

    def counted(e: dict) -> bool:
        if e.get("ph") != "X" or str(e.get("name", "")).startswith(WRAPPERS):
            return False
        if on_device:
            return str(processes.get(e["pid"], "")).startswith("/device:")
        return str(threads.get((e["pid"], e.get("tid")), "")).startswith("tf_XLA")

    time_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in filter(counted, events):
        time_us[e["name"]] += float(e.get("dur", 0.0))
        calls[e["name"]] += 1
    total = sum(time_us.values()) or 1.0
    return [
        {"name": name, "ms": us / 1e3, "share": us / total, "calls": calls[name]}
        for name, us in time_us.most_common(k)
    ]


def by_kind(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`ops` summed by kind, the op name without XLA's numeric suffix (`dot.92` -> `dot`)."""
    kinds: dict[str, dict[str, Any]] = {}
    for op in ops:
        kind = op["name"].split(".")[0]
        row = kinds.setdefault(kind, {"name": kind, "ms": 0.0, "share": 0.0, "calls": 0})
        for key in ("ms", "share", "calls"):
            row[key] += op[key]
    return sorted(kinds.values(), key=lambda r: -r["ms"])


def profile_step(step: Callable[[], None], steps: int = 3, k: int = 15) -> dict[str, Any]:
    """For `steps` calls of `step` (a warmed-up, blocking train step): the `k` ops with the most
    time (`top_ops`) and every op summed by kind (`by_kind`, top `k`)."""
    with tempfile.TemporaryDirectory() as folder:
        path = trace(step, steps, folder)
        return {
            "steps": steps,
            "top_ops": top_ops(path, k),
            "by_kind": by_kind(top_ops(path, k=None))[:k],
        }
