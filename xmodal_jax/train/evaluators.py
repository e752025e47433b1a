"""Evaluators: `config.evals` maps a name to `{type, dataset, split, pp, ...}`.

Each evaluator runs one pass over its split with a jitted, batch-sharded step that returns
sums (so padding and several hosts are handled exactly), and reports `eval/<name>/<metric>`.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib


class Classification:
    """Top-1 / top-5 accuracy, loss and the confusion matrix of `predict(...)['logits']`."""

    def __init__(self, name: str, cfg: Mapping[str, Any], task, mesh: Mesh, batch_size: int):
        self.name, self.cfg, self.mesh, self.batch_size = name, cfg, mesh, batch_size
        self.data_cfg = {
            "name": cfg["dataset"],
            "split": cfg.get("split", "test"),
            "pp": cfg.get("pp", ""),
            "data_dir": cfg.get("data_dir"),
        }
        self.class_names = pipeline.class_names(cfg["dataset"], cfg.get("data_dir"))
        self.confusion: np.ndarray | None = None
        num_classes = len(self.class_names)

        def step(variables, batch):
            logits = task.predict(variables, batch)["logits"].astype(jnp.float32)
            labels, mask = batch["label"], batch["_mask"].astype(jnp.float32)
            top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
            pred = logits.argmax(-1)
            onehot_true = jax.nn.one_hot(labels, num_classes) * mask[:, None]
            return {
                "count": mask.sum(),
                "correct": ((pred == labels) * mask).sum(),
                "correct5": ((top5 == labels[:, None]).any(-1) * mask).sum(),
                "loss": (
                    optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask
                ).sum(),
                "confusion": onehot_true.T @ jax.nn.one_hot(pred, num_classes),
            }

        self._step = jax.jit(step)

    def run(self, variables) -> dict[str, float]:
        totals = None
        for local in pipeline.eval_batches(
            self.data_cfg,
            batch_size=self.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            batch = mesh_lib.global_batch(
                {k: local[k] for k in ("image", "label", "_mask")}, self.mesh
            )
            sums = self._step(variables, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        n = float(totals["count"])
        self.confusion = np.asarray(totals["confusion"])
        return {
            "accuracy": float(totals["correct"]) / n,
            "top5_accuracy": float(totals["correct5"]) / n,
            "loss": float(totals["loss"]) / n,
        }


EVALUATORS = {"classification": Classification}


def build_all(config: ml_collections.ConfigDict, task, mesh: Mesh) -> dict[str, Any]:
    """Evaluator objects for every entry of `config.evals`."""
    out = {}
    for name, cfg in config.evals.items():
        kind = cfg.get("type", "classification")
        if kind not in EVALUATORS:
            close = difflib.get_close_matches(kind, EVALUATORS, n=3)
            raise UserError(f"config.evals.{name}.type={kind!r} unknown; closest: {close}.")
        if "dataset" not in cfg:
            raise UserError(f"config.evals.{name} has no 'dataset'; set the TFDS name to use.")
        batch_size = cfg.get("batch_size", config.get("eval_batch_size", config.batch_size))
        out[name] = EVALUATORS[kind](name, cfg, task, mesh, batch_size)
    return out


def run_all(evaluators: Mapping[str, Any], variables) -> dict[str, float]:
    """Flat `eval/<name>/<metric>` dict."""
    return {
        f"eval/{name}/{k}": v
        for name, ev in evaluators.items()
        for k, v in ev.run(variables).items()
    }
