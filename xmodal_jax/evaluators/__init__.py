"""Evaluators: `config.evals` maps a name to `{type, dataset, split, pp, ...}`; `type` picks an
evaluator class from `EVALUATORS`, one module per kind: classification (and few-shot),
adaptation (A-distance, AdaBN, TENT), zeroshot, zeroshot_tent (TENT on a two-tower model's
image tower), gzsl, retrieval, itm, conse. An evaluator never sees the task: it is built as
`Evaluator(name, cfg, fns, mesh, batch_size)`, `fns` being the task's named prediction
functions (`Task.predict_fns()`: `predict` always; `adapt_batch_norm` and `apply_train_bn`
(batch-statistic BatchNorm, for TENT) for a classifier; the two-tower task's embedding
functions and its `zeroshot` set-up). Here: building them, when each is due, running them, and
their one-line summaries.
"""

from __future__ import annotations

import difflib
import importlib
import time
from collections.abc import Mapping
from typing import Any

import ml_collections
from jax.sharding import Mesh

from xmodal_jax.errors import UserError

# Every evaluator by its `type`, as "module:class"; a module is imported only when a config
# uses one of its evaluators. A new evaluator: its module, and one line here.
EVALUATORS = {
    "classification": "xmodal_jax.evaluators.classification:Classification",
    "fewshot": "xmodal_jax.evaluators.classification:FewShot",
    "a_distance": "xmodal_jax.evaluators.adaptation:ADistance",
    "adabn_classification": "xmodal_jax.evaluators.adaptation:AdaBNClassification",
    "tent_classification": "xmodal_jax.evaluators.adaptation:TentClassification",
    "zeroshot": "xmodal_jax.evaluators.zeroshot:ZeroShot",
    "zeroshot_unseen": "xmodal_jax.evaluators.zeroshot:ZeroShotUnseen",
    "zeroshot_control": "xmodal_jax.evaluators.zeroshot:ZeroShotControl",
    "zeroshot_tent": "xmodal_jax.evaluators.zeroshot_tent:ZeroShotTent",
    "gzsl": "xmodal_jax.evaluators.gzsl:GeneralizedZeroShot",
    "retrieval": "xmodal_jax.evaluators.retrieval:Retrieval",
    "itm": "xmodal_jax.evaluators.itm:ImageTextMatching",
    "conse": "xmodal_jax.evaluators.conse:ConSE",
}


def get(kind: str, where: str = "config.evals") -> type:
    """The evaluator class registered as `kind`."""
    if kind not in EVALUATORS:
        close = difflib.get_close_matches(kind, EVALUATORS, n=3)
        raise UserError(f"{where}.type={kind!r} unknown; closest: {close}; the types: "
                        f"{sorted(EVALUATORS)}.")  # fmt: skip
    module, cls = EVALUATORS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def build_all(
    config: ml_collections.ConfigDict, fns: Mapping[str, Any], mesh: Mesh
) -> dict[str, Any]:
    """Evaluator objects for every entry of `config.evals`, each handed the task's named
    prediction functions `fns` (`Task.predict_fns()`; as big_vision's `predict_fns`)."""
    out = {}
    for name, cfg in config.evals.items():
        evaluator = get(cfg.get("type", "classification"), f"config.evals.{name}")
        batch_size = cfg.get("batch_size", config.get("eval_batch_size", config.batch_size))
        out[name] = evaluator(name, cfg, fns, mesh, batch_size)
    return out


def due(config: ml_collections.ConfigDict, step: int) -> list[str]:
    """Evaluators to run after `step`: those whose `every` (default `config.eval_every`)
    divides it, and all of them at `config.total_steps`."""
    names = []
    for name, cfg in config.evals.items():
        every = cfg.get("every", config.eval_every)
        if (every and step % every == 0) or step == config.total_steps:
            names.append(name)
    return names


def run_all(evaluators: Mapping[str, Any], variables, progress: bool = False) -> dict[str, float]:
    """Flat `eval/<name>/<metric>` dict; with `progress`, one line per evaluator (its name when
    it starts, then its headline metrics and time), so a long evaluation shows where it is."""
    out = {}
    for i, (name, ev) in enumerate(evaluators.items(), 1):
        if progress:
            print(f"  [{i}/{len(evaluators)}] {name}: ", end="", flush=True)
        t0 = time.perf_counter()
        results = {f"eval/{name}/{k}": v for k, v in ev.run(variables).items()}
        out.update(results)
        if progress:
            (line,) = headline(results, every_metric=True) or [f"{name}: no metrics"]
            print(f"{line.partition(': ')[2]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def headline(results: Mapping[str, float], every_metric: bool = False) -> list[str]:
    """One `name: metric=value, ...` line per evaluator of flat `eval/<name>/<metric>` results:
    its first metric, or with `every_metric` all of them but the per-class and per-split ones
    (the full set is in `summary.json`)."""
    by_name: dict[str, list[str]] = {}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "eval":
            continue
        shown = by_name.setdefault(parts[1], [])
        if every_metric or not shown:
            shown.append(f"{parts[2]}={float(value):.4f}")
    return [f"{name}: {', '.join(values)}" for name, values in by_name.items()]
