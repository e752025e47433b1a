"""The inputs every domain-adaptation loss receives from the train step.

Each loss module exposes ``loss(inputs, config) -> (loss, aux)``: the train step builds one
``AdaptationInputs`` from its forward passes and calls whichever loss the config names; a loss
reads the fields it needs and raises one clear error if one is missing. ``loss`` is already
multiplied by the config's ``weight`` (trade-off); ``aux`` holds scalar diagnostics (the
unweighted loss among them) for logging under ``train/``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptationInputs:
    """Module outputs for one source batch and one target batch.

    Attributes:
      features_s, features_t: [B_s, D], [B_t, D] features fed to the classifier head.
      logits_s, logits_t: [B_s, C], [B_t, C] classifier logits.
      labels_s: [B_s] integer source labels (importance weighting only).
      progress: training progress p in [0, 1] (step / total_steps), drives the GRL schedule.
      discriminator: maps a [B, K] array to [B] domain logits, log p(source|x)/p(target|x),
        with its parameters (and any dropout rng) already bound, e.g.
        ``lambda h: disc.apply({"params": params["discriminator"]}, h)``.
    """

    features_s: Array | None = None
    features_t: Array | None = None
    logits_s: Array | None = None
    logits_t: Array | None = None
    labels_s: Array | None = None
    progress: Any = 1.0
    discriminator: Callable[[Array], Array] | None = None
