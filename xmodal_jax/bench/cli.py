"""`xmodal bench`: measure the machine's ceilings, then our train steps against them.

    xmodal bench [--small] [--json PATH] [--workloads clip,resnet50,mnv2_dann,lenet_dann,pipeline]
                 [--torch] [--steps N] [--batch N] [--dtype float32|bfloat16]
                 [--scan] [--remat none|dots|full] [--profile]
                 [--depthwise auto|conv|shift|shift_vjp]
                 [--ablations scan_remat,donation,bf16,depthwise,residuals,max_pool,
                                conv_forms,cpu_backends,malloc|all]
                 [--ablations fsdp,max_batch [--memory-gib G]]   # for an accelerator

Per workload: compile time, median step time over `--steps` timed steps after warm-up, examples/s,
FLOPs per step from XLA's cost analysis, achieved FLOP/s, MFU against the matmul peak measured in
the same run (float32 or bfloat16, as the step computes), and the peak memory of XLA's buffer plan.
`--scan` and `--remat` set the CLIP step's layer stacks (`nn.scan`, remat policy; the other
steps have none), as a model config's `scan_layers` and `remat_policy` do.
With `--torch`, the same step in PyTorch eager and `torch.compile`, timed in rounds alternating
with ours in this process; `speedup_vs_*` is their step time over ours.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from xmodal_jax.bench.names import ABLATIONS, ACCELERATOR_ABLATIONS, STEPS
from xmodal_jax.errors import UserError

WORKLOADS = (*STEPS, "pipeline")


def _names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UserError(
            f"Unknown {what} {unknown or [text]}; choose from {', '.join(valid)} "
            f"(comma-separated, e.g. --{what} {valid[0]})."
        )
    return names


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal bench", description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="tiny sizes: the whole run in seconds")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=",".join(WORKLOADS))
    p.add_argument("--torch", action="store_true", help="time PyTorch eager and torch.compile")
    p.add_argument("--steps", type=int, default=20, help="timed steps per workload (>= 1)")
    p.add_argument("--rounds", type=int, default=4, help="alternation rounds with --torch")
    p.add_argument("--batch", type=int, default=None, help="batch of every train step")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--profile",
        action="store_true",
        help="trace 3 more steps of each workload: the ops that take the most time",
    )
    p.add_argument("--scan", action="store_true", help="clip: layer stacks with nn.scan")
    p.add_argument("--remat", default="none", choices=("none", "dots", "full"),
                   help="clip: remat policy of each layer")  # fmt: skip
    p.add_argument("--depthwise", default="auto", choices=("auto", "conv", "shift", "shift_vjp"),
                   help="mnv2_dann: MobileNetV2's depthwise form")  # fmt: skip
    p.add_argument(
        "--ablations",
        default="",
        help=f"{','.join(ABLATIONS)} or all; also {','.join(ACCELERATOR_ABLATIONS)}",
    )
    p.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="max_batch: the memory to fit (default: the device's own limit)",
    )
    return p


def run(argv: list[str]) -> dict[str, Any]:
    """Parses `argv` (the arguments after `bench`), runs the benchmark, prints a table."""
    args = _parser().parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or (args.batch is not None and args.batch < 1):
        raise UserError("--steps, --rounds and --batch must be positive integers.")
    names = _names(args.workloads, WORKLOADS, "workloads")
    ablation_names = []
    if args.ablations:
        ablation_names = (
            list(ABLATIONS)
            if args.ablations == "all"
            else _names(args.ablations, (*ABLATIONS, *ACCELERATOR_ABLATIONS), "ablations")
        )
    import jax.numpy as jnp  # after parsing: `--help` and a bad argument need no JAX

    from xmodal_jax.bench import ablations, ceilings, pipelines, report, runner

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    results: dict[str, Any] = {
        "machine": runner.machine(),
        "command": " ".join(["xmodal bench", *argv]),
    }
    results["ceilings"] = peaks = ceilings.measure_all(args.small)
    report.print_ceilings(results)
    results["workloads"] = {}
    for name in names:
        if name == "pipeline":
            batch, batches = (8, 20) if args.small else (64, 40)
            results["workloads"][name] = {"batch": batch, **pipelines.measure(batch, batches)}
        else:
            layers = {"scan": args.scan, "remat": args.remat}
            variant = layers if name == "clip" and (args.scan or args.remat != "none") else {}
            if name == "mnv2_dann" and args.depthwise != "auto":
                variant = {"depthwise": args.depthwise}
            results["workloads"][name] = runner.run_step(name, args, peaks, dtype, **variant)
        report.print_workload(name, results["workloads"][name])
        _save(results, args.json)
    results["ablations"] = {}
    for name in ablation_names:

        def keep(partial: dict, name: str = name) -> None:
            results["ablations"][name] = partial
            _save(results, args.json)

        results["ablations"][name] = ablations.run(name, args, peaks, keep)
        report.print_ablation(name, results["ablations"][name])
        _save(results, args.json)
    _save(results, args.json)
    if args.json:
        print(f"Wrote {args.json}")
    return results


def _save(results: dict, path: str | None) -> None:
    """Writes what is measured so far, so an interrupted run keeps its finished workloads."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
