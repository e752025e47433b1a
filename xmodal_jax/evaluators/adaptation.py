"""Evaluators for domain adaptation: proxy A-distance (+ t-SNE plot) and AdaBN accuracy.

evals.a_distance = {'type': 'a_distance', 'source': {dataset, split, pp},
                    'target': {dataset, split, pp},    # -> eval/a_distance/value
                    'tsne_points': 1000}               # t-SNE plot of at most this many; 0: none
evals.target = {'type': 'adabn_classification', dataset, split, pp,
                'adapt': {dataset, split, pp}}         # BN statistics from `adapt` first
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from xmodal_jax.analysis import a_distance, tsne
from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluators import classification
from xmodal_jax.parallel import mesh as mesh_lib


def _local_batches(data_cfg: dict, batch_size: int):
    return pipeline.eval_batches(
        data_cfg,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


class ADistance:
    """Proxy A-distance 2(1 - 2ε) of a domain classifier on the model's pooled features."""

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        self.name, self.mesh, self.batch_size = name, mesh, batch_size
        self.source = pipeline.eval_data(cfg["source"], f"config.evals.{name}.source")
        self.target = pipeline.eval_data(cfg["target"], f"config.evals.{name}.target")
        self.seed = cfg.get("seed", 0)
        self.tsne_points = int(cfg.get("tsne_points", 1000))
        if self.tsne_points < 0:
            raise UserError(
                f"config.evals.{name}.tsne_points={self.tsne_points}: use a count >= 0 "
                "(0 writes no t-SNE plot)."
            )
        self._pooled = jax.jit(lambda variables, batch: fns["predict"](variables, batch)["pooled"])
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def _features(self, variables, data_cfg: dict) -> np.ndarray:
        out = []
        for local in _local_batches(data_cfg, self.batch_size):
            batch = mesh_lib.global_batch({"image": local["image"]}, self.mesh)
            feats = multihost_utils.process_allgather(self._pooled(variables, batch), tiled=True)
            mask = multihost_utils.process_allgather(local["_mask"], tiled=False).reshape(-1)
            out.append(np.asarray(feats)[mask])
        return np.concatenate(out)

    def run(self, variables) -> dict[str, float]:
        fs, ft = self._features(variables, self.source), self._features(variables, self.target)
        self._last = (fs, ft)
        result = a_distance.proxy_a_distance(fs, ft, seed=self.seed)
        return {"value": result["a_distance"], "domain_error": result["error"]}

    def plot(self, out_dir: str) -> list[str]:
        """t-SNE of the last evaluated source and target features."""
        if self._last is None or not self.tsne_points:
            return []
        path = os.path.join(out_dir, f"tsne_{self.name}.png")
        tsne.plot_tsne(
            *self._last, path, seed=self.seed, max_points=self.tsne_points, title=self.name
        )
        return [path]


class AdaBNClassification(classification.Classification):
    """Accuracy after re-estimating every BatchNorm's statistics on the `adapt` split."""

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        super().__init__(name, cfg, fns, mesh, batch_size)
        self.adapt = pipeline.eval_data(cfg["adapt"], f"config.evals.{name}.adapt")
        if "adapt_batch_norm" not in fns:
            raise UserError(
                f"config.evals.{name}.type='adabn_classification' re-estimates BatchNorm "
                "statistics; use it with a classification, domain_adaptation or finetune task."
            )
        self.adapt_batch_norm = fns["adapt_batch_norm"]

    def run(self, variables) -> dict[str, float]:
        images = (
            local["image"][local["_mask"]] for local in _local_batches(self.adapt, self.batch_size)
        )
        adapted = self.adapt_batch_norm(variables, images)
        return super().run(adapted)
