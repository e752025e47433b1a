"""AdaBN on the locked image tower of `zeroshot_adaptation` (`config.adaptation.adabn=True`),
and the source statistics of `config.model.image.statistics='source'` (`source_tower`).

Li et al. (ICLR Workshop 2017): the image tower's BatchNorm statistics are re-estimated on the
unlabelled target images (`objectives.adaptation.adabn.adapt_batch_norm`, exact cumulative
moments), its weights kept. The adapted tower then computes the features of every split of the
target domain, training and evaluation alike; the source domain keeps the tower `two_tower`
built (as loaded, or with source statistics: below).
A split belongs to the target domain when it has the target's dataset name and `pp` (the
evaluators' `dataset` and `pp`), so a shifted test split evaluated with the target's `pp` is
seen through the adapted statistics. Its features are cached like the tower's own (the key
holds the adapted statistics' digest), and so are the statistics (a run of another seed reads
them).

Which target images set the statistics follows the run's setting: inductive, the rows of the
classes the heads train on (the labels serve that filter only); transductive, every row. The
tower is shared by the heads, so with several splits the inductive statistics would include
images of a head's unseen classes: inductive AdaBN needs the heads of one split. The test-time
setting (statistics of the test stream itself) is not offered here.

AdaBN assumes a source model whose statistics are those of its source domain; a pretrained
tower's are those of its pretraining data (ImageNet). `config.model.image.statistics='source'`
(default `'pretrained'`; a locked, cached image tower) re-estimates them the same way on the
training split's images of the classes the heads train on (`source_tower`), applied by
`two_tower` before anything reads the tower (`with_statistics`): the heads train on features of
their own domain's statistics, and AdaBN then swaps in the target's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from xmodal_jax import timing
from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.objectives.adaptation import adabn
from xmodal_jax.tasks import feature_cache
from xmodal_jax.tasks.two_tower_heads import Head
from xmodal_jax.tasks.two_tower_texts import CaptionTexts, ClassNameTexts
from xmodal_jax.tasks.two_tower_towers import STATISTICS, Tower


def statistics_classes(
    heads: Sequence[Head],
    num_classes: int,
    who: str = "config.adaptation.adabn",
    fix: str = "run one split per run (e.g. split=k), or set transductive=True",
) -> tuple[int, ...] | None:
    """The classes whose images set the inductive statistics (None: every class); one error,
    naming `who` and `fix`, when that union holds a head's unseen class."""
    union = sorted({c for h in heads for c in h.train_classes})
    held_out = sorted({c for h in heads for c in h.unseen} & set(union))
    if held_out:
        raise UserError(
            f"{who}: the heads' image tower is shared, so its statistics would include images "
            f"of classes {held_out} that a head holds out; {fix}."
        )
    return None if len(union) == num_classes else tuple(union)


def target_images(
    target: Mapping[str, Any], rows: np.ndarray | None, input_key: str, batch_size: int
) -> Iterator[np.ndarray]:
    """The preprocessed target images of `rows` (None: all) in batches, the last one short (no
    padding: a padded row would enter the statistics)."""
    src = pipeline.source(target["name"], target["split"], target.get("data_dir"))
    rows = np.arange(len(src)) if rows is None else np.asarray(rows)
    if not len(rows):
        raise UserError(f"config.data.target {target['name']}:{target['split']} has no rows.")
    return pipeline.row_batches(target, rows, input_key, batch_size)


def adapted_tower(
    tower: Tower,
    target: Mapping[str, Any],
    rows: np.ndarray | None,
    input_key: str,
    batch_size: int,
    cache: feature_cache.FeatureCache,
    phase: str = "AdaBN statistics",
    who: str = "config.adaptation.adabn",
) -> Tower:
    """`tower` with its BatchNorm statistics re-estimated on the target images of `rows` (None:
    all), in inference mode. The statistics depend on the tower, the images and the batching
    only, not on the seed or the heads' training, so they are cached like features: the runs of
    other seeds (and other heads of the same classes) read them instead of another pass."""
    if "batch_stats" not in (tower.variables or {}):
        raise UserError(
            f"{who}: the image tower {tower.opts['pretrained'] or ''}"
            f"{tower.opts['tower'] or ''} has no BatchNorm statistics to adapt."
        )
    digest = (
        "all" if rows is None else hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()
    )
    # The estimate reads the tower's weights and the images, not the statistics it replaces,
    # so those stay out of the key: a tower with source statistics finds the target's cached.
    weights = {k: v for k, v in tower.variables.items() if k != "batch_stats"}
    description = {
        "kind": "adabn_statistics",
        "tower": {**tower.description(), "weights": feature_cache.weights_digest(weights)},
        **feature_cache.split_description(target, input_key),
        "rows": digest,
        "batch_size": batch_size,
    }

    @timing.phase(phase)
    def compute() -> dict[str, np.ndarray]:
        images = target_images(target, rows, input_key, batch_size)
        adapted = adabn.adapt_batch_norm(tower.module, tower.variables, images)
        return traverse_util.flatten_dict(adapted["batch_stats"], sep="/")

    stats = traverse_util.unflatten_dict(cache.get_or_compute(description, compute), sep="/")
    return dataclasses.replace(tower, variables={**tower.variables, "batch_stats": stats})


def with_statistics(
    image_tower: Tower,
    text_tower: Tower,
    image_cached: bool,
    data: Mapping[str, Any],
    texts: ClassNameTexts | CaptionTexts,
    cache: feature_cache.FeatureCache,
) -> Tower:
    """The image tower `two_tower` reads, by `config.model.image.statistics`: `'pretrained'`
    (the default), as loaded; `'source'`, with the statistics of `source_tower`."""
    for tower in (image_tower, text_tower):
        if tower.opts["statistics"] not in STATISTICS:
            raise UserError(
                f"config.model.{tower.kind}.statistics={tower.opts['statistics']!r}; use one "
                f"of {STATISTICS}."
            )
    if text_tower.opts["statistics"] != "pretrained":
        raise UserError("config.model.text.statistics: only the image tower's can change.")
    if image_tower.opts["statistics"] == "pretrained":
        return image_tower
    if not image_cached:
        raise UserError(
            "config.model.image.statistics='source' re-estimates the statistics of a locked, "
            "cached image tower: set config.model.image.locked=True and a deterministic "
            "data.pp (a trained tower keeps its own statistics)."
        )
    opts = image_tower.opts
    return source_tower(
        image_tower,
        data,
        texts.heads,
        texts.class_names,
        opts["input_key"],
        int(opts["batch_size"]),
        cache,
    )


def source_tower(
    tower: Tower,
    data: Mapping[str, Any],
    heads: Sequence[Head],
    class_names: Sequence[str],
    input_key: str,
    batch_size: int,
    cache: feature_cache.FeatureCache,
) -> Tower:
    """`tower` with BatchNorm statistics of the source training split (`data`: name, split,
    pp) re-estimated on the images of the classes the heads train on, as the target's are
    for AdaBN (`config.model.image.statistics='source'`): no image of a head's unseen classes
    enters, so with several splits it needs one split per run."""
    who = "config.model.image.statistics='source'"
    classes = statistics_classes(
        heads, len(class_names), who, "run one split per run (e.g. split=k)"
    )
    source = {
        "name": data["name"],
        "split": data["split"],
        "pp": data.get("pp", ""),
        "data_dir": data.get("data_dir"),
    }
    rows = None
    if classes is not None:
        labels = pipeline.split_labels(source["name"], source["split"], source["data_dir"])
        rows = np.flatnonzero(np.isin(labels, classes))
    return adapted_tower(
        tower, source, rows, input_key, batch_size, cache, phase="source statistics", who=who
    )


def same_domain(data_cfg: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether a split (`name`, `pp`) is of the target domain (see the module docstring)."""
    return data_cfg["name"] == target["name"] and data_cfg.get("pp", "") == target["pp"]
