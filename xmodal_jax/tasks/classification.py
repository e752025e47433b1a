"""Supervised classification, the task the others build on (domain adaptation, fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from xmodal_jax import config as config_lib
from xmodal_jax import models
from xmodal_jax import pretrained as pretrained_lib
from xmodal_jax.data import pipeline
from xmodal_jax.objectives.adaptation import adabn, tent
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.tasks import Variables
from xmodal_jax.transfer import surgery

# `config.pretrained`: a `pretrained.load` name or path, and the surgery applied when its
# variables are merged into the model (regexes over `params/...` paths; the new head is fresh).
PRETRAINED_DEFAULTS = {"name": None, "reinit": ("^params/head/",), "skip": ("^params/head/",)}


def pretrained_options(cfg: Any) -> dict[str, Any]:
    """`config.pretrained` over `PRETRAINED_DEFAULTS`; unknown keys are an error."""
    return config_lib.options(cfg, PRETRAINED_DEFAULTS, "config.pretrained")


class Classification:
    """Supervised classification of `batch['image']` into `batch['label']`.

    Config: `model` (with `num_classes`), `data` (`name`, `split`, `pp`), `label_smoothing`,
    `pretrained` (`PRETRAINED_DEFAULTS`: weights merged into the model at initialisation).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
        del mesh  # the loss is per example; the trainer shards the batch
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

    def predict_fns(self) -> dict[str, Any]:
        return {
            "predict": self.predict,
            "adapt_batch_norm": self.adapt_batch_norm,
            "apply_train_bn": self.apply_train_bn,
        }

    def adapt_batch_norm(self, variables: Variables, images: Iterable[np.ndarray]) -> Variables:
        """`variables` with every BatchNorm's statistics re-estimated on `images` (AdaBN)."""
        return adabn.adapt_batch_norm(self.model, variables, images, train=False)

    def apply_train_bn(
        self,
        variables: Variables,
        batch: dict,
        norm_params: dict | None = None,
    ) -> tuple[dict[str, jax.Array], dict]:
        """`(outputs, norm_params)`: the model on `batch['image']` with dropout off and every
        BatchNorm normalising with the statistics of the batch's real rows (`batch['_mask']`
        when given), its affine parameters replaced by `norm_params` when given; the returned
        `norm_params` (`{bn path: {'scale', 'bias'}}`) are those used (TENT's parameters)."""
        return tent.apply_with_batch_stats(
            self.model, variables, batch["image"], norm_params, batch.get("_mask"), train=False
        )
