"""Wall time of the quick start from nothing (a fresh TFDS data directory, feature cache and
workdir; the package installed), split by phase, as a record:
`benchmarks/results/quickstart_timing.json`.

    .venv/bin/python benchmarks/quickstart_timing.py benchmarks/results/quickstart_timing.json
    make tables   # renders quickstart_timing.md beside it; the README embeds that table

The run is `xmodal train --config experiments/quickstart.py` in a new process; its phases are
the `timing.json` the trainer writes (`xmodal_jax/timing.py`), the process total is measured
around it (Python and JAX start-up included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from xmodal_jax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TFDS_DATA_DIR=os.path.join(tmp, "tfds"))
        env["XMODAL_CACHE"] = os.path.join(tmp, "cache")
        workdir = os.path.join(tmp, "quickstart")
        cmd = [sys.executable, "-m", "xmodal_jax.main", "train", "--config",
               "experiments/quickstart.py", "--workdir", workdir]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        with open(os.path.join(workdir, "timing.json")) as f:
            phases = json.load(f)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
    record = {
        "kind": "quickstart_timing",
        "command": f"python benchmarks/quickstart_timing.py {os.path.relpath(path, ROOT)}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": provenance.cpu_model(),
        "usable_cpus": provenance.usable_cpus(),
        "git": provenance.git_state(ROOT),
        "versions": provenance.versions(),
        "wall_s": wall,
        "phases_s": phases,
        "unseen_accuracy": summary["eval/zeroshot_unseen/accuracy"],
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"quick start {wall:.1f} s -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
