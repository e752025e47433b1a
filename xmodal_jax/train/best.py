"""The best checkpoint of a run (`config.best_metric`): saved under `<workdir>/best` whenever
the metric improves, beside the regular checkpoints of `checkpoint.Checkpointer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from xmodal_jax.errors import UserError
from xmodal_jax.train import metrics as metrics_lib


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
