"""L1 and L2 penalties on weights, restricted to leaves chosen by regex or mask.

``l1 = sum |w|`` and ``l2 = 1/2 sum w^2`` over the selected leaves (the 1/2 makes the L2
gradient ``w``, the same as decoupled weight decay of that strength). By default only leaves
whose ``/``-joined path ends in ``kernel`` (Dense / Conv weights) are penalised: biases,
normalisation scales and embeddings are left alone unless the regex says otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.objectives._util import require, resolve_config
from xmodal_jax.objectives.regularizers.api import RegularizerInputs
from xmodal_jax.tree_paths import flatten_with_paths

Array = jax.Array
PyTree = Any

DEFAULT_INCLUDE = r"(^|/)kernel$"

DEFAULTS = {
    "l1": 0.0,  # coefficient of sum |w|
    "l2": 0.0,  # coefficient of 1/2 sum w^2
    "include": DEFAULT_INCLUDE,  # regex (re.search) over "/"-joined paths; None: every leaf
    "exclude": None,  # regex of leaves to skip even if included
}


def selected_leaves(
    params: PyTree,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = None,
    mask: PyTree | None = None,
) -> list[Array]:
    """Leaves chosen by ``mask`` (a bool pytree like ``params``) or by the regexes."""
    flat = flatten_with_paths(params)
    if mask is not None:
        flat_mask = flatten_with_paths(mask)
        if set(flat_mask) != set(flat):
            raise ValueError("the mask pytree must have exactly the leaves of params.")
        chosen = [flat[p] for p in flat if flat_mask[p]]
    else:
        inc = re.compile(include) if include is not None else None
        exc = re.compile(exclude) if exclude is not None else None
        chosen = [
            leaf
            for p, leaf in flat.items()
            if (inc is None or inc.search(p)) and not (exc is not None and exc.search(p))
        ]
    if not chosen:
        raise ValueError(
            f"no parameter selected (include={include!r}, exclude={exclude!r}); paths look "
            f"like {list(flat)[:3]}. Fix the regex or the mask."
        )
    return chosen


def l1_penalty(
    params: PyTree,
    *,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = None,
    mask: PyTree | None = None,
) -> Array:
    """``sum |w|`` over the selected leaves."""
    leaves = selected_leaves(params, include, exclude, mask)
    return sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves)


def l2_penalty(
    params: PyTree,
    *,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = None,
    mask: PyTree | None = None,
) -> Array:
    """``1/2 sum w^2`` over the selected leaves."""
    leaves = selected_leaves(params, include, exclude, mask)
    return 0.5 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def loss(inputs: RegularizerInputs, config: Mapping[str, Any] | None = None):
    """``l1 * sum|w| + l2 * 1/2 sum w^2`` on ``inputs.params``; aux has both penalties."""
    cfg = resolve_config(config, DEFAULTS, "l1_l2")
    require("l1_l2", params=inputs.params)
    sel = {"include": cfg["include"], "exclude": cfg["exclude"]}
    p1 = l1_penalty(inputs.params, **sel)
    p2 = l2_penalty(inputs.params, **sel)
    return cfg["l1"] * p1 + cfg["l2"] * p2, {"l1": p1, "l2": p2}
