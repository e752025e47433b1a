"""Orbax checkpoints of the train state, with the Grain iterator state beside it.

`Checkpointer` keeps the last `keep` checkpoints under `<workdir>/checkpoints` (async saves).
On resume, `restore_latest` walks back from the newest checkpoint: one a killed run left
incomplete (an Orbax temporary directory, or files it cannot read) is moved aside to
`<workdir>/checkpoints_incomplete/` with a warning, and the newest complete one is restored,
onto the shardings of the target (so onto any mesh). A checkpoint that reads fine but does not
fit the target (another model or optimiser) stops the run with a `UserError` and nothing is
moved. Nothing here ever deletes a complete checkpoint; Orbax's keep-N only drops the oldest
after a newer one is committed.

`BestCheckpointer` keeps the state with the best value of one evaluation metric under
`<workdir>/best/` (Orbax `best_fn` policy, keep 1).

The workdir may be remote (`gs://...`): Orbax writes there itself, and every other access here
goes through `etils.epath`.

The input position is saved by every process (`data/process_<i>-of-<n>.json`). It is the same on
every process and for every process count (each process reads its rows of the same global
batches), so a checkpoint written by `n` processes resumes on any other number of them.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from xmodal_jax.errors import UserError
from xmodal_jax.train import metrics as metrics_lib

_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def _items(state: Any, data_iter: grain.DatasetIterator | None, restore: bool) -> dict:
    if restore:
        items = {"state": ocp.args.StandardRestore(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    else:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return items


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

    def __init__(self, workdir: epath.PathLike, *, keep: int = 2, async_save: bool = True):
        workdir = metrics_lib.workdir_path(workdir)
        self.directory = workdir / "checkpoints"
        self.quarantine = workdir / "checkpoints_incomplete"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save
            ),
            # handlers known up front, so metadata can be read before any restore
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: grain.DatasetIterator | None = None) -> None:
        args = ocp.args.Composite(**_items(state, data_iter, False))
        self.manager.save(step, args=args, force=True)

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
        """`(state, iterator, step)` of the newest complete checkpoint, or None if none."""
        self._set_aside(self._temporary(), "it was never committed (the run was killed saving)")
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                metadata = self.manager.item_metadata(step)["state"]
            except Exception as e:  # noqa: BLE001 - any read error means an unusable checkpoint
                self._set_aside([str(step)], f"its metadata cannot be read ({_short(e)})")
                continue
            problems = mismatches(metadata, abstract_state)
            if problems:
                raise UserError(
                    f"The checkpoint of step {step} in {self.directory} does not fit this "
                    f"config's model and optimiser: {'; '.join(problems)}. Resume with the "
                    "config it was written with, or use a new --workdir."
                )
            try:
                state, data_iter = self.restore(step, abstract_state, data_iter)
            except UserError:
                raise  # readable, but not for this run: keep it where it is
            except Exception as e:  # noqa: BLE001
                self._set_aside([str(step)], f"it cannot be read ({_short(e)})")
                continue
            return state, data_iter, step
        return None

    def _temporary(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if ocp.step.is_tmp_checkpoint(p))

    def _set_aside(self, names: list[str], why: str) -> None:
        """Moves unusable checkpoint directories to `checkpoints_incomplete/` (never deletes).

        Every process calls this with the same `names` (they list the same directory); the
        barriers keep the others from listing while process 0 moves."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xmodal_checkpoint_listed")
        if names and jax.process_index() == 0:
            self.quarantine.mkdir(parents=True, exist_ok=True)
            for name in names:
                dest = self.quarantine / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / name).rename(dest)
                print(
                    f"WARNING: skipping checkpoint {name} in {self.directory}: {why}. "
                    f"Moved to {dest}; resuming from the previous complete one.",
                    flush=True,
                )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("xmodal_checkpoint_set_aside")
        if names:
            self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


class BestCheckpointer:
    """Saves the state whenever `metric` improves; keeps the best one under `<workdir>/best`."""

    def __init__(self, workdir: epath.PathLike, metric: str, mode: str = "max"):
        if mode not in ("max", "min"):
            raise UserError(f"config.best_mode={mode!r}: use 'max' or 'min'.")
        self.metric, self.mode = metric, mode
        self.manager = ocp.CheckpointManager(
            metrics_lib.workdir_path(workdir) / "best",
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                best_fn=lambda metrics: metrics[metric],
                best_mode=mode,
                keep_checkpoints_without_metrics=False,
                create=True,
                enable_async_checkpointing=False,
            ),
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )
        best = self.manager.best_step()
        self.best_step = best
        self.best_value = None if best is None else float(self.manager.metrics(best)[metric])

    def update(self, step: int, metrics: Mapping[str, float], state: Any) -> bool:
        """Saves `state` if `metrics[metric]` beats the best so far; returns whether it did.

        `metrics` without `metric` (another evaluator ran) change nothing, but an evaluator
        that ran and does not report it is a config error."""
        evaluator = self.metric.rsplit("/", 1)[0] + "/"
        if self.metric not in metrics:
            if any(k.startswith(evaluator) for k in metrics):
                names = sorted(k for k in metrics if k.startswith(evaluator))
                raise UserError(
                    f"config.best_metric={self.metric!r} is not reported; that evaluator "
                    f"reports {names}."
                )
            return False
        value = float(metrics[self.metric])
        better = self.best_value is None or (
            value > self.best_value if self.mode == "max" else value < self.best_value
        )
        if not better or not np.isfinite(value):
            return False
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
            metrics={self.metric: value},
        )
        self.best_step, self.best_value = step, value
        return True

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _short(e: Exception, n: int = 200) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:n] + ("..." if len(text) > n else "")


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
