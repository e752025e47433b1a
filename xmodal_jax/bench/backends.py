"""Ablation `cpu_backends`: XLA:CPU's kernel libraries for the train steps.

XLA reads its flags once, when it starts, so each backend runs in a process of its own
(`python -m xmodal_jax.bench.backends`, the flag appended to the user's `XLA_FLAGS`); the
backends take turns, round after round, so that a machine's drift falls on all of them alike.
`default` is XLA's own (the project's `xla_defaults` switched off in these processes), so
`no_ynn_conv` measures the project's default against it. Numerics: the first train step's
parameter update of each backend against the default's (largest |difference| over the largest
|update|, as the depthwise ablation reports it; with AdamW, as CLIP trains, the first update is
about lr times the sign of the gradient, so a near-zero gradient that changes sign moves it by
up to 2 lr).
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

from xmodal_jax import xla_defaults

# The train steps; `--workloads` picks among them.
WORKLOADS = ("resnet50", "mnv2_dann", "lenet_dann", "clip")
BACKENDS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    # Convolutions run by XLA itself, not handed to YNNPACK: the project's default on CPU.
    "no_ynn_conv": xla_defaults.FLAG,
}


def env_for(backend: str) -> dict[str, str]:
    """This process's environment with `backend`'s flag appended to the user's `XLA_FLAGS`,
    and the project's own XLA default off: each backend is measured against XLA's default
    (`no_ynn_conv` is the project's default, `xla_defaults`)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(xla_defaults.FLAG, "")
    env["XLA_FLAGS"] = " ".join(filter(None, [flags.strip(), BACKENDS[backend]]))
    env[xla_defaults.OFF_ENV] = "off"
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
