"""Small helpers shared by the adaptation losses and the regularisers.

* ``/``-joined parameter paths (``"backbone/block0/conv/kernel"``), the names that regex rules
  over a parameter pytree match against;
* ``resolve_config``: merge a config block over an algorithm's defaults, rejecting unknown keys.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

PyTree = Any

# A config block may carry the algorithm's name beside its options.
_RESERVED_KEYS = frozenset({"name"})


def key_str(key: Any) -> str:
    """One pytree path entry as text: dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple[Any, ...]) -> str:
    """A pytree key path (from ``jax.tree_util``) as a ``/``-joined string."""
    return "/".join(key_str(k) for k in path)


def flatten_with_paths(tree: PyTree) -> dict[str, Any]:
    """``{"/"-joined path: leaf}`` for every leaf of ``tree``, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """``jax.tree.map`` where ``fn`` also receives the leaf's ``/``-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def regex_mask(tree: PyTree, pattern: str | None) -> PyTree:
    """Boolean pytree: True where ``re.search(pattern, path)`` matches (all True if None)."""
    if pattern is None:
        return jax.tree.map(lambda _: True, tree)
    rx = re.compile(pattern)
    return map_with_paths(lambda p, _: rx.search(p) is not None, tree)


def resolve_config(config: Mapping[str, Any] | None, defaults: Mapping[str, Any], name: str):
    """``defaults`` updated by ``config`` (a dict or ``ml_collections.ConfigDict``).

    Unknown keys raise, so a misspelt option never silently falls back to its default.
    """
    merged = dict(defaults)
    if config is None:
        return merged
    items = dict(config.items())
    unknown = sorted(set(items) - set(defaults) - _RESERVED_KEYS)
    if unknown:
        raise ValueError(
            f"{name}: unknown config key(s) {unknown}. Valid keys: {sorted(defaults)}. "
            "Fix the spelling in the experiment config."
        )
    merged.update({k: v for k, v in items.items() if k not in _RESERVED_KEYS})
    return merged


def require(name: str, **fields: Any) -> None:
    """Raise one clear error naming every required input that is missing (None)."""
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ValueError(
            f"{name} needs inputs {missing}, which were not given. "
            "Pass them in the inputs struct built by the train step."
        )
