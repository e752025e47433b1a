"""The inputs every transfer regulariser receives from the train step.

Each regulariser module exposes ``loss(inputs, config) -> (loss, aux)``; ``loss`` already
includes the regulariser's own coefficients (l1/l2, alpha/beta, weight, eta), so the train step
simply adds it. A regulariser reads the fields it needs and raises one clear error if one is
missing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class RegularizerInputs:
    """What a regulariser may need.

    Attributes:
      params: the trained parameter pytree (L1/L2, L2-SP).
      pretrained_params: the starting-point parameters w0 (L2-SP); may hold only the backbone.
      feature_maps: {layer name: [B, ..., C]} feature maps of the trained model (DELTA).
      pretrained_feature_maps: the same layers of the frozen pretrained model on the same inputs.
      channel_attention: {layer name: [C]} DELTA channel attention (``delta.channel_attention``).
      features: [B, D] batch features, e.g. the pooled backbone output (BSS).
    """

    params: PyTree | None = None
    pretrained_params: PyTree | None = None
    feature_maps: Mapping[str, Array] | None = None
    pretrained_feature_maps: Mapping[str, Array] | None = None
    channel_attention: Mapping[str, Array] | None = None
    features: Array | None = None
