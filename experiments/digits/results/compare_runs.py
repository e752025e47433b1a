"""Compares the runs of a table root with the recorded runs (`runs.jsonl`) of the same method,
direction and seed, and with the recorded spread over seeds; prints a markdown table:

    python experiments/digits/results/compare_runs.py --root workdirs/repro

"identical" means the same float as the recorded run. A reproduced run is "within the seed
spread" when it lies between the lowest and the highest recorded seed of its method and
direction, widened by one sample std of those seeds.
"""

import json
import os
import statistics

from import_runs import arguments, load_runs, run_key

from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import spec

METRIC = "eval/target/accuracy"


def main() -> None:
    parser = arguments(__doc__)
    args = parser.parse_args()
    name, table = spec.load(args.table)
    recorded = load_runs(args.runs)
    print(
        "| method | direction | seed | recorded (machine) | reproduced | difference "
        "| recorded seeds: mean ± std (n), range | within spread |"
    )
    print("|---|---|---|---|---|---|---|---|")
    inside = total = 0
    cells: dict[tuple[str, str], list[float]] = {}
    for job in jobs_lib.expand(table):
        workdir = job.workdir(args.root, name)
        if jobs_lib.status(workdir) != "done":
            continue
        with open(os.path.join(workdir, "summary.json")) as f:
            got = 100 * json.load(f)[METRIC]
        method, direction, seed = run_key(job)
        seeds = _recorded_seeds(recorded, method, direction)
        same = recorded.get(run_key(job))
        std = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
        ok = _within_spread(got, seeds)
        inside, total = inside + ok, total + 1
        cells.setdefault((method, direction), []).append(got)
        then = f"{100 * same[METRIC]:.1f} ({same['machine'].split(',')[0]})" if same else "—"
        diff = "—"
        if same:
            diff = (
                "0 (identical)" if got == 100 * same[METRIC] else f"{got - 100 * same[METRIC]:+.1f}"
            )
        spread = (
            f"{statistics.mean(seeds):.1f} ± {std:.1f} ({len(seeds)}), "
            f"{min(seeds):.1f}–{max(seeds):.1f}"
        )
        print(
            f"| {method} | {direction} | {seed} | {then} | {got:.1f} | {diff} | {spread} "
            f"| {'yes' if ok else '**no**'} |"
        )
    print(f"\n{inside} of {total} reproduced runs within the recorded seed spread.\n")
    _print_cells(cells, recorded)


def _recorded_seeds(recorded: dict, method: str, direction: str) -> list[float]:
    return [100 * r[METRIC] for k, r in recorded.items() if k[:2] == (method, direction)]


def _within_spread(value: float, seeds: list[float]) -> bool:
    """Between the lowest and highest recorded seed, widened by one sample std of them."""
    std = statistics.stdev(seeds) if len(seeds) > 1 else 0.0
    return min(seeds) - std <= value <= max(seeds) + std


def _mean_std(values: list[float]) -> str:
    std = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{std} ({len(values)})"


def _print_cells(cells: dict[tuple[str, str], list[float]], recorded: dict) -> None:
    """Per cell: the reproduced mean against the recorded seeds' mean and spread."""
    print("| method | direction | recorded | reproduced | difference of means | within spread |")
    print("|---|---|---|---|---|---|")
    inside = 0
    for (method, direction), got in cells.items():
        seeds = _recorded_seeds(recorded, method, direction)
        mean = statistics.mean(got)
        ok = _within_spread(mean, seeds)
        inside += ok
        print(
            f"| {method} | {direction} | {_mean_std(seeds)} | {_mean_std(got)} "
            f"| {mean - statistics.mean(seeds):+.1f} | {'yes' if ok else '**no**'} |"
        )
    print(f"\n{inside} of {len(cells)} cells' reproduced means within the recorded seed spread.")


if __name__ == "__main__":
    main()
