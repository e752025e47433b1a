"""Tasks: what a training config trains. A task owns its model, input and loss; the trainer
only sees `init`, `loss`, `predict` and `train_iterator`.

`config.task` picks one by name: `classification` (here) or the module
`xmodal_jax/train/<name>.py` that defines `Task`, so a new task is one new file.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Protocol

import flax.linen as nn
import grain
import jax
import ml_collections
import numpy as np

from xmodal_jax import config as config_lib
from xmodal_jax import models
from xmodal_jax import pretrained as pretrained_lib
from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.transfer import surgery

Variables = dict[str, Any]
Metrics = dict[str, jax.Array]

# `config.pretrained`: a `pretrained.load` name or path, and the surgery applied when its
# variables are merged into the model (regexes over `params/...` paths; the new head is fresh).
PRETRAINED_DEFAULTS = {"name": None, "reinit": ("^params/head/",), "skip": ("^params/head/",)}


def pretrained_options(cfg: Any) -> dict[str, Any]:
    """`config.pretrained` over `PRETRAINED_DEFAULTS`; unknown keys are an error."""
    return config_lib.options(cfg, PRETRAINED_DEFAULTS, "config.pretrained")


class Task(Protocol):
    model: nn.Module

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator: ...

    def init(self, rng: jax.Array, batch: dict) -> Variables: ...

    def loss(
        self, params: Any, model_state: Variables, batch: dict, rng: jax.Array, progress: jax.Array
    ) -> tuple[jax.Array, tuple[Variables, Metrics]]: ...

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]: ...


class Classification:
    """Supervised classification of `batch['image']` into `batch['label']`.

    Config: `model` (with `num_classes`), `data` (`name`, `split`, `pp`), `label_smoothing`,
    `pretrained` (`PRETRAINED_DEFAULTS`: weights merged into the model at initialisation).
    """

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.model = models.build(config.model)
        self.pretrained_opts = pretrained_options(config.get("pretrained"))
        self.loaded = None  # the pretrained variables, when config.pretrained.name is set
        self.indices = None  # rows of the training split to train on (None: all of them)
        if self.pretrained_opts["name"]:
            enc = pretrained_lib.load(self.pretrained_opts["name"])
            self.loaded = jax.tree.map(np.asarray, dict(enc.variables))

    def merge_pretrained(self, target: Variables) -> Variables:
        """`target` (variables or their shapes) with the pretrained values merged in."""
        return dict(
            surgery.merge(
                target,
                self.loaded,
                reinit=tuple(self.pretrained_opts["reinit"]),
                skip=tuple(self.pretrained_opts["skip"]),
                source=f"pretrained {self.pretrained_opts['name']!r}",
            )
        )

    def train_iterator(self, process_index: int, process_count: int) -> grain.DatasetIterator:
        return pipeline.train_iterator(
            self.config.data,
            batch_size=self.config.batch_size,
            seed=self.config.seed,
            process_index=process_index,
            process_count=process_count,
            indices=self.indices,
        )

    def init(self, rng: jax.Array, batch: dict) -> Variables:
        variables = dict(self.model.init({"params": rng, "dropout": rng}, batch["image"]))
        return variables if self.loaded is None else self.merge_pretrained(variables)

    def apply(self, params, model_state, images, rng, train: bool):
        """Forward pass; returns outputs and the updated non-parameter state."""
        variables = {"params": params, **model_state}
        if train and model_state:
            return self.model.apply(
                variables, images, train=True, rngs={"dropout": rng}, mutable=list(model_state)
            )
        return self.model.apply(variables, images, train=train, rngs={"dropout": rng}), model_state

    def loss(self, params, model_state, batch, rng, progress):
        del progress
        out, model_state = self.apply(params, model_state, batch["image"], rng, train=True)
        logits = out["logits"]
        loss = softmax_xent(
            logits, batch["label"], label_smoothing=self.config.get("label_smoothing", 0.0)
        )
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, (model_state, {"accuracy": accuracy})

    def predict(self, variables: Variables, batch: dict) -> dict[str, jax.Array]:
        return self.model.apply(variables, batch["image"], train=False)


# Every task by its `config.task` name, as "module:class"; a task's module is imported only when
# a config names it. A new task: its module, and one line here.
TASKS = {
    "classification": "xmodal_jax.train.tasks:Classification",
    "domain_adaptation": "xmodal_jax.train.domain_adaptation:DomainAdaptation",
    "finetune": "xmodal_jax.train.finetune:FineTune",
    "two_tower": "xmodal_jax.train.two_tower:TwoTower",
}


def build(config: ml_collections.ConfigDict) -> Task:
    """The task `config.task` names (default `classification`), built from `config`."""
    name = config.get("task", "classification")
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3)
        raise UserError(
            f"config.task={name!r} unknown; closest: {close}; the tasks: {sorted(TASKS)}."
        )
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)
