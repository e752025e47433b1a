"""What a converter returns: the tower to build and the variables to put in it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from xmodal_jax.models import zoo


@dataclasses.dataclass
class Converted:
    """`zoo.build(arch, **overrides)` holds `variables` (flat `/`-joined paths with collection,
    unscanned layout); `meta` carries preprocessing / tokenizer facts from the source."""

    arch: str
    overrides: dict[str, Any]
    variables: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def closest_arch(family: str, overrides: dict[str, Any], fallback: str) -> str:
    """The registered name of `family` whose defaults agree with every structural override
    (so `arch` reads as e.g. `minilm_l6`); `fallback` when none does."""
    for name in zoo.names():
        if not name.startswith(family):
            continue
        _, defaults = zoo.spec(name)
        if all(overrides.get(k, v) == v for k, v in defaults.items()):
            return name
    return fallback
