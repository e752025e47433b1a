"""Metric sinks: `metrics.jsonl` (one object per line, each with `step`) and TensorBoard.

Every workdir access goes through `etils.epath`, so a workdir may be local or remote
(`gs://...`: epath's fsspec backend with `gcsfs`, or `tf.io.gfile` when TensorFlow is installed).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping

import numpy as np
from etils import epath

from xmodal_jax.errors import UserError

# How often a remote workdir receives a fresh copy of the TensorBoard event files.
TENSORBOARD_UPLOAD_SECS = 60.0


def is_remote(path: epath.PathLike) -> bool:
    """Whether `path` is a URI (`gs://`, `s3://`, ...) rather than a local file system path."""
    return "://" in os.fspath(path)


def workdir_path(workdir: epath.PathLike) -> epath.Path:
    """`workdir` as an `epath.Path`: a local one made absolute, a URI kept as given (after
    checking that this installation can reach its scheme)."""
    text = os.fspath(workdir)
    if not is_remote(text):
        return epath.Path(text).expanduser().resolve()
    scheme = text.split("://", 1)[0]
    try:
        path = epath.Path(text)
    except KeyError:
        raise UserError(
            f"--workdir {text}: the scheme {scheme}:// is not supported; use a local path or "
            "gs:// (also s3://, az://, hf://)."
        ) from None
    if importlib.util.find_spec("tensorflow") is None:  # else epath uses tf.io.gfile
        import fsspec

        try:
            fsspec.get_filesystem_class(scheme)
        except (ImportError, ValueError) as e:
            raise UserError(
                f"--workdir {text} cannot be reached: {e}. Install the package that gives "
                f"fsspec the scheme {scheme}:// (gcsfs for gs://, s3fs for s3://)."
            ) from None
    return path


def workdir_problem(workdir: epath.PathLike) -> str | None:
    """Why this process cannot write `workdir` (a local path), or None if it can; checked
    without creating anything. A remote workdir is not checked here (its writes say)."""
    text = os.fspath(workdir)
    if is_remote(text):
        return None
    if os.path.exists(text):
        if not os.path.isdir(text):
            return "is a file, not a directory"
        if not os.access(text, os.W_OK | os.X_OK):
            return "is not writable by this user"
        return None
    parent = os.path.dirname(text)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be made: {parent} is a file"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be made: {parent} is not writable by this user"
    return None


def check_train_workdir(workdir: epath.Path) -> None:
    """A UserError if `train` cannot write `workdir` (nothing is created)."""
    problem = workdir_problem(workdir)
    if problem:
        raise UserError(f"--workdir {workdir} {problem}; choose another --workdir.")


def check_eval_workdir(workdir: epath.Path) -> None:
    """A UserError unless `workdir` exists (a mistyped one is not made)."""
    local = not is_remote(workdir)
    if local and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a workdir.")
    if not (os.path.isdir(workdir) if local else workdir.exists()):
        raise UserError(f"--workdir {workdir} does not exist; give the workdir a run trained in.")


def check_has_checkpoints(workdir: epath.Path) -> None:
    """A UserError unless `<workdir>/checkpoints` holds a checkpoint."""
    ckpts = workdir / "checkpoints"
    if not ckpts.is_dir() or not any(p.name.isdigit() for p in ckpts.iterdir()):
        raise UserError(f"No checkpoint in {ckpts}; train there first.")


def write_bytes(path: epath.PathLike, data: bytes) -> None:
    """Writes `data` atomically (temp name + rename), so a crash never leaves half a file."""
    path = epath.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text(path: epath.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) atomically."""
    write_bytes(path, text.encode())


def write_json(path: epath.PathLike, obj) -> None:
    """Writes JSON atomically (temp name + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _scalar(v) -> float:
    return float(np.asarray(v))


def _line(row: Mapping) -> str:
    return json.dumps(row) + "\n"


def _summary_writer_class():
    """tensorboardX's `SummaryWriter`, imported without PyTorch. tensorboardX imports torch
    whenever it is installed, only to accept torch tensors (we log floats): one to two seconds
    and a few hundred MB at every start of a run where torch happens to be installed."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Appends to `<workdir>/metrics.jsonl` and TensorBoard; only process 0 writes.

    A local `metrics.jsonl` is appended to line by line. Remote objects cannot be appended to, so
    there the whole file is rewritten (atomically) on every write. TensorBoard events go to
    `<workdir>/tensorboard`; for a remote workdir tensorboardX writes them to a local temporary
    directory and they are copied over at most every `TENSORBOARD_UPLOAD_SECS` and at `close()`
    (tensorboardX reaches `gs://` only through google-cloud-storage, not through epath).
    """

    def __init__(self, workdir: epath.PathLike, *, active: bool = True, resume_step: int = 0):
        workdir = workdir_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self.active = active
        self.remote = is_remote(workdir)
        self._tb = self._tb_local = None
        self._tb_remote = workdir / "tensorboard"
        self._rows: list[str] = []  # the whole file, kept only for a remote workdir
        self._uploaded = 0.0
        if active:
            self._truncate_after(resume_step)
            SummaryWriter = _summary_writer_class()
            if self.remote:
                self._tb_local = tempfile.mkdtemp(prefix="xmodal_tensorboard_")
                self._tb = SummaryWriter(self._tb_local)
            else:
                self._tb = SummaryWriter(os.fspath(self._tb_remote))

    def _truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint we resume from (they will be logged again)
        and a last line cut short by a killed run."""
        if not self.path.exists():
            return
        self._rows = [_line(row) for row in _parse(self.path) if row["step"] <= step]
        write_text(self.path, "".join(self._rows))
        if not self.remote:
            self._rows = []

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs `metrics` at `step` (process 0 only)."""
        if not self.active or not metrics:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if self.remote:
            self._rows.append(_line(row))
            write_text(self.path, "".join(self._rows))
        else:
            with self.path.open("a") as f:
                f.write(_line(row))
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self.remote and time.monotonic() - self._uploaded >= TENSORBOARD_UPLOAD_SECS:
            self._upload()

    def _upload(self) -> None:
        """Copies the local event files to `<workdir>/tensorboard` (remote workdir only)."""
        self._tb_remote.mkdir(parents=True, exist_ok=True)
        for f in epath.Path(self._tb_local).iterdir():
            f.copy(self._tb_remote / f.name, overwrite=True)
        self._uploaded = time.monotonic()

    def close(self) -> None:
        """Flushes and closes TensorBoard; a remote workdir gets the final event files."""
        if self._tb is None:
            return
        self._tb.close()
        self._tb = None
        if self._tb_local is not None:
            self._upload()
            shutil.rmtree(self._tb_local, ignore_errors=True)


def _parse(path: epath.Path) -> list[dict]:
    rows = []
    for line in io.StringIO(path.read_text()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # blank, or cut short when a run was killed mid-write
    return rows


def read(workdir: epath.PathLike) -> list[dict]:
    """All complete rows of `metrics.jsonl`."""
    path = workdir_path(workdir) / "metrics.jsonl"
    return _parse(path) if path.exists() else []
