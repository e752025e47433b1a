"""The train step's peak memory two ways, at two batch sizes: XLA's buffer plan (what
`xmodal bench` reports as peak MiB) against the process's resident memory.

    .venv/bin/python benchmarks/memory_check.py benchmarks/results/memory_check.json
    make tables   # renders memory_check.md beside it; BENCHMARKS.md embeds that table

Each (workload, batch) runs in a fresh process: the step is built and compiled (state and
batch resident), the resident set (`VmRSS`) is read, the kernel's high-water mark is reset
(`/proc/self/clear_refs` = 5) and the step runs 3 times; then `VmHWM` is read, and the
process's peak over its whole life (`ru_maxrss`, compilation included). The plan's counterpart
of the first is `outputs - donated aliases + temporaries` (`Compiled.memory_analysis()`), the
arguments being resident before the step; memory that compilation freed but kept resident is
reused by the step, so the resident figure is a lower bound. The growth from the small to the
large batch cancels what both processes share (Python, JAX, the program): that growth of the
process peak against that of the plan is the check. Linux only.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from xmodal_jax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (("resnet50", 2), ("resnet50", 16), ("clip", 2), ("clip", 8))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(name: str, batch: int) -> dict:
    """One case, measured in this process (see the module docstring)."""
    from xmodal_jax.bench import workloads

    built = workloads.build(name, workloads.sizes(name, False, batch))
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        built.runner.step()
    peak = _status_kib("VmHWM")
    m = built.runner.compiled.fn.memory_analysis()
    return {
        "workload": name,
        "batch": batch,
        "plan_peak_bytes": built.runner.compiled.peak_bytes,
        "plan_arguments_bytes": int(m.argument_size_in_bytes),
        "plan_beyond_arguments_bytes": int(
            m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        ),
        "plan_temporaries_bytes": int(m.temp_size_in_bytes),
        "rss_baseline_bytes": 1024 * baseline,
        "rss_step_above_baseline_bytes": 1024 * (peak - baseline),
        "process_peak_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(path: str) -> None:
    cases = []
    for name, batch in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", name, str(batch)],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        cases.append(json.loads(out.stdout.strip().splitlines()[-1]))
        c = cases[-1]
        print(
            f"{name} b{batch}: plan beyond arguments "
            f"{c['plan_beyond_arguments_bytes'] / 2**20:.1f} MiB, resident step peak above "
            f"baseline {c['rss_step_above_baseline_bytes'] / 2**20:.1f} MiB, process peak "
            f"{c['process_peak_bytes'] / 2**20:.1f} MiB"
        )
    record = {
        "kind": "memory_check",
        "command": f"python benchmarks/memory_check.py {os.path.relpath(path, ROOT)}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": provenance.cpu_model(),
        "usable_cpus": provenance.usable_cpus(),
        "git": provenance.git_state(ROOT),
        "versions": provenance.versions(),
        "cases": cases,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
    else:
        main(sys.argv[1])
