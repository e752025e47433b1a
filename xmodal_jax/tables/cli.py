"""`xmodal table experiments/tables/NAME.py --root DIR [--jobs K] [--dry-run] [--select RULE]`.

Runs every unfinished job of the table (K at a time, each in `DIR/NAME/<hash>`), then writes
`NAME.md`, `NAME.tex` and `NAME.csv` (into `--out`, default DIR). `--dry-run` prints the job
commands, one shell line each, and runs nothing; `--only REGEX` and `--seeds S,...` restrict the
jobs to some rows and seeds (the table still shows every finished run). A job another command is
running (its workdir lock is held) is skipped. Exits 2 when a job failed, 75 when a job was
preempted (it resumes on the next run). A root on `gs://` takes `--dry-run` (commands for a
cluster, whose jobs write there) and `--collect-only`.

`--records FILE` with `--root` resumes from committed records: a job recorded in FILE is not run
again (unless a job to run needs its workdir), the root's finished runs are added to FILE as
each finishes, and the table is written from FILE (into `--out`, default FILE's directory). A
record whose config file has changed since its run (its `config_hash`) is dropped from FILE,
and its job runs again. Runs are added to FILE as it is at that moment, under a lock, so several
commands (other roots, other rows) can add to one file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shlex
import sys
from collections.abc import Iterator

from xmodal_jax import cache_dirs
from xmodal_jax.errors import EXIT_PREEMPTED, Preempted, UserError
from xmodal_jax.tables import aggregate, render, runner, spec
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import records as records_lib
from xmodal_jax.train import metrics as metrics_lib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal table", description=__doc__.split("\n")[0])
    p.add_argument("table", help="experiments/tables/NAME.py")
    p.add_argument("--root", help="where the jobs' workdirs go (DIR/NAME/<hash>)")
    p.add_argument(
        "--records",
        help="NAME.runs.jsonl: alone, write the table from it (nothing run); with --root, its "
        "runs count as done and the root's finished runs are added to it",
    )
    p.add_argument("--jobs", type=int, default=1, help="jobs run at a time (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--select", choices=sorted(spec.RULES), help="override the table's rule")
    p.add_argument(
        "--only", help="run only the rows whose label matches this regex (the runs they read)"
    )
    p.add_argument("--seeds", help="run only these of the table's seeds (comma-separated)")
    p.add_argument("--collect-only", action="store_true", help="write the table, run nothing")
    p.add_argument("--out", help="where NAME.md/.tex/.csv go (default: --root)")
    return p


def dry_run_lines(jobs: list[jobs_lib.Job], root: str, name: str) -> list[str]:
    """One shell line per unfinished job: its train command run by `run_job`, which writes the
    job's marker as the runner does (`done` with the wall time, `diverged`, `failed`; none for a
    preempted job, which stays unfinished and is printed again by a later dry run, to resume
    it). Jobs that need others come last, after a comment line."""
    lines, waits = [], False
    for job in jobs:
        wd = job.workdir(root, name)
        if jobs_lib.status(wd) in jobs_lib.ENDED:  # done, or diverged (a result, not retried)
            continue
        if job.needs and not waits and lines:
            lines.append(
                "# The lines below read runs above (a row's `needs`): start them after those."
            )
            waits = True
        wrapper = [sys.executable, "-m", "xmodal_jax.tables.run_job", wd, "--"]
        lines.append(shlex.join(wrapper + job.command(wd, runner.PROGRAM)))
    return lines


def table_texts(
    table: spec.Table,
    name: str,
    rule: str | None,
    root: str = "records",
    runs=None,
    recs: list[dict] | None = None,
) -> dict[str, str]:
    """`{'md', 'tex', 'csv'}` texts of the table from the runs under `root` (or `runs`); `recs`
    are the records of the runs under `root` when already collected. From records, a missing
    run is named by its key (a workdir would name this checkout's path)."""
    rule, rule_text = spec.select_rule(table, rule)
    cells = aggregate.collect(table, name, root, rule, runs)
    if runs is not None:
        for cell in cells.values():
            cell.missing = [(s, st, f"key {os.path.basename(wd)}") for s, st, wd in cell.missing]
        recs = list(runs.by_key.values())
    elif recs is None:
        recs = records_lib.collect(jobs_lib.expand(table), root, name, table)
    return {
        "md": render.markdown(
            table,
            cells,
            rule,
            rule_text,
            records_lib.describe(recs),
            records_lib.median_walls(recs),
        ),
        "tex": render.latex(table, cells, rule, rule_text),
        "csv": render.csv_text(table, cells, rule),
    }


def write_tables(
    table: spec.Table, name: str, root: str | None, out: str, rule: str, runs=None
) -> list[str]:
    """Writes NAME.md/.tex/.csv into `out` from the runs under `root` (or `runs`, records);
    from a root it also writes the runs' records, NAME.runs.jsonl. Returns the paths."""
    recs = records_lib.collect(jobs_lib.expand(table), root, name, table) if runs is None else None
    texts = table_texts(table, name, rule, root or "records", runs, recs)
    if recs is not None:
        texts["runs.jsonl"] = records_lib.dumps(recs)
    out_dir = metrics_lib.workdir_path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in texts.items():
        path = out_dir / f"{name}.{ext}"
        metrics_lib.write_text(path, text)
        paths.append(os.fspath(path))
    return paths


@contextlib.contextmanager
def _records_lock(path: str) -> Iterator[None]:
    """Holds this machine's lock on the records file `path` (none for a remote one), so that
    two commands adding runs to one file (two of a table's commands, or a `--collect-only`
    merge during a run) read, merge and write it one at a time."""
    if metrics_lib.is_remote(path):
        yield
        return
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    # Not beside the file, where it would be an untracked file in a checkout; not in $TMPDIR,
    # which a cluster job may have to itself.
    locks = os.path.join(cache_dirs.cache_root(), "locks")
    os.makedirs(locks, exist_ok=True)
    with open(os.path.join(locks, f"records_{key}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _merge_records(table: spec.Table, name: str, root: str, path: str, out: str, rule) -> list[str]:
    """Adds the root's finished runs to the records file `path` as it is now (another command
    may have added runs since this one began; its records whose config changed are left out)
    and writes the table from it into `out`. Returns the paths written."""
    jobs = jobs_lib.expand(table)
    with _records_lock(path):
        recs = records_lib.load(path) if os.path.exists(path) else []
        merged, _ = records_lib.current(recs, jobs)
        for rec in records_lib.collect(jobs, root, name, table):
            merged[rec["key"]] = rec
        recs = sorted(merged.values(), key=lambda r: (r["row"], r["seed"], r["key"]))
        target = metrics_lib.workdir_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        metrics_lib.write_text(target, records_lib.dumps(recs))
    return [path, *write_tables(table, name, None, out, rule, records_lib.RecordRuns(recs))]


def _only_seeds(jobs: list[jobs_lib.Job], text: str, table: spec.Table) -> list[jobs_lib.Job]:
    try:
        seeds = {int(s) for s in text.split(",") if s.strip()}
    except ValueError:
        raise UserError(f"--seeds {text!r}: give integers separated by commas, e.g. 0,2.") from None
    kept = [j for j in jobs if j.seed in seeds]
    if not kept:
        known = sorted({j.seed for j in jobs})
        raise UserError(f"--seeds {text!r} matches none of the table's seeds {known}.")
    return kept


def run(argv: list[str]) -> dict:
    """Runs `xmodal table ARGS`; returns counts of jobs by outcome and the written paths."""
    args = _parser().parse_args(argv)
    records_out = args.out or (
        os.path.dirname(os.path.abspath(args.records)) if args.records else None
    )
    if args.records and not args.root:
        if args.dry_run or args.only or args.seeds:
            raise UserError(
                "--records without --root writes a table from its records only; drop the "
                "other options but --out and --select, or give --root to run the missing jobs."
            )
        name, table = spec.load(args.table)
        runs = records_lib.RecordRuns(records_lib.load(args.records))
        paths = write_tables(table, name, None, records_out, args.select, runs)
        print("Wrote " + ", ".join(paths))
        return {"jobs": len(runs.by_key), "paths": paths}
    if not args.root:
        raise UserError("xmodal table needs --root DIR (where runs go) or --records FILE.")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: run at least one job at a time.")
    name, table = spec.load(args.table)
    rule, _ = spec.select_rule(table, args.select)
    jobs = jobs_lib.expand(table)
    jobs_lib.check_configs(jobs, args.table)
    if args.only:
        try:
            pattern = re.compile(args.only)
        except re.error as e:
            raise UserError(f"--only {args.only!r} is not a regular expression: {e}.") from None
        chosen = jobs_lib.keys_of_rows(
            table, [r.label for r in table.rows if pattern.search(r.label)]
        )
        jobs = [j for j in jobs if j.key in chosen]
        if not jobs:
            labels = [r.label for r in table.rows]
            raise UserError(f"--only {args.only!r} matches no row label of {labels}.")
    if args.seeds is not None:
        jobs = _only_seeds(jobs, args.seeds, table)
    kept: dict[str, dict] = {}
    if args.records:
        recs = records_lib.load(args.records) if os.path.exists(args.records) else []
        kept, dropped = records_lib.current(recs, jobs_lib.expand(table))
        for line in dropped:
            print(f"{args.records}: dropped {line}.")
        needed = {key for j in jobs if j.key not in kept for _, key in j.needs}
        recorded = [j for j in jobs if j.key in kept and j.key not in needed]
        if recorded:
            print(f"{len(recorded)} of {len(jobs)} jobs are recorded in {args.records} (not run).")
        jobs = [j for j in jobs if j.key not in kept or j.key in needed]
    if args.dry_run:
        lines = dry_run_lines(jobs, args.root, name)
        print("\n".join(lines))
        to_run = sum(not line.startswith("#") for line in lines)
        print(
            f"# {to_run} of {len(jobs)} jobs to run; none run (--dry-run). A line exits "
            f"{EXIT_PREEMPTED} when its job is preempted (saved, not done): run it again.",
            file=sys.stderr,
        )
        return {"jobs": len(jobs), "to_run": to_run}
    outcome: dict[str, list] = {k: [] for k in runner.OUTCOMES}
    if not args.collect_only and metrics_lib.is_remote(args.root):
        raise UserError(
            f"--root {args.root}: jobs run here need a local root (their locks and logs are "
            "local files). For a remote root, print the commands with --dry-run and send them "
            "to the cluster, then write the table with --collect-only."
        )
    if not args.collect_only:
        workdirs = [j.workdir(args.root, name) for j in jobs]

        def merge(_: str) -> None:  # each finished run reaches the records file at once
            _merge_records(table, name, args.root, args.records, records_out, rule)

        outcome = runner.run(jobs, workdirs, args.jobs, on_done=merge if args.records else None)
    if args.records:
        paths = _merge_records(table, name, args.root, args.records, records_out, rule)
    else:
        paths = write_tables(table, name, args.root, args.out or args.root, rule)
    print("Wrote " + ", ".join(paths))
    result = {"jobs": len(jobs), **{k: len(v) for k, v in outcome.items()}, "paths": paths}
    if outcome["failed"]:
        logs = ", ".join(os.path.join(wd, jobs_lib.LOG) for wd in outcome["failed"])
        blocked = len(outcome["blocked"])
        raise UserError(
            f"{len(outcome['failed'])} of {len(jobs)} jobs failed (the table marks them "
            f"missing); their logs: {logs}."
            + (f" {blocked} jobs that need them did not start." if blocked else "")
            + " Rerun the same command to retry them."
        )
    if outcome["blocked"]:
        raise UserError(
            f"{len(outcome['blocked'])} of {len(jobs)} jobs did not start: a run they need did "
            "not finish (listed above). Rerun the same command once it can."
        )
    if outcome["preempted"]:
        raise Preempted(
            f"{len(outcome['preempted'])} of {len(jobs)} jobs were preempted (saved; the table "
            "marks them missing). Rerun the same command to resume them."
        )
    return result
