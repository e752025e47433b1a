"""Run records: one JSON line per finished run of a table, enough to write the table again.

A record holds what defines the run (config file, arguments, seed, overrides, grid point), what
it reported (`summary.json`, and the eval history of the metrics the table reads, for the
`source_val` and `oracle` rules), how long it took (the `done` marker) and what produced it
(`provenance.json`: commit, versions, devices, config hash). `xmodal table` writes
`NAME.runs.jsonl` beside the table it writes from a root; `xmodal table --records FILE` writes
the table from that file alone, so a committed table is checked against its committed records.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

from xmodal_jax.errors import UserError
from xmodal_jax.tables import jobs as jobs_lib
from xmodal_jax.tables import select
from xmodal_jax.tables.spec import Table, metric_keys
from xmodal_jax.train import metrics as metrics_lib

FORMAT = 1


def table_metrics(table: Table) -> set[str]:
    """Every metric a table reads: its columns (as each row names them) and `select_metric`."""
    keys = {k for row in table.rows for col in table.columns for k in metric_keys(row.metric(col))}
    if table.select_metric:
        keys.add(table.select_metric)
    return keys


def _read_json(path: epath.Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _read_marker(path: epath.Path) -> dict | None:
    """A `done` marker's fields; an empty one (written by `touch` in the `--dry-run` lines of
    earlier versions) has none."""
    text = path.read_text() if path.exists() else None
    return None if text is None else json.loads(text) if text.strip() else {}


def record(job: jobs_lib.Job, workdir: str, metrics: set[str]) -> dict[str, Any]:
    """The record of a finished job's workdir; a diverged run's has no summary and says where
    it diverged (`diverged`: the marker, with what the trainer said)."""
    wd = epath.Path(workdir)
    history = select.eval_history(metrics_lib.read(workdir))
    return {
        "format": FORMAT,
        "key": job.key,
        "row": job.row,
        "config": job.config,
        "args": dict(job.args),
        "seed": job.seed,
        "overrides": dict(job.overrides),
        "grid_point": dict(job.grid_point),
        "summary": _read_json(wd / "summary.json"),
        "history": {
            str(step): {k: v for k, v in values.items() if k in metrics}
            for step, values in history.items()
            if any(k in metrics for k in values)
        },
        "done": _read_marker(wd / jobs_lib.DONE),
        **({"diverged": diverged} if (diverged := _read_json(wd / jobs_lib.DIVERGED)) else {}),
        "provenance": _read_json(wd / "provenance.json"),
    }


def collect(jobs: Sequence[jobs_lib.Job], root: str, name: str, table: Table) -> list[dict]:
    """Records of every finished job (done or diverged) under `root/name`, sorted by row, seed
    and key."""
    metrics = table_metrics(table)
    out = []
    for job in jobs:
        wd = job.workdir(root, name)
        if jobs_lib.status(wd) in jobs_lib.ENDED:
            out.append(record(job, wd, metrics))
    return sorted(out, key=lambda r: (r["row"], r["seed"], r["key"]))


def dumps(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


def load(path: str) -> list[dict]:
    """Records of a `NAME.runs.jsonl` file; one clear error for a malformed line."""
    if not os.path.exists(path):
        raise UserError(f"--records {path}: no such file; write it with `xmodal table --root`.")
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i} is not a JSON line ({e.msg}).") from None
            if rec.get("format") != FORMAT or "key" not in rec or "summary" not in rec:
                raise UserError(f"{path}:{i} is not a run record (format {FORMAT}).")
            out.append(rec)
    return out


def diverged_state(marker: dict) -> str:
    """How a table's missing-run line names a diverged run: `diverged (what the trainer said)`."""
    return f"diverged ({marker.get('said') or 'no message'})"


class RecordRuns:
    """The runs of a records file, looked up by workdir as `aggregate.collect` asks for them
    (a job's workdir ends in its key)."""

    def __init__(self, records: Sequence[dict]):
        self.by_key = {r["key"]: r for r in records}

    def status(self, workdir: str) -> str:
        rec = self.by_key.get(os.path.basename(workdir))
        if rec is None:
            return "missing"
        return diverged_state(rec["diverged"]) if rec.get("diverged") else "done"

    def get(self, workdir: str) -> tuple[dict, dict]:
        rec = self.by_key[os.path.basename(workdir)]
        history = {int(step): values for step, values in rec["history"].items()}
        return rec["summary"], history


def current(
    recs: Sequence[dict], jobs: Sequence[jobs_lib.Job]
) -> tuple[dict[str, dict], list[str]]:
    """The records (by key) that are runs of `jobs` as their config files stand now, and one
    line per record left out: not a job of the table (a row removed or changed), or made from
    a config that differs from today's (its provenance's `config_hash`: the run must be made
    again). A record without provenance (or, for a job that needs another, without the command
    line that names the workdirs it read) is kept as it is."""
    by_key = {j.key: j for j in jobs}
    kept, dropped = {}, []
    for rec in recs:
        job = by_key.get(rec["key"])
        if job is None:
            dropped.append(
                f"{rec['row']} seed={rec['seed']} ({rec['key']}): not a run of the table"
            )
            continue
        prov = rec.get("provenance") or {}
        recorded = prov.get("config_hash")
        now = job.config_hash(job.recorded_needs(prov.get("argv", []))) if recorded else None
        if recorded and now and recorded != now:
            dropped.append(
                f"{rec['row']} seed={rec['seed']} ({rec['key']}): its config changed since "
                f"the run (config_hash {recorded} then, {now} now)"
            )
            continue
        kept[rec["key"]] = rec
    return kept, dropped


def _software(prov: dict) -> str:
    """`flax 0.12.8, ..., python 3.11.7`: the versions a run's provenance names."""
    versions = prov.get("versions") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(versions.items()) if v) or "unrecorded"


def _device(prov: dict) -> str:
    """`cpu x1 (2 CPUs: AMD EPYC (family 26, model 2), AVX-512; XLA convolutions, shift_vjp
    depthwise)`: the devices a run's provenance names, on CPU with the processor, its x86 family
    and model and its vector extension (records before those fields name none), who ran its
    convolutions (`xla_defaults`; records before the field: YNNPACK, XLA's default then) and the
    depthwise form `depthwise='auto'` ran (`layers.cpu_depthwise`; named where recorded, records
    before the field ran `shift`) and how residual streams were fused (`residuals.cpu_residuals`;
    named where recorded, records before the field: `fused`), as each changes the last bits of a
    run."""
    if not prov.get("device_kind"):
        return "unrecorded"
    text = f"{prov['device_kind']} x{prov.get('device_count', '?')}"
    if prov.get("platform") == "cpu":
        cpus = prov.get("usable_cpus")
        convs = {"xla": "XLA", "ynnpack": "YNNPACK"}[prov.get("cpu_convolutions", "ynnpack")]
        cpus = f"{cpus} CPUs" if cpus else "CPU count unrecorded"
        name = prov.get("cpu_model")
        if name and prov.get("cpu_family"):
            name = f"{name} ({prov['cpu_family']})"
        model = ", ".join(filter(None, (name, prov.get("cpu_simd"))))
        convs = f"{convs} convolutions"
        if prov.get("cpu_depthwise"):
            convs += f", {prov['cpu_depthwise']} depthwise"
        if prov.get("cpu_residuals"):
            convs += f", {prov['cpu_residuals']} residuals"
        text += f" ({cpus}: {model}; {convs})" if model else f" ({cpus}, {convs})"
    return text


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _counted(what: str, counts: Counter, limit: int = 3) -> str:
    """`What: a` when every run agrees, else `What (n different): a (k runs); b (m runs)`."""
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) == 1:
        return f"{what}: {ordered[0][0]}"
    shown = "; ".join(f"{k} ({_runs(n)})" for k, n in ordered[:limit])
    more = f"; {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{what} ({len(ordered)} different): {shown}{more}"


# Files whose uncommitted changes cannot change a run (records and tables being written, docs).
NOT_CODE = (".md", ".jsonl", ".csv", ".tex", ".png")


def _ended(rec: dict, key: str) -> float | None:
    """`key` ('wall_s', 'cpu_s') of the run's `done` or `diverged` marker, if it has one."""
    ended = rec.get("done") or rec.get("diverged") or {}
    return float(ended[key]) if ended.get(key) is not None else None


def _wall(rec: dict) -> float | None:
    return _ended(rec, "wall_s") or None


def median_walls(recs: Sequence[dict]) -> dict[str, float]:
    """Each row's median wall time per run (seconds), over its records that have one."""
    by_row: dict[str, list[float]] = {}
    for r in recs:
        if (wall := _wall(r)) is not None:
            by_row.setdefault(r["row"], []).append(wall)
    return {row: float(np.median(walls)) for row, walls in by_row.items()}


def describe(recs: Sequence[dict]) -> list[str]:
    """What a table's runs rest on, from their records: how many, their compute (the `done`
    markers' wall times, and CPU times where recorded: a wall time also counts time a run was
    stopped or shared its cores), and from their provenance the software, devices and commits."""
    if not recs:
        return []
    walls = [w for r in recs if (w := _wall(r)) is not None]
    line = _runs(len(recs))
    if diverged := sum(bool(r.get("diverged")) for r in recs):
        line += f" ({diverged} diverged)"
    if walls:
        median = float(np.median(walls))
        line += f", {sum(walls) / 3600:.1f} h of compute in all (median {median:.0f} s a run"
        if len(walls) < len(recs):  # e.g. by earlier versions' `--dry-run` lines: no time
            line += f"; {_runs(len(recs) - len(walls))} without a wall time, not counted"
        line += ")"
    else:
        line += ", no wall time recorded"
    if cpus := [c for r in recs if (c := _ended(r, "cpu_s")) is not None]:
        counted = "" if len(cpus) == len(recs) else f" of the {_runs(len(cpus))} that record it"
        line += (
            f"; CPU time{counted}: {sum(cpus) / 3600:.1f} h (user + system, median "
            f"{float(np.median(cpus)):.0f} s a run)"
        )
    software, devices, commits = Counter(), Counter(), Counter()
    dirty = bare = edited = 0
    for r in recs:
        prov = r.get("provenance")
        if not prov:
            bare += 1
            continue
        software[_software(prov)] += 1
        devices[_device(prov)] += 1
        git = prov.get("git") or {}
        commits[(git.get("commit") or "unknown")[:7]] += 1
        if git.get("dirty"):
            dirty += 1
            changed = git.get("changed")
            if changed is None:  # an older record: which files changed is unknown
                edited = None
            elif edited is not None:
                edited += any(not p.endswith(NOT_CODE) for p in changed)
    lines = [line + "."]
    if software:
        lines.append(_counted("Software", software) + ".")
        lines.append(_counted("Devices", devices) + ".")
        code = _counted("Commits", commits)
        if dirty:
            code += f"; {_runs(dirty)} from a checkout with uncommitted changes"
            if edited is not None:
                code += f" ({edited} of them to code, {dirty - edited} to records or docs only)"
        lines.append(code + ".")
    if bare:
        lines.append(f"{_runs(bare)} without provenance.")
    return lines
