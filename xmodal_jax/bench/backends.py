"""Ablation `cpu_backends`: XLA:CPU's kernel libraries for the train steps.

XLA reads its flags once, when it starts, so each backend runs in a process of its own
(`python -m xmodal_jax.bench.backends`, the flag appended to the user's `XLA_FLAGS`); the
backends take turns, round after round, so that a machine's drift falls on all of them alike.
Numerics: the first train step's parameter update of each backend against the default's
(largest |difference| over the largest |update|, as the depthwise ablation reports it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

WORKLOADS = ("resnet50", "mnv2_dann", "clip")  # the train steps; `--workloads` picks among them
BACKENDS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
}


def env_for(backend: str) -> dict[str, str]:
    """This process's environment with `backend`'s flag appended to `XLA_FLAGS`."""
    env = dict(os.environ)
    flags = " ".join(filter(None, [env.get("XLA_FLAGS", ""), BACKENDS[backend]]))
    env["XLA_FLAGS"] = flags
    return env


def _child(argv: list[str]) -> None:
    """In the backend's own process: first update (to `--updates`, .npz) and step times."""
    p = argparse.ArgumentParser()
    p.add_argument("--workload", required=True)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--small", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--updates", default=None)
    args = p.parse_args(argv)

    import jax

    from xmodal_jax.bench import measure, workloads

    built = workloads.build(args.workload, workloads.sizes(args.workload, args.small, args.batch))
    before = jax.device_get(built.runner.state.params)
    built.runner.step()
    after = jax.device_get(built.runner.state.params)
    if args.updates:
        pairs = zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
        leaves = {str(i): np.asarray(a, np.float64) - b for i, (a, b) in enumerate(pairs)}
        np.savez(args.updates, **leaves)
    times = measure.time_calls(built.runner.step, args.steps)
    print(json.dumps({"step_s": times, "compile_s": built.runner.compiled.compile_s}))


def _run(backend: str, workload: str, args, updates: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "xmodal_jax.bench.backends", "--workload", workload]
    cmd += ["--steps", str(max(args.steps // max(args.rounds, 1), 2))]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.small:
        cmd.append("--small")
    if updates:
        cmd += ["--updates", updates]
    done = subprocess.run(cmd, env=env_for(backend), capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        return {"error": f"exit {done.returncode}: {' '.join(tail)}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _max_rel_diff(a: str, b: str) -> float:
    with np.load(a) as x, np.load(b) as y:
        num = max(float(np.max(np.abs(x[k].astype(np.float64) - y[k]))) for k in x.files)
        den = max(float(np.max(np.abs(x[k]))) for k in x.files)
    return num / den


def ablation(args, workloads: tuple[str, ...] = WORKLOADS) -> dict:
    """Per workload and backend: median step seconds over the rounds, the first step's compile
    seconds, and the first update's distance to the default backend's."""
    out: dict[str, Any] = {"flags": dict(BACKENDS), "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        times: dict[tuple[str, str], list[float]] = {}
        compile_s: dict[tuple[str, str], float] = {}
        errors: dict[tuple[str, str], str] = {}
        for round_ in range(args.rounds):
            for workload in workloads:
                for backend in BACKENDS:
                    path = os.path.join(tmp, f"{workload}_{backend}.npz") if round_ == 0 else None
                    r = _run(backend, workload, args, path)
                    if "error" in r:
                        errors[workload, backend] = r["error"]
                        continue
                    times.setdefault((workload, backend), []).extend(r["step_s"])
                    compile_s.setdefault((workload, backend), r["compile_s"])
        for workload in workloads:
            ref = os.path.join(tmp, f"{workload}_default.npz")
            row = {}
            for backend in BACKENDS:
                key = (workload, backend)
                if key in errors:
                    row[backend] = {"error": errors[key]}
                    continue
                mine = os.path.join(tmp, f"{workload}_{backend}.npz")
                row[backend] = {
                    "step_s": float(np.median(times[key])),
                    "compile_s": compile_s[key],
                    "update_max_abs_diff_rel": _max_rel_diff(ref, mine)
                    if os.path.exists(ref) and os.path.exists(mine)
                    else None,
                }
            default = row.get("default", {}).get("step_s")
            for cell in row.values():
                if default and "step_s" in cell:
                    cell["speed_vs_default"] = default / cell["step_s"]
            out[workload] = row
    return out


if __name__ == "__main__":
    _child(sys.argv[1:])
