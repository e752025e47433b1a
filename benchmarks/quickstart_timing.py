"""Wall time of the quick start from nothing (a fresh TFDS data directory, feature cache and
workdir), split by phase, as a record: `benchmarks/results/quickstart_timing.json`.

    .venv/bin/python benchmarks/quickstart_timing.py --fresh-clone \
        benchmarks/results/quickstart_timing.json
    make tables   # renders quickstart_timing.md beside it; the README embeds that table

The run is `xmodal train --config experiments/quickstart.py` in a new process; its phases are
the `timing.json` the trainer writes (`xmodal_jax/timing.py`), the process total is measured
around it (Python and JAX start-up included). Without `--fresh-clone` it runs this checkout's
installed package. With it, the committed HEAD is cloned into a temporary directory and the
README's first command runs there as two timed steps: `make install` (a new `.venv`, pip's
cache off, so every package is downloaded as on a new machine) and then `make quickstart` (the
install already done: the run alone, `make`'s own start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from xmodal_jax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _timed(cmd: list[str], cwd: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _versions(python: str, cwd: str, env: dict[str, str]) -> dict:
    code = (
        "import json; from xmodal_jax import provenance; print(json.dumps(provenance.versions()))"
    )
    out = subprocess.run([python, "-c", code], cwd=cwd, env=env, check=True, capture_output=True)
    return json.loads(out.stdout)


def main(path: str, fresh_clone: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, TFDS_DATA_DIR=os.path.join(tmp, "tfds"))
        env["XMODAL_CACHE"] = os.path.join(tmp, "cache")
        install = None
        if fresh_clone:
            checkout = os.path.join(tmp, "xmodal_jax")
            subprocess.run(["git", "clone", "-q", ROOT, checkout], check=True)
            env = {k: v for k, v in env.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
            env["PIP_NO_CACHE_DIR"] = "1"
            install = _timed(["make", "install"], checkout, env)
            wall = _timed(["make", "quickstart"], checkout, env)
            workdir = os.path.join(checkout, "workdirs", "quickstart")
        else:
            checkout, workdir = ROOT, os.path.join(tmp, "quickstart")
            cmd = [sys.executable, "-m", "xmodal_jax.main", "train", "--config",
                   "experiments/quickstart.py", "--workdir", workdir]  # fmt: skip
            wall = _timed(cmd, ROOT, env)
        with open(os.path.join(workdir, "timing.json")) as f:
            phases = json.load(f)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        git = provenance.git_state(checkout)
        python = os.path.join(checkout, ".venv", "bin", "python") if fresh_clone else sys.executable
        versions = _versions(python, checkout, env)  # the stack that ran
    flag = "--fresh-clone " if fresh_clone else ""
    record = {
        "kind": "quickstart_timing",
        "command": f"python benchmarks/quickstart_timing.py {flag}{os.path.relpath(path, ROOT)}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": provenance.cpu_model(),
        "usable_cpus": provenance.usable_cpus(),
        "git": git,
        "versions": versions,
        "install_s": install,  # `make install` in the fresh clone; None: not measured
        "wall_s": wall,
        "phases_s": phases,
        "unseen_accuracy": summary["eval/zeroshot_unseen/accuracy"],
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"quick start {wall:.1f} s -> {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="the record to write (JSON)")
    parser.add_argument(
        "--fresh-clone",
        action="store_true",
        help="clone HEAD and time `make install` and `make quickstart` there",
    )
    a = parser.parse_args()
    main(a.path, fresh_clone=a.fresh_clone)
