"""Metric sinks: `metrics.jsonl` (one object per line, each with `step`) and TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np


def _scalar(v) -> float:
    return float(np.asarray(v))


class MetricWriter:
    """Appends to `<workdir>/metrics.jsonl` and TensorBoard; only process 0 writes."""

    def __init__(self, workdir: str, *, active: bool = True, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.active = active
        self._tb = None
        if active:
            self._truncate_after(resume_step)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        """Drops lines logged after the checkpoint we resume from (they will be logged again)
        and a last line cut short by a killed run."""
        if not os.path.exists(self.path):
            return
        kept = [json.dumps(row) + "\n" for row in _parse(self.path) if row["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.active or not metrics:
            return
        row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parse(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # blank, or cut short when a run was killed mid-write
    return rows


def read(workdir: str) -> list[dict]:
    """All complete rows of `metrics.jsonl`."""
    path = os.path.join(workdir, "metrics.jsonl")
    return _parse(path) if os.path.exists(path) else []


def write_json(path: str, obj) -> None:
    """Writes JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
