"""Test-time adaptation of a two-tower zero-shot classifier: TENT on its image tower.

    evals.shift_unseen_tent = {'type': 'zeroshot_tent', 'classes': 'unseen',
                               'dataset': ..., 'split': 'test', 'pp': ...,
                               'optimizer': 'adam', 'lr': 1e-3, 'steps': 1, 'episodic': False,
                               'batch_size': 128, 'statistics': 'batch'}

TENT (Wang et al., ICLR 2021; `objectives.adaptation.tent`) with the zero-shot logits as the
classifier: for each scored head, the test images of the classes it is scored on (`classes`, as
in `zeroshot`) are read once, in the split's order, in batches of `batch_size` (default 128, the
official code's default; its CIFAR-10-C config uses 200). For each batch, `steps` times: the
image tower runs with every BatchNorm normalising with the batch's statistics, the head projects
and normalises its output, the logits are `exp(log_scale) * cos` with the head's class-prompt
embeddings of those classes (text anchors fixed), and one optimiser step on the mean entropy
moves only the tower's BN scales and biases; the batch's predictions are those of its last
forward pass, before its update; `steps=0` updates nothing (with batch statistics: test-time
BatchNorm alone, the TENT code's `norm` baseline). `statistics='source'` keeps the tower's
running statistics instead (only the BN affine parameters adapt): a variant for a tower whose
running statistics are those its head was trained with, e.g. a locked ImageNet tower under heads
trained on its inference-mode features, which batch statistics would shift away from what the
heads saw. The adapted parameters carry over to the next batch of the same head's stream
(`episodic`: reset before every batch) and start afresh for the next head: each head is its own
deployment. The given variables never change.

This is the test-time setting (online on the test stream: a stream of unseen-class images when
scoring unseen classes); report it in its own row, never with the inductive or transductive
ones. Reports `accuracy` (mean over heads, and per split), `chance` and `adapt/entropy` (mean
over batches and heads). The image tower must have BatchNorm layers; it runs in this process
(single-process runs; a locked tower's cached features are not used here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluators.adaptation import tent_options
from xmodal_jax.evaluators.zeroshot import ZeroShot, split_key
from xmodal_jax.objectives.adaptation import tent

STATISTICS = ("batch", "source")


@functools.lru_cache(maxsize=16)
def _step(embed: Callable, options: tuple) -> tuple[Any, optax.GradientTransformation]:
    """TENT's jitted `(variables, tower_vars, head, norm, opt_state, images, mask, classifier,
    scale) -> (norm, opt_state, logits, entropy)` and its optimiser, one per model and options
    (shared by the evaluators of one model, so JAX compiles it once per class count)."""
    opts = dict(options)
    tx, steps = tent.optimizer(opts), int(opts["steps"])
    batch_statistics = opts["statistics"] == "batch"

    def adapt(variables, tower_vars, head, norm, opt_state, images, mask, classifier, scale):
        def loss_fn(p):
            emb, _ = embed(variables, tower_vars, images, p, mask, batch_statistics)
            logits = scale * (emb[head] @ classifier.T)
            return tent.entropy_loss(logits, mask), logits

        for _ in range(steps):
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(norm)
            updates, opt_state = tx.update(grads, opt_state, norm)
            norm = optax.apply_updates(norm, updates)
        if not steps:  # the normalisation alone, no update (see the module docstring)
            loss, logits = loss_fn(norm)
        return norm, opt_state, logits, loss

    return jax.jit(adapt), tx


class ZeroShotTent(ZeroShot):
    """See the module docstring."""

    default_classes = "unseen"

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        where = f"config.evals.{name}"
        if cfg.get("score", "cosine") != "cosine":
            raise UserError(f"{where}.score={cfg['score']!r}: TENT adapts the cosine logits.")
        super().__init__(name, cfg, fns, mesh, batch_size)
        if jax.process_count() > 1:
            raise UserError(
                f"{where}.type='zeroshot_tent' runs in one process; evaluate with one host."
            )
        self.opts = {**tent_options(cfg, where), "statistics": cfg.get("statistics", "batch")}
        if self.opts["statistics"] not in STATISTICS:
            raise UserError(
                f"{where}.statistics={self.opts['statistics']!r}: use one of {STATISTICS}."
            )
        options = tuple(sorted((k, v) for k, v in self.opts.items() if k != "episodic"))
        self._embed = fns["tent_image_embeddings"]
        self._adapt, self._tx = _step(self._embed, options)

    def stream(self, classes: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`(images, labels, mask)` of the split's images of `classes`, in order, every batch
        padded to `batch_size` (padding rows: zeros, `mask` False)."""
        cfg = self.data_cfg
        labels = pipeline.split_labels(cfg["name"], cfg["split"], cfg.get("data_dir"))
        rows = np.flatnonzero(np.isin(labels, classes))
        if not len(rows):
            raise UserError(
                f"config.evals.{self.name}: {cfg['name']}:{cfg['split']} has no example of "
                f"classes {classes.tolist()}."
            )
        batches = pipeline.row_batches(cfg, rows, "image", self.batch_size)
        for start, images in zip(range(0, len(rows), self.batch_size), batches, strict=True):
            n = len(images)
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), images.dtype)
            mask = np.arange(self.batch_size) < n
            yield np.concatenate([images, pad]), labels[rows[start : start + n]], mask

    def initial(self, variables, tower_vars, images, mask) -> tuple[Any, Any]:
        """The loaded BN affine parameters of the image tower and a fresh optimiser state."""
        try:
            _, norm = jax.jit(self._embed)(variables, tower_vars, images, None, mask)
        except ValueError as e:
            raise UserError(
                f"config.evals.{self.name}.type='zeroshot_tent': {e} Use an image tower with "
                "BatchNorm (e.g. MobileNetV2 or ResNet)."
            ) from None
        return norm, self._tx.init(norm)

    def adapt_head(self, variables, tower_vars, head: int, classes, classifier, scale):
        """`(correct, count, entropies)` of one head's online TENT stream."""
        correct, count, entropies, fresh, state = 0, 0, [], None, None
        for images, labels, mask in self.stream(classes):
            if fresh is None:
                fresh = self.initial(variables, tower_vars, images, mask)
            if state is None or self.opts["episodic"]:
                state = fresh
            *state, logits, entropy = self._adapt(
                variables, tower_vars, head, *state, images, mask, classifier, scale
            )
            pred = classes[np.argmax(np.asarray(logits)[mask], axis=1)]
            correct += int(np.sum(pred == labels))
            count += len(labels)
            entropies.append(float(entropy))
        return correct, count, entropies

    def run(self, variables) -> dict[str, float]:
        classifier, _ = self.fns["class_embeddings"](variables, self.templates)
        scales = self.fns["logit_scales"](variables)
        tower_vars = self.fns["image_tower_variables"](variables)
        per_head, entropies = {}, []
        for i, head in self.heads:
            classes = self._class_subset(head)
            correct, count, ent = self.adapt_head(
                variables, tower_vars, i, classes, jnp.asarray(classifier[i][classes]), scales[i]
            )
            per_head[split_key(head)] = {"accuracy": correct / count}
            entropies.extend(ent)
        self.last = {k: v["accuracy"] for k, v in per_head.items()}
        self.chance = float(np.mean([1 / len(self._class_subset(h)) for _, h in self.heads]))
        out = self._mean_and_splits(per_head)
        return {**out, "chance": self.chance, "adapt/entropy": float(np.mean(entropies))}
