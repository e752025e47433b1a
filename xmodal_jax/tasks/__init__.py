"""Tasks: what a training config trains. A task owns its model, input and loss; the trainer
only sees `init`, `loss`, `train_iterator` and `predict_fns` (what the evaluators are handed).

`config.task` picks one by name from `TASKS`, one module per task here: classification,
domain_adaptation, finetune, source_free, two_tower, zeroshot_adaptation. A new task is one
new module and one line in `TASKS`.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Protocol

import flax.linen as nn
import grain
import jax
import ml_collections
from jax.sharding import Mesh

from xmodal_jax.errors import UserError

Variables = dict[str, Any]
Metrics = dict[str, jax.Array]


class Task(Protocol):
    """Built as `Task(config, mesh)` (see `build`)."""

    model: nn.Module

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator: ...

    def init(self, rng: jax.Array, batch: dict) -> Variables: ...

    def loss(
        self, params: Any, model_state: Variables, batch: dict, rng: jax.Array, progress: jax.Array
    ) -> tuple[jax.Array, tuple[Variables, Metrics]]: ...

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]: ...

    def predict_fns(self) -> dict[str, Any]:
        """Named prediction functions for the evaluators (`predict` always)."""
        ...


# Every task by its `config.task` name, as "module:class"; a task's module is imported only when
# a config names it. A new task: its module, and one line here.
TASKS = {
    "classification": "xmodal_jax.tasks.classification:Classification",
    "domain_adaptation": "xmodal_jax.tasks.domain_adaptation:DomainAdaptation",
    "finetune": "xmodal_jax.tasks.finetune:FineTune",
    "source_free": "xmodal_jax.tasks.source_free:SourceFree",
    "two_tower": "xmodal_jax.tasks.two_tower:TwoTower",
    "zeroshot_adaptation": "xmodal_jax.tasks.zeroshot_adaptation:ZeroShotAdaptation",
}


def build(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Task:
    """The task `config.task` names (default `classification`), built from `config`; `mesh` is
    the trainer's device mesh (a task whose loss is sharded over it uses it; None: the task
    builds `config.mesh` itself when it needs one, as when a test builds a task alone)."""
    name = config.get("task", "classification")
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        raise UserError(
            f"config.task={name!r} unknown; closest: {close}; the tasks: {sorted(TASKS)}."
        )
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, mesh)
