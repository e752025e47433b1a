"""Small helpers shared by the adaptation losses and the regularisers: their config blocks
over their defaults, and one error naming every missing input. Parameter paths:
`xmodal_jax.tree_paths`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xmodal_jax.config import options

# A config block may carry the algorithm's name beside its options.
_RESERVED_KEYS = frozenset({"name"})


def resolve_config(config: Mapping[str, Any] | None, defaults: Mapping[str, Any], name: str):
    """`defaults` updated by `config` (a dict or `ml_collections.ConfigDict`; its `name` key, the
    algorithm's, is skipped); an unknown key is one error (`config.options`)."""
    return options(config, defaults, name, ignore=_RESERVED_KEYS)


def require(name: str, **fields: Any) -> None:
    """Raise one clear error naming every required input that is missing (None)."""
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(
            f"{name} needs inputs {missing}, which were not given. "
            "Pass them in the inputs struct built by the train step."
        )
