"""Places the runs of `runs.jsonl` in a table root as finished jobs, so that

    python experiments/digits/results/import_runs.py --root workdirs/tables
    xmodal table experiments/tables/digits_da.py --root workdirs/tables --collect-only

renders the table of `experiments/digits/README.md` from the recorded runs, and a plain
`xmodal table ... --root workdirs/tables` then runs only the jobs that are still missing. Each
run becomes `ROOT/digits_da/<key>/summary.json` (its final metrics) and a `done` marker holding
where and how long it ran. Runs made with `:seed=S` and with `--config.seed=S` are the same run
(both set `config.seed`). `--skip-machine TEXT` leaves out the runs recorded on a machine whose
description contains TEXT, so that the table tool reruns them here; a job already finished in
the root is never overwritten.
"""

import argparse
import json
import os

from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import spec

HERE = os.path.dirname(os.path.abspath(__file__))


RUNS = os.path.join(HERE, "runs.jsonl")
TABLE = "experiments/tables/digits_da.py"


def load_runs(path: str = RUNS) -> dict[tuple[str, str, int], dict]:
    """The recorded runs by (method, direction, seed)."""
    with open(path) as f:
        return {(r["method"], r["direction"], r["seed"]): r for r in map(json.loads, f)}


def run_key(job: jobs_lib.Job) -> tuple[str, str, int]:
    """(method, direction, seed) of a digits table job."""
    method = os.path.splitext(os.path.basename(job.config))[0]
    return method, dict(job.args)["direction"], job.seed


def arguments(doc: str) -> argparse.ArgumentParser:
    """`--root`, `--runs` and `--table`, shared by the scripts of this folder."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--runs", default=RUNS)
    parser.add_argument("--table", default=TABLE)
    return parser


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument(
        "--skip-machine",
        help="leave out runs whose machine contains this text (the table tool then reruns them)",
    )
    args = parser.parse_args()
    name, table = spec.load(args.table)
    runs = load_runs(args.runs)
    placed = 0
    for job in jobs_lib.expand(table):
        run = runs.get(run_key(job))
        if run is None or (args.skip_machine and args.skip_machine in run.get("machine", "")):
            continue
        workdir = job.workdir(args.root, name)
        if jobs_lib.status(workdir) == "done":
            continue  # finished in this root (a rerun): keep it
        os.makedirs(workdir, exist_ok=True)
        summary = {k: v for k, v in run.items() if k.startswith("eval/") or k == "step"}
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
        done = {"imported_from": os.path.relpath(args.runs), **job.describe()}
        done.update({k: run[k] for k in ("machine", "wall_s") if k in run})
        with open(os.path.join(workdir, jobs_lib.DONE), "w") as f:
            json.dump(done, f, indent=1)
        placed += 1
    print(f"Placed {placed} of {len(runs)} recorded runs under {args.root}/{name}/.")


if __name__ == "__main__":
    main()
