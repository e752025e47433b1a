"""Orbax checkpoints of the train state, with the Grain iterator state beside it.

`Checkpointer` keeps the last `keep` checkpoints under `<workdir>/checkpoints` (async saves).
Each holds the train state, the input position (`data`) and the per-step training metrics
not yet averaged into a `metrics.jsonl` line (`metrics`), so a run stopped between two log
steps logs the same values after resuming.

On resume, `restore_latest` walks back from the newest checkpoint to the newest one it can
read, and restores it onto the shardings of the target (so onto any mesh). The newer ones it
could not read (files a killed run left incomplete) and Orbax temporary directories are then
moved aside to `<workdir>/checkpoints_incomplete/`, each with a one-line warning and a `.log`
file of the details (what TensorStore and asyncio print about a torn file goes there too, not
to the terminal). When no checkpoint can be read, nothing is moved and the run stops with a
`UserError`: starting over from step 0 is for the user to choose. A checkpoint that reads fine
but does not fit the target (another model or optimiser) stops the run with a `UserError` and
nothing is moved. Nothing here ever deletes a complete checkpoint; Orbax's keep-N only drops
the oldest after a newer one is committed.

`BestCheckpointer` keeps the state with the best value of one evaluation metric under
`<workdir>/best/` (Orbax `best_fn` policy, keep 1).

The workdir may be remote (`gs://...`): Orbax writes there itself, and every other access here
goes through `etils.epath`.

The input position is saved by every process (`data/process_<i>-of-<n>.json`). It is the same on
every process and for every process count (each process reads its rows of the same global
batches), so a checkpoint written by `n` processes resumes on any other number of them.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from xmodal_jax.errors import UserError
from xmodal_jax.train import metrics as metrics_lib

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _items(
    state: Any, data_iter: grain.DatasetIterator | None, restore: bool, pending: Any = None
) -> dict:
    if restore:
        items = {"state": ocp.args.StandardRestore(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if pending is not None:
            items["metrics"] = ocp.args.JsonSave(pending)
    return items


def encode_pending(rows: list[dict]) -> dict:
    """Per-step metric values (host scalars) as JSON that decodes to the same bits."""
    dtypes = {k: str(np.asarray(v).dtype) for k, v in (rows[0] if rows else {}).items()}
    return {"dtypes": dtypes, "rows": [{k: float(v) for k, v in r.items()} for r in rows]}


def decode_pending(saved: Mapping | None) -> list[dict]:
    """The inverse of `encode_pending` (an empty list for a checkpoint without it)."""
    if not saved:
        return []
    dtypes = {k: jnp.dtype(d) for k, d in saved["dtypes"].items()}
    return [{k: np.asarray(v, dtypes[k]) for k, v in r.items()} for r in saved["rows"]]


class _StderrCatcher(io.TextIOBase):
    """Stands in for `sys.stderr` and `sys.unraisablehook`: keeps what any thread writes
    (TensorStore's threads report an error per pending read of a torn checkpoint, after the
    read that failed has returned)."""

    def __init__(self):
        self.parts: list[str] = []
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.parts.append(text)
            self.last = time.monotonic()
        return len(text)

    def unraisable(self, info) -> None:
        exc = info.exc_value or info.exc_type()
        self.write("".join(traceback.format_exception(type(exc), exc, info.exc_traceback)))

    def settle(self, quiet: float = 0.3, limit: float = 5.0) -> str:
        """Waits until nothing was written for `quiet` seconds (at most `limit`); the text."""
        deadline = time.monotonic() + limit
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            return "".join(self.parts)


def _leaf_name(keypath) -> str:
    parts = []
    for k in keypath:
        parts.append(str(next(getattr(k, a) for a in ("name", "key", "idx") if hasattr(k, a))))
    return ".".join(parts)


def mismatches(saved_metadata: Any, target: Any, limit: int = 8) -> list[str]:
    """Differences in leaf names, shapes and dtypes between a saved tree's Orbax metadata and
    a target tree (empty when they fit)."""
    tree = getattr(saved_metadata, "tree", saved_metadata)
    if tree is None:
        return []  # no metadata to compare: let the restore itself check
    saved = {}
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "name") or not hasattr(leaf, "shape"):
            return []  # metadata without names: let the restore itself check
        saved[leaf.name] = (tuple(leaf.shape), np.dtype(leaf.dtype))
    wanted = {
        _leaf_name(p): (tuple(x.shape), np.dtype(x.dtype))
        for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params."), k))
    out = [f"missing in checkpoint: {k} {wanted[k][0]}" for k in order(wanted.keys() - saved)]
    out += [f"only in checkpoint: {k} {saved[k][0]}" for k in order(saved.keys() - wanted)]
    for k in order(wanted.keys() & saved.keys()):
        if wanted[k] != saved[k]:
            out.append(
                f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, now {wanted[k][0]} {wanted[k][1]}"
            )
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


class Checkpointer:
    """Async, keep-N checkpoints under `<workdir>/checkpoints`; items `state` and `data`."""

    def __init__(
        self,
        workdir: epath.PathLike,
        *,
        keep: int = 2,
        async_save: bool = True,
        read_only: bool = False,
    ):
        workdir = metrics_lib.workdir_path(workdir)
        self.directory = workdir / "checkpoints"
        self.quarantine = workdir / "checkpoints_incomplete"
        self.read_only = read_only  # restore only; unreadable checkpoints are skipped in place
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not read_only,
                read_only=read_only,
                enable_async_checkpointing=async_save,
            ),
            # handlers known up front, so metadata can be read before any restore
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "metrics": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iter: grain.DatasetIterator | None = None,
        pending: list[dict] | None = None,
    ) -> None:
        """Saves `state`, the iterator's position and `pending` (per-step metrics not yet
        logged; see `encode_pending`)."""
        encoded = None if pending is None else encode_pending(pending)
        args = ocp.args.Composite(**_items(state, data_iter, False, encoded))
        self.manager.save(step, args=args, force=True)

    def pending_metrics(self, step: int) -> list[dict]:
        """The per-step metrics checkpoint `step` saved beside the state (none if older)."""
        if not (self.directory / str(step) / "metrics").exists():
            return []
        args = ocp.args.Composite(metrics=ocp.args.JsonRestore())
        return decode_pending(self.manager.restore(step, args=args)["metrics"])

    def restore(
        self, step: int, abstract_state: Any, data_iter: grain.DatasetIterator | None = None
    ) -> tuple[Any, grain.DatasetIterator | None]:
        """State restored onto the shardings of `abstract_state`; the iterator Orbax returns
        (or, for a checkpoint of another process count, `data_iter` moved to its position)."""
        data_dir = self.directory / str(step) / "data"
        own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if data_iter is None or (data_dir / own).exists():
            args = ocp.args.Composite(**_items(abstract_state, data_iter, True))
            restored = self.manager.restore(step, args=args)
            return restored["state"], restored["data"] if data_iter is not None else None
        state = self._saved_position(step, data_dir)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**_items(abstract_state, None, True))
        )
        data_iter.set_state(state)
        data_iter.start_prefetch()
        return restored["state"], data_iter

    def _saved_position(self, step: int, data_dir: epath.Path) -> dict:
        """The input position of checkpoint `step` written by another number of processes,
        after checking that all of them saved the same one."""
        saved = {}
        for f in data_dir.iterdir() if data_dir.exists() else ():
            if match := _DATA_FILE.fullmatch(f.name):
                saved[f.name] = (int(match.group(2)), json.loads(f.read_text()))
        counts = {n for n, _ in saved.values()}
        if len(counts) != 1 or len(saved) != next(iter(counts)):
            # a torn checkpoint (not a UserError): restore_latest sets it aside
            raise FileNotFoundError(
                f"incomplete input position in {data_dir}: {sorted(saved) or 'no files'}"
            )
        states = [state for _, state in saved.values()]
        if any(state != states[0] for state in states):
            raise UserError(
                f"The {len(saved)} processes that wrote the checkpoint of step {step} in "
                f"{self.directory} saved different input positions, so it cannot resume on "
                f"{jax.process_count()}; resume it with {len(saved)} processes."
            )
        if jax.process_index() == 0:
            print(
                f"The checkpoint of step {step} was written by {len(saved)} processes; "
                f"{jax.process_count()} continue its global input stream at {states[0]}.",
                flush=True,
            )
        return states[0]

    def restore_latest(
        self, abstract_state: Any, data_iter: grain.DatasetIterator | None = None
    ) -> tuple[Any, grain.DatasetIterator | None, int] | None:
        """`(state, iterator, step)` of the newest checkpoint that can be read, or None if
        there is no checkpoint. Raises a UserError, moving nothing, when none can be read."""
        start = None if data_iter is None else data_iter.get_state()
        failed: list[tuple[str, str, str]] = []  # (name, why, details) of unreadable ones
        found = None
        catcher, real_stderr, real_hook = _StderrCatcher(), sys.stderr, sys.unraisablehook
        sys.stderr, sys.unraisablehook = catcher, catcher.unraisable
        try:
            for step in sorted(self.manager.all_steps(), reverse=True):
                try:
                    metadata = self.manager.item_metadata(step)["state"]
                except Exception as e:  # noqa: BLE001 - any read error: an unusable checkpoint
                    failed.append((str(step), f"its metadata cannot be read ({_short(e)})", e))
                    continue
                problems = mismatches(metadata, abstract_state)
                if problems:
                    raise UserError(
                        f"The checkpoint of step {step} in {self.directory} does not fit this "
                        f"config's model and optimiser: {'; '.join(problems)}. Resume with the "
                        "config it was written with, or use a new --workdir."
                    )
                try:
                    state, restored_iter = self.restore(step, abstract_state, data_iter)
                except UserError:
                    raise  # readable, but not for this run: keep it where it is
                except Exception as e:  # noqa: BLE001
                    failed.append((str(step), f"it cannot be read ({_short(e)})", e))
                    if data_iter is not None:  # a failed restore may have moved it
                        data_iter.set_state(start)
                    continue
                found = (state, restored_iter, step)
                break
        finally:
            noise = catcher.settle() if failed else catcher.settle(quiet=0, limit=0)
            sys.stderr, sys.unraisablehook = real_stderr, real_hook
        if not failed and noise:
            real_stderr.write(noise)  # nothing went wrong: hide nothing
        if found is None and failed:
            steps = ", ".join(name for name, _, _ in failed)
            raise UserError(
                f"No checkpoint in {self.directory} can be read (steps {steps}; the newest: "
                f"{failed[0][1]}), so the run cannot resume; nothing was moved or changed. To "
                f"start over from step 0, move them aside (mv {self.directory} "
                f"{self.directory}_unreadable) and rerun, or use a new --workdir."
            )
        then = f"resuming from step {found[2]}" if found else "starting from step 0"
        never = "it was never committed (the run was killed saving)"
        aside = [(name, never, "") for name in self._temporary()]
        aside += [(name, why, _details(e, noise)) for name, why, e in failed]
        self._set_aside(aside, then)
        return found

    def _temporary(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if ocp.step.is_tmp_checkpoint(p))

    def _set_aside(self, entries: list[tuple[str, str, str]], then: str) -> None:
        """Moves unusable checkpoint directories `(name, why, details)` to
        `checkpoints_incomplete/<name>-<time>` (never deletes), with the details beside them
        in `<name>-<time>.log`; one warning line each.

        Every process calls this with the same names (they list the same directory); the
        barriers keep the others from listing while process 0 moves."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xmodal_checkpoint_listed")
        if entries and jax.process_index() == 0 and self.read_only:
            for name, why, _ in entries:
                print(f"WARNING: skipping checkpoint {name} in {self.directory}: {why}; {then}.")
        elif entries and jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            for name, why, details in entries:
                dest = self.quarantine / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / name).rename(dest)
                where = f"Moved to {dest}"
                if details:
                    log = dest.with_name(dest.name + ".log")
                    metrics_lib.write_text(log, details)
                    where += f" (details: {log})"
                print(
                    f"WARNING: skipping checkpoint {name} in {self.directory}: {why}. "
                    f"{where}; {then}.",
                    flush=True,
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xmodal_checkpoint_set_aside")
        if entries and not self.read_only:
            self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _short(e: Exception, n: int = 80) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


def _details(e: Exception, noise: str) -> str:
    """The full error of an unreadable checkpoint, then what was printed while reading it."""
    text = "".join(traceback.format_exception(e))
    return text + (f"\nPrinted to stderr while reading:\n{noise}" if noise else "")


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
