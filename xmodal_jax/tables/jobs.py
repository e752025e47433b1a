"""A table's jobs: one training run per row x column arguments x grid point x seed.

Each job lives in `ROOT/NAME/<key>`, `key` a hash of the config path, its arguments, the seed and
the overrides, so the same job always lands in the same workdir (and a finished one is found
again) whatever order the table lists it in. The seed is passed as `--config.seed=S`, the key
every config has (docs/DESIGN.md §4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from xmodal_jax.errors import UserError
from xmodal_jax.tables.spec import Row, Table, parse_args
from xmodal_jax.train import metrics as metrics_lib
from xmodal_jax.train import workdir_lock

DONE, FAILED, LOG, JOB, LOCK = "done", "failed", "log.txt", "job.json", workdir_lock.LOCK
DIVERGED = "diverged"  # the run diverged (exit 3): an outcome of its seed, reported, not retried
ENDED = ("done", "diverged")  # the states of a job that is a result, never run again


def value_text(value: Any) -> str:
    """How an override value is written on the command line (parsed back by `config.override`)."""
    return value if isinstance(value, str) else repr(value)


@dataclasses.dataclass(frozen=True)
class Job:
    row: str
    config: str  # path of the config file, as the table writes it
    args: tuple[tuple[str, str], ...]  # sorted config arguments
    seed: int
    overrides: tuple[tuple[str, str], ...]  # sorted (key, command-line text)
    grid_point: tuple[tuple[str, str], ...]  # the part of `overrides` that comes from the grid
    needs: tuple[tuple[str, str], ...] = ()  # (config argument, key of the job whose workdir
    # it is): this job starts after that one has finished
    env: tuple[tuple[str, str], ...] = ()  # the table's `env`: how it runs, not what (no key)

    @property
    def spec(self) -> str:
        """`path.py[:k=v,...]` as `xmodal train --config` takes it."""
        args = ",".join(f"{k}={v}" for k, v in self.args)
        return f"{self.config}:{args}" if args else self.config

    @property
    def key(self) -> str:
        """Stable hash of what defines the run (not of the row label or the table)."""
        ident = {
            "config": os.path.normpath(self.config).replace(os.sep, "/"),
            "args": list(map(list, self.args)),
            "seed": self.seed,
            "overrides": list(map(list, self.overrides)),
        }
        if self.needs:  # absent otherwise, so the keys of earlier runs stay as they were
            ident["needs"] = list(map(list, self.needs))
        text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def workdir(self, root: str, table_name: str) -> str:
        """`ROOT/NAME/<key>`: absolute for a local root, as given for a URI (`gs://...`)."""
        if metrics_lib.is_remote(root):
            return f"{root.rstrip('/')}/{table_name}/{self.key}"
        return os.path.join(os.path.abspath(root), table_name, self.key)

    def needed_workdirs(self, workdir: str) -> dict[str, str]:
        """Config argument -> workdir of the job it names (beside this job's `workdir`)."""
        parent = workdir.rstrip("/").rsplit("/", 1)[0]
        return {arg: f"{parent}/{key}" for arg, key in self.needs}

    def command(self, workdir: str, program: list[str] | None = None) -> list[str]:
        """The `xmodal train` command line of this job (through `env` when the table sets
        environment variables)."""
        program = program or [sys.executable, "-m", "xmodal_jax.main"]
        spec = self.spec_with(self.needed_workdirs(workdir))
        env = ["env", *(f"{k}={v}" for k, v in self.env)] if self.env else []
        return [*env, *program, "train", "--config", spec, "--workdir", workdir,
                *self.config_overrides()]  # fmt: skip

    def spec_with(self, needed: Mapping[str, str]) -> str:
        """`spec` with the workdirs of the runs it needs (argument -> workdir) appended."""
        if not self.needs:
            return self.spec
        extra = ",".join(f"{arg}={needed[arg]}" for arg, _ in self.needs)
        return self.spec + ("," if self.args else ":") + extra

    def config_overrides(self) -> list[str]:
        """The `--config.KEY=VALUE` arguments of its command: the seed, then the overrides."""
        return [f"--config.seed={self.seed}", *(f"--config.{k}={v}" for k, v in self.overrides)]

    def config_hash(self, needed: Mapping[str, str] | None = None) -> str | None:
        """The `config_hash` its run's provenance records, from the config file as it is now.
        A job that needs another names that run's workdir, which varies by root: `needed` gives
        the workdirs its run was given (`recorded_needs`); None without them."""
        if self.needs and (needed is None or set(needed) != {arg for arg, _ in self.needs}):
            return None
        from xmodal_jax import config as config_lib
        from xmodal_jax import provenance

        config = config_lib.load(self.spec_with(needed or {}))
        config_lib.apply_overrides(config, self.config_overrides())
        return provenance.config_hash(config.to_dict())

    def recorded_needs(self, argv: Sequence[str]) -> dict[str, str] | None:
        """The workdirs of the runs it needs, as the command line `argv` of its run gave them
        (a record's provenance); None where `argv` does not name them all."""
        if not self.needs or "--config" not in argv[:-1]:
            return None
        spec = argv[argv.index("--config") + 1]
        given = parse_args(spec.partition(":")[2])
        out = {arg: given[arg] for arg, _ in self.needs if arg in given}
        return out if len(out) == len(self.needs) else None

    def describe(self) -> dict:
        out = {
            "row": self.row,
            "config": self.spec,
            "seed": self.seed,
            "overrides": dict(self.overrides),
        }
        if self.needs:
            out["needs"] = dict(self.needs)
        if self.env:
            out["env"] = dict(self.env)
        return out


def grid_points(grid: dict[str, list[Any]]) -> list[tuple[tuple[str, str], ...]]:
    """Every combination of the grid's values, as sorted (key, text) pairs; [()] without a grid."""
    keys = sorted(grid)
    combos = itertools.product(*(list(grid[k]) for k in keys))
    return [tuple((k, value_text(v)) for k, v in zip(keys, combo, strict=True)) for combo in combos]


def row_jobs(
    table: Table, row: Row, col_args: str, averaged: Sequence[str] | None = None
) -> list[Job]:
    """The jobs of one row under one column's arguments: every grid point, seed and argument set
    of `averaged` (default: the row's `average_over`)."""
    averaged = row.average_over if averaged is None else averaged
    row_overrides = tuple((k, value_text(v)) for k, v in row.overrides.items())
    return [
        Job(
            row=row.label,
            config=row.config,
            args=tuple(
                sorted(
                    {**parse_args(row.args), **parse_args(col_args), **parse_args(extra)}.items()
                )
            ),
            seed=int(seed),
            overrides=tuple(sorted(row_overrides + point)),
            grid_point=point,
            needs=tuple(
                sorted(
                    (arg, needed_job(table, label, col_args, int(seed), extra).key)
                    for arg, label in row.needs.items()
                )
            ),
            env=tuple(sorted(table.env.items())),
        )
        for point in grid_points(dict(table.grid_of(row)))
        for seed in table.seeds_of(row)
        for extra in (averaged or ("",))
    ]


def needed_job(table: Table, label: str, col_args: str, seed: int, extra: str) -> Job:
    """The job of row `label` that a row's `needs` names: the same column arguments, seed and
    `average_over` argument set when that row has them (`spec.check` makes it exist)."""
    row = next(r for r in table.rows if r.label == label)
    averaged = (extra,) if extra and row.average_over else ()
    return next(j for j in row_jobs(table, row, col_args, averaged) if j.seed == seed)


def expand(table: Table) -> list[Job]:
    """All jobs of `table`, in row, column-argument, grid point, seed order, without duplicates;
    a job that needs another comes after it."""
    jobs: dict[str, Job] = {}
    for row in table.rows:
        for job in _all_row_jobs(table, row):
            jobs.setdefault(job.key, job)
    return sorted(jobs.values(), key=lambda j: bool(j.needs))  # stable: else the table's order


def keys_of_rows(table: Table, labels: Sequence[str]) -> set[str]:
    """The keys of the runs the rows `labels` read, their own or (a row reading another row's
    runs under other metrics) those `expand` gave to an earlier row."""
    return {
        job.key for row in table.rows if row.label in labels for job in _all_row_jobs(table, row)
    }


def _all_row_jobs(table: Table, row: Row) -> list[Job]:
    """The jobs of `row` under every distinct argument set of the columns it fills."""
    col_args = dict.fromkeys(c.args for c in table.columns if table.fills(row, c))
    return [job for args in col_args for job in row_jobs(table, row, args)]


def check_configs(jobs: list[Job], table_path: str) -> None:
    """One error naming every config file the table refers to that does not exist."""
    missing = sorted({j.config for j in jobs if not os.path.isfile(j.config)})
    if missing:
        rows = sorted({j.row for j in jobs if j.config in missing})
        raise UserError(
            f"{table_path}: config file(s) {missing} do not exist (rows {rows}). Paths are "
            f"relative to the directory the command runs in ({os.getcwd()}): run it from the "
            "repository root, or add the config files."
        )


def locked(workdir: str) -> bool:
    """Whether a process (a table command, or `xmodal train`/`eval`) holds the workdir's lock:
    a local `flock`, or a live lease on a remote root (`workdir_lock`)."""
    return workdir_lock.holder(workdir) is not None


def status(workdir: str) -> str:
    """'done' (the `done` marker and `summary.json`), 'diverged' (the `diverged` marker: its
    training diverged, which that seed will do again), 'failed' (the `failed` marker), 'running'
    (its lock is held), 'unfinished' (started, then stopped before the end: preempted, killed,
    or a `done` marker without a summary) or 'missing' (never started)."""
    path = epath.Path(workdir)
    if (path / DONE).exists() and (path / "summary.json").exists():
        return "done"
    if (path / DIVERGED).exists():
        return "diverged"
    if (path / FAILED).exists():
        return "failed"
    if locked(workdir):
        return "running"
    return "unfinished" if path.is_dir() else "missing"
