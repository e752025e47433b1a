"""Classification evaluators: top-k accuracy, loss, per-class accuracy and the confusion
matrix of a classifier, and few-shot linear probes on its features.

Each runs one pass over its split with a jitted, batch-sharded step that returns sums (so
padding and several hosts are handled exactly), and reports `eval/<name>/<metric>`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib


def local_batches(data_cfg: Mapping[str, Any], batch_size: int):
    """This process's share of the evaluation batches of a split (padded, with `_mask`)."""
    return pipeline.eval_batches(
        data_cfg,
        batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def global_batches(data_cfg: Mapping[str, Any], batch_size: int, mesh: Mesh):
    """`(image, label, _mask)` batches of a split, global over the mesh."""
    for local in local_batches(data_cfg, batch_size):
        yield mesh_lib.global_batch({k: local[k] for k in ("image", "label", "_mask")}, mesh)


class Classification:
    """Top-1 / top-5 accuracy, loss, per-class accuracy and the confusion matrix of
    `predict(...)['logits']`.

    `mean_class_accuracy` averages the accuracy of each class present in the split;
    `class_accuracy/<class>` is reported per class when `cfg.per_class` (default: at most 20
    classes)."""

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        self.name, self.cfg, self.mesh, self.batch_size = name, cfg, mesh, batch_size
        self.data_cfg = pipeline.eval_data(cfg, f"config.evals.{name}")
        self.class_names = pipeline.class_names(self.data_cfg["name"], self.data_cfg["data_dir"])
        self.confusion: np.ndarray | None = None
        num_classes = len(self.class_names)
        self._per_class = cfg.get("per_class", num_classes <= 20)
        self._step = sums_step(fns["predict"], num_classes)

    def run(self, variables) -> dict[str, float]:
        totals = None
        for batch in global_batches(self.data_cfg, self.batch_size, self.mesh):
            part = self._step(variables, batch)
            totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
        return self.metrics(totals)

    def metrics(self, totals: Mapping[str, Any]) -> dict[str, float]:
        """The reported metrics of the `sums` of every batch added up."""
        totals = jax.device_get(totals)
        n = float(totals["count"])
        self.confusion = np.asarray(totals["confusion"])
        out = {
            "accuracy": float(totals["correct"]) / n,
            "top5_accuracy": float(totals["correct5"]) / n,
            "loss": float(totals["loss"]) / n,
        }
        return {**out, **per_class_accuracy(self.confusion, self.class_names, self._per_class)}


@functools.lru_cache(maxsize=16)
def sums_step(predict: Callable, num_classes: int) -> Callable:
    """The jitted `(variables, batch) -> sums` of `predict`'s logits, one per prediction
    function and class count: the evaluators of a run that score one model on batches of one
    shape (a split per corruption, say) share it, so JAX compiles it once, not once each."""

    def step(variables, batch):
        logits = predict(variables, batch)["logits"]
        return sums(logits, batch["label"], batch["_mask"], num_classes)

    return jax.jit(step)


def sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> dict:
    """Per-batch sums over the rows where `mask` is set: count, top-1 / top-5 correct, loss
    and the confusion matrix (rows true classes, columns predictions)."""
    logits, mask = logits.astype(jnp.float32), mask.astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    pred = logits.argmax(-1)
    onehot_true = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    return {
        "count": mask.sum(),
        "correct": ((pred == labels) * mask).sum(),
        "correct5": ((top5 == labels[:, None]).any(-1) * mask).sum(),
        "loss": (optax.softmax_cross_entropy_with_integer_labels(logits, labels) * mask).sum(),
        "confusion": onehot_true.T @ jax.nn.one_hot(pred, num_classes),
    }


def _metric_name(text: str) -> str:
    return "_".join(str(text).replace("/", " ").split())


def per_class_accuracy(
    confusion: np.ndarray, class_names: Sequence[str], each: bool = True
) -> dict[str, float]:
    """`mean_class_accuracy` over classes with examples, and `class_accuracy/<name>` for each
    of them if `each`; rows of `confusion` are true classes, columns predictions."""
    confusion = np.asarray(confusion, np.float64)
    support = confusion.sum(1)
    present = support > 0
    acc = np.diag(confusion)[present] / support[present]
    out = {"mean_class_accuracy": float(acc.mean())}
    if each:
        names = [n for n, p in zip(class_names, present, strict=True) if p]
        out.update(
            {f"class_accuracy/{_metric_name(n)}": float(a) for n, a in zip(names, acc, strict=True)}
        )
    return out


def ridge_fewshot_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    l2_reg: float,
) -> float:
    """Accuracy of an L2-regularised least-squares classifier fit on few labelled features.

    Features are standardised with the training set's mean and standard deviation, a constant
    column (100, so its weight, the bias, is barely regularised) is appended, and the targets
    are one-hot vectors scaled to {-1, +1}: the few-shot probe of big_vision
    (`big_vision/evaluators/fewshot_lsr.py`). Solved in float64, in the primal or the dual form,
    whichever system is smaller.
    """
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True) + 1e-5
    prep = lambda x: np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)
    a, b = prep(x_train), prep(x_test)
    y = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
    n, d = a.shape
    if n >= d:
        w = np.linalg.solve(a.T @ a + l2_reg * np.eye(d), a.T @ y)
    else:
        w = a.T @ np.linalg.solve(a @ a.T + l2_reg * np.eye(n), y)
    return float(np.mean((b @ w).argmax(1) == np.asarray(y_test)))


class FewShot:
    """Few-shot linear probe on frozen features: for each of `shots` (default 1, 5, 10, 25)
    examples per class drawn from `train_split`, a ridge classifier (`ridge_fewshot_accuracy`,
    `l2_reg`, default 2**10) on `predict(...)[representation]` (default `pooled`), scored on
    `split`. Reports `<k>shot_accuracy`, the mean over `seeds` (default 1) draws. The labels
    of `train_split` are read once to draw the examples; slice big splits (`'train[:20000]'`)."""

    def __init__(
        self, name: str, cfg: Mapping[str, Any], fns: Mapping[str, Any], mesh: Mesh, batch_size: int
    ):
        self.name, self.mesh, self.batch_size = name, mesh, batch_size
        self.shots = tuple(int(k) for k in cfg.get("shots", (1, 5, 10, 25)))
        self.l2_reg = float(cfg.get("l2_reg", 2.0**10))
        self.seeds = int(cfg.get("seeds", 1))
        self.test_cfg = pipeline.eval_data(cfg, f"config.evals.{name}")
        self.train_cfg = {**self.test_cfg, "split": cfg.get("train_split", "train")}
        data = self.test_cfg
        self.num_classes = len(pipeline.class_names(data["name"], data["data_dir"]))
        self._support: list[np.ndarray] | None = None
        rep = cfg.get("representation", "pooled")

        def features(variables, batch):
            out = fns["predict"](variables, batch)
            if rep not in out:
                raise UserError(
                    f"config.evals.{name}.representation={rep!r}: the model's outputs are "
                    f"{sorted(out)}; pick one of them."
                )
            index = batch.get("_index", jnp.zeros_like(batch["label"]))
            return out[rep].astype(jnp.float32), batch["label"], batch["_mask"], index

        self._features = jax.jit(features)

    def _train_source(self):
        cfg = self.train_cfg
        return pipeline.source(cfg["name"], cfg["split"], cfg["data_dir"])

    def _support_indices(self) -> list[np.ndarray]:
        """Per seed, `[classes, max(shots)]` training indices; the first k columns are k-shot."""
        if self._support is None:
            src = self._train_source()
            labels = np.asarray([int(src[i]["label"]) for i in range(len(src))])
            self._support = []
            for seed in range(self.seeds):
                rng = np.random.default_rng(seed)
                classes = range(self.num_classes)
                per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
                short = [c for c, idx in enumerate(per_class) if len(idx) < max(self.shots)]
                if short:
                    raise UserError(
                        f"config.evals.{self.name}: classes {short} have fewer than "
                        f"{max(self.shots)} training examples; lower `shots`."
                    )
                self._support.append(np.stack([idx[: max(self.shots)] for idx in per_class]))
        return self._support

    def _support_batches(self, indices: np.ndarray):
        """This process's rows of padded batches of the training examples at `indices`."""
        src, pp = self._train_source(), preprocess.compose(self.train_cfg["pp"])
        local = self.batch_size // jax.process_count()
        first = jax.process_index() * local
        for start in range(0, len(indices), self.batch_size):
            chunk = indices[start : start + self.batch_size]
            rows = [{**pp(src[int(i)]), "_mask": np.True_, "_index": np.int32(i)} for i in chunk]
            rows += [{**rows[0], "_mask": np.False_}] * (self.batch_size - len(rows))
            mine = rows[first : first + local]
            yield {k: np.stack([r[k] for r in mine]) for k in mine[0]}

    def _embed(self, variables, batches) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Features, labels and `_index` of every real (unpadded) example, from all processes."""
        outs = []
        for local in batches:
            numeric = {k: v for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
            batch = mesh_lib.global_batch(numeric, self.mesh)
            f, y, m, i = (
                np.asarray(multihost_utils.process_allgather(t, tiled=True))
                for t in self._features(variables, batch)
            )
            keep = m.astype(bool)
            outs.append((f[keep], y[keep], i[keep]))
        return tuple(np.concatenate(parts) for parts in zip(*outs, strict=True))

    def run(self, variables) -> dict[str, float]:
        support = self._support_indices()
        wanted = np.unique(np.concatenate([s.reshape(-1) for s in support]))
        x_pool, y_pool, idx_pool = self._embed(variables, self._support_batches(wanted))
        row_of = {int(i): r for r, i in enumerate(idx_pool)}
        x_test, y_test, _ = self._embed(
            variables,
            pipeline.eval_batches(
                self.test_cfg,
                batch_size=self.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ),
        )
        out = {}
        for k in self.shots:
            accs = []
            for per_class in support:
                rows = [row_of[int(i)] for i in per_class[:, :k].reshape(-1)]
                accs.append(
                    ridge_fewshot_accuracy(
                        x_pool[rows], y_pool[rows], x_test, y_test, self.num_classes, self.l2_reg
                    )
                )
            out[f"{k}shot_accuracy"] = float(np.mean(accs))
        return out
