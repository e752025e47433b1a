"""Appends the runs a table root finished to `runs.jsonl` (the reverse of `import_runs.py`):

    python experiments/digits/results/record_runs.py --root workdirs/tables \
        --machine "2-core CPU (AMD EPYC), jax 0.10.2"

Each finished job of `experiments/tables/digits_da.py` under `ROOT/digits_da/` becomes one line:
its final metrics (`summary.json`), method, direction, seed, wall time (its `done` marker) and
the machine. Runs already recorded (same method, direction and seed) and runs that were imported
from `runs.jsonl` are left out, so the file never holds one run twice.
"""

import json
import os

from import_runs import arguments, load_runs, run_key

from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import spec


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--machine", required=True, help="where the runs ran (CPU, JAX version)")
    args = parser.parse_args()
    name, table = spec.load(args.table)
    recorded = load_runs(args.runs)
    new = []
    for job in jobs_lib.expand(table):
        workdir = job.workdir(args.root, name)
        if jobs_lib.status(workdir) != "done" or run_key(job) in recorded:
            continue
        with open(os.path.join(workdir, jobs_lib.DONE)) as f:
            done = json.load(f)
        if "imported_from" in done:
            continue
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        method, direction, seed = run_key(job)
        new.append(
            {
                **summary,
                "method": method,
                "direction": direction,
                "seed": seed,
                "machine": args.machine,
                "rc": done.get("rc", 0),
                "wall_s": done.get("wall_s"),
            }
        )
    with open(args.runs, "a") as f:
        for run in new:
            f.write(json.dumps(run, sort_keys=True) + "\n")
    print(f"Recorded {len(new)} new runs in {args.runs}.")


if __name__ == "__main__":
    main()
