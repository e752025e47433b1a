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
import resource
import subprocess
import sys
import tempfile
from collections.abc import Mapping
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
    out = {"step_s": times, "compile_s": built.runner.compiled.compile_s}
    out["fused_instructions"] = measure.fused_instructions(built.runner.compiled.fn.as_text())
    out["max_rss_mib"] = _peak_rss_mib()
    print(json.dumps(out))


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's `VmHWM` is this program's own; getrusage's
    `ru_maxrss` survives exec, so a child forked from a large parent would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(env: Mapping[str, str], workload: str, args, updates: str | None) -> dict[str, Any]:
    """One workload's train step in a process of its own under `env`: its step times, compile
    seconds and peak resident memory, its first update saved to `updates` (.npz) if given."""
    cmd = [sys.executable, "-m", "xmodal_jax.bench.backends", "--workload", workload]
    cmd += ["--steps", str(max(args.steps // max(args.rounds, 1), 2))]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.small:
        cmd.append("--small")
    if updates:
        cmd += ["--updates", updates]
    done = subprocess.run(cmd, env=dict(env), capture_output=True, text=True)
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
    """`compare` over the backends (`flags`: each one's XLA flag)."""
    envs = {backend: env_for(backend) for backend in BACKENDS}
    return {"flags": dict(BACKENDS), **compare(envs, args, workloads)}


def compare(
    envs: Mapping[str, Mapping[str, str]], args, workloads: tuple[str, ...]
) -> dict[str, Any]:
    """Per workload and variant (a process environment; the first is the reference, named
    `default`): median step seconds over the rounds, the first step's compile seconds, the
    largest peak resident memory, the instructions in the program's fusions
    (`measure.fused_instructions`), and the first update's distance to the reference's. The
    variants take turns, round after round, each in a process of its own; each round starts
    one variant later than the one before, so that none always runs first, right after the
    parent's own measurements."""
    out: dict[str, Any] = {"rounds": args.rounds, "rotated": True}  # older records: fixed order
    reference = next(iter(envs))
    order = list(envs)
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[tuple[str, str], list[dict]] = {}
        errors: dict[tuple[str, str], str] = {}
        for round_ in range(args.rounds):
            for workload in workloads:
                shift = round_ % len(order)
                for variant in order[shift:] + order[:shift]:
                    path = os.path.join(tmp, f"{workload}_{variant}.npz") if round_ == 0 else None
                    r = run_child(envs[variant], workload, args, path)
                    if "error" in r:
                        errors[workload, variant] = r["error"]
                    else:
                        runs.setdefault((workload, variant), []).append(r)
        for workload in workloads:
            ref = os.path.join(tmp, f"{workload}_{reference}.npz")
            row = {}
            for variant in envs:
                key = (workload, variant)
                if key in errors or key not in runs:
                    row[variant] = {"error": errors.get(key, "no run finished")}
                    continue
                mine = os.path.join(tmp, f"{workload}_{variant}.npz")
                row[variant] = {
                    "step_s": float(np.median([t for r in runs[key] for t in r["step_s"]])),
                    "compile_s": runs[key][0]["compile_s"],
                    "max_rss_mib": max(r["max_rss_mib"] for r in runs[key]),
                    "fused_instructions": runs[key][0].get("fused_instructions"),
                    "update_max_abs_diff_rel": _max_rel_diff(ref, mine)
                    if os.path.exists(ref) and os.path.exists(mine)
                    else None,
                }
            base = row.get(reference, {}).get("step_s")
            for cell in row.values():
                if base and "step_s" in cell:
                    cell["speed_vs_default"] = base / cell["step_s"]
            out[workload] = row
    return out


if __name__ == "__main__":
    _child(sys.argv[1:])
