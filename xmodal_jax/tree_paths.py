"""Pytree leaves by their `/`-joined paths (`"backbone/block0/conv/kernel"`): the names that the
regex rules of transfer learning (freezing, learning rates, surgery) and the regularisers match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

PyTree = Any


def key_str(key: Any) -> str:
    """One pytree path entry as text: dict key, attribute name or sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """A pytree key path (from `jax.tree_util`) as a `/`-joined string."""
    return "/".join(key_str(k) for k in path)


def flatten_with_paths(tree: PyTree) -> dict[str, Any]:
    """`{"/"-joined path: leaf}` for every leaf of `tree`, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """`jax.tree.map` where `fn` also receives the leaf's `/`-joined path."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def regex_mask(tree: PyTree, pattern: str | None) -> PyTree:
    """Boolean pytree: True where `re.search(pattern, path)` matches (all True if None)."""
    if pattern is None:
        return jax.tree.map(lambda _: True, tree)
    rx = re.compile(pattern)
    return map_with_paths(lambda p, _: rx.search(p) is not None, tree)
