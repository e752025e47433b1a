"""Evaluators for domain adaptation: proxy A-distance (+ t-SNE plot), AdaBN and TENT accuracy.

evals.a_distance = {'type': 'a_distance', 'source': {dataset, split, pp},
                    'target': {dataset, split, pp},    # -> eval/a_distance/value
                    'tsne_points': 1000,               # t-SNE plot of at most this many; 0: none
                    'adapt': {dataset, split, pp}}     # optional: target features after AdaBN
evals.target = {'type': 'adabn_classification', dataset, split, pp,
                'adapt': {dataset, split, pp}}         # BN statistics from `adapt` first
evals.target = {'type': 'tent_classification', dataset, split, pp,
                'optimizer': 'adam', 'lr': 1e-3,       # or 'sgd' (momentum 0.9, Nesterov)
                'steps': 1, 'episodic': False}         # online TENT over the split, in order
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from xmodal_jax.analysis import a_distance, tsne
from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluators import classification
from xmodal_jax.objectives.adaptation import tent
from xmodal_jax.parallel import mesh as mesh_lib


class _LastStatistics:
    """The statistics last re-estimated, with weak references to the variables they came from:
    the evaluators of one evaluation are handed the same variables, so two that adapt on the
    same split (a digits AdaBN run's `target` and `a_distance_adabn`) estimate them once. Only
    the statistics are held (the variables are not kept alive), and only for immutable
    `jax.Array` leaves, whose identity implies their values."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self.key: tuple | None = None
        self.stats: Any = None

    def get(self, variables, key: tuple) -> Any | None:
        leaves = jax.tree.leaves(variables)
        same = len(leaves) == len(self.refs) and all(
            r() is leaf for r, leaf in zip(self.refs, leaves, strict=True)
        )
        return self.stats if same and key == self.key else None

    def put(self, variables, key: tuple, stats: Any) -> None:
        leaves = jax.tree.leaves(variables)
        if not all(isinstance(leaf, jax.Array) for leaf in leaves):
            self.refs, self.key, self.stats = [], None, None
            return
        self.refs, self.key, self.stats = [weakref.ref(leaf) for leaf in leaves], key, stats


_LAST = _LastStatistics()


def _adapted(fns: Mapping[str, Any], adapt: Mapping[str, Any], variables, batch_size: int):
    """`variables` with every BatchNorm's statistics re-estimated on the `adapt` split's images
    (its real rows only: a padded row would enter the statistics); the task's
    `adapt_batch_norm` changes `batch_stats` only."""
    key = (fns["adapt_batch_norm"], repr(sorted(adapt.items())), batch_size)
    stats = _LAST.get(variables, key)
    if stats is None:
        images = (
            local["image"][local["_mask"]]
            for local in classification.local_batches(adapt, batch_size)
        )
        stats = fns["adapt_batch_norm"](variables, images)["batch_stats"]
        _LAST.put(variables, key, stats)
    return {**variables, "batch_stats": stats}


def _needs_adabn(fns: Mapping[str, Any], where: str) -> None:
    if "adapt_batch_norm" not in fns:
        raise UserError(
            f"{where} re-estimates BatchNorm statistics; use it with a classification, "
            "domain_adaptation or finetune task."
        )


class ADistance:
    """Proxy A-distance 2(1 - 2ε) of a domain classifier on the model's pooled features.

    With `adapt` (unlabelled target images), the target's features are those of AdaBN's model:
    BatchNorm statistics re-estimated on `adapt`, while the source keeps the model's own; each
    domain then goes through its own statistics, as AdaBN classifies them."""

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
        self.adapt = None
        if "adapt" in cfg:
            self.adapt = pipeline.eval_data(cfg["adapt"], f"config.evals.{name}.adapt")
            _needs_adabn(fns, f"config.evals.{name}.adapt")
        self.fns = fns
        self._pooled = jax.jit(lambda variables, batch: fns["predict"](variables, batch)["pooled"])
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def _features(self, variables, data_cfg: dict) -> np.ndarray:
        out = []
        for local in classification.local_batches(data_cfg, self.batch_size):
            batch = mesh_lib.global_batch({"image": local["image"]}, self.mesh)
            feats = multihost_utils.process_allgather(self._pooled(variables, batch), tiled=True)
            mask = multihost_utils.process_allgather(local["_mask"], tiled=False).reshape(-1)
            out.append(np.asarray(feats)[mask])
        return np.concatenate(out)

    def run(self, variables) -> dict[str, float]:
        target_variables = variables
        if self.adapt is not None:
            target_variables = _adapted(self.fns, self.adapt, variables, self.batch_size)
        fs = self._features(variables, self.source)
        ft = self._features(target_variables, self.target)
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
        _needs_adabn(fns, f"config.evals.{name}.type='adabn_classification'")
        self.fns = fns

    def run(self, variables) -> dict[str, float]:
        return super().run(_adapted(self.fns, self.adapt, variables, self.batch_size))


def tent_options(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """TENT's options of an evaluator block (`tent.DEFAULTS` where `cfg` is silent), checked."""
    opts = {k: cfg.get(k, v) for k, v in tent.DEFAULTS.items()}
    if opts["optimizer"] not in tent.OPTIMIZERS:
        raise UserError(f"{where}.optimizer={opts['optimizer']!r}: use one of {tent.OPTIMIZERS}.")
    if int(opts["steps"]) < 0 or float(opts["lr"]) <= 0:
        raise UserError(
            f"{where}: TENT needs steps >= 0 (0: normalise only, no update) and lr > 0, got {opts}."
        )
    return opts


@functools.lru_cache(maxsize=16)
def _tent_step(apply_train_bn: Callable, options: tuple, num_classes: int) -> tuple[Any, Any]:
    """TENT's jitted `(variables, norm, opt_state, batch) -> (norm, opt_state, sums)` and its
    optimiser, one per model, options and class count (shared by the evaluators that adapt
    one model to several streams, so JAX compiles it once)."""
    opts = dict(options)
    tx, steps = tent.optimizer(opts), int(opts["steps"])

    def adapt(variables, norm, opt_state, batch):
        def loss_fn(p):
            out, _ = apply_train_bn(variables, batch, p)
            return tent.entropy_loss(out["logits"], batch["_mask"]), out["logits"]

        for _ in range(steps):
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(norm)
            updates, opt_state = tx.update(grads, opt_state, norm)
            norm = optax.apply_updates(norm, updates)
        if not steps:  # test-time BatchNorm statistics alone (the TENT code's `norm` baseline)
            loss, logits = loss_fn(norm)
        part = classification.sums(logits, batch["label"], batch["_mask"], num_classes)
        return norm, opt_state, {**part, "entropy": loss}

    return jax.jit(adapt), tx


class TentClassification(classification.Classification):
    """Accuracy of online TENT (`objectives.adaptation.tent`) over the evaluated split.

    The split is read once, in its fixed order, batch after batch (`batch_size` is TENT's batch;
    the official code's default is 128, its CIFAR-10-C config's 200). For each batch: `steps`
    times, the model runs with batch-statistic BatchNorm (`fns['apply_train_bn']`), the mean
    entropy of its predictions on the batch's real rows is taken and the BN scales and biases
    take one optimiser step; the batch's predictions (scored as `classification`) are those of
    the last forward pass, before its update (`steps=0`: no update, each batch normalised with
    its own statistics, the TENT code's `norm` baseline). The adapted BN parameters and the
    optimiser state carry over to the next batch (online), or are reset to the trained ones
    before every batch with `episodic`. Every run starts from the given `variables`, which are
    never changed (the adapted parameters are a separate tree); `adapt/entropy` is the mean over
    batches of the loss.
    """

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        super().__init__(name, cfg, fns, mesh, batch_size)
        where = f"config.evals.{name}"
        if "apply_train_bn" not in fns:
            raise UserError(
                f"{where}.type='tent_classification' adapts BatchNorm layers; use it with a "
                "classification, domain_adaptation or finetune task."
            )
        self.opts = tent_options(cfg, where)
        self._apply = fns["apply_train_bn"]
        options = tuple(sorted((k, v) for k, v in self.opts.items() if k != "episodic"))
        self._adapt, self._tx = _tent_step(self._apply, options, len(self.class_names))

    def initial(self, variables, batch) -> tuple[Any, Any]:
        """The trained BN affine parameters and a fresh optimiser state for them."""
        try:
            _, norm = jax.jit(self._apply)(variables, batch)
        except ValueError as e:
            raise UserError(
                f"config.evals.{self.name}.type='tent_classification': {e} For LeNet set "
                "config.model.norm='batch'."
            ) from None
        return norm, self._tx.init(norm)

    def run(self, variables) -> dict[str, float]:
        totals, fresh, state, batches = None, None, None, 0
        for batch in classification.global_batches(self.data_cfg, self.batch_size, self.mesh):
            if fresh is None:
                fresh = self.initial(variables, batch)
                state = fresh
            if self.opts["episodic"]:
                state = fresh
            norm, opt_state, part = self._adapt(variables, *state, batch)
            state = (norm, opt_state)
            batches += 1
            totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
        entropy = float(totals.pop("entropy")) / batches
        return {**self.metrics(totals), "adapt/entropy": entropy}
