"""L2-SP: pull fine-tuned weights towards their pretrained starting point.

Li, Grandvalet & Davoine, "Explicit Inductive Bias for Transfer Learning with Convolutional
Networks", ICML 2018:
``Omega(w) = alpha/2 ||w_S - w0_S||^2 + beta/2 ||w_new||^2``
where S are the backbone (pretrained) leaves and ``w_new`` the new head's leaves.

Leaf selection, by regex (``re.search``) over ``/``-joined parameter paths:
* ``backbone`` None: a leaf is in the backbone iff its path exists in ``pretrained_params``;
  given, the matching leaves, each of which must exist in ``pretrained_params`` with its shape.
* ``head`` None: every non-backbone leaf; given, the matching leaves (a leaf may not be in both).
Leaves in neither set are not penalised (the count is reported in aux).
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

DEFAULTS = {
    "alpha": 0.1,  # strength of the pull to the starting point
    "beta": 0.01,  # L2 strength on the new head
    "backbone": None,  # regex of backbone leaves; None: leaves present in pretrained_params
    "head": None,  # regex of head leaves; None: all other leaves
}


def split_leaves(
    params: PyTree,
    pretrained_params: PyTree,
    backbone: str | None = None,
    head: str | None = None,
) -> tuple[list[str], list[str], list[str]]:
    """(backbone paths, head paths, unpenalised paths) of ``params``; see module doc."""
    flat = flatten_with_paths(params)
    flat0 = flatten_with_paths(pretrained_params)
    if backbone is None:
        bb = [p for p in flat if p in flat0]
    else:
        rx = re.compile(backbone)
        bb = [p for p in flat if rx.search(p)]
    for p in bb:
        if p not in flat0:
            raise ValueError(
                f"backbone leaf {p!r} has no pretrained value; pretrained paths look like "
                f"{list(flat0)[:3]}. Fix the backbone regex or pass matching pretrained params."
            )
        if jnp.shape(flat0[p]) != jnp.shape(flat[p]):
            raise ValueError(
                f"backbone leaf {p!r} has shape {jnp.shape(flat[p])} but its pretrained value "
                f"{jnp.shape(flat0[p])}; exclude it from the backbone regex."
            )
    bb_set = set(bb)
    if head is None:
        hd = [p for p in flat if p not in bb_set]
    else:
        rx = re.compile(head)
        hd = [p for p in flat if rx.search(p)]
        both = sorted(bb_set.intersection(hd))
        if both:
            raise ValueError(f"leaves {both[:3]} match both the backbone and the head regex.")
    if not bb and not hd:
        raise ValueError("L2-SP selected no parameter; check the backbone and head regexes.")
    rest = [p for p in flat if p not in bb_set and p not in set(hd)]
    return bb, hd, rest


def l2_sp(
    params: PyTree,
    pretrained_params: PyTree,
    *,
    alpha: float = 0.1,
    beta: float = 0.01,
    backbone: str | None = None,
    head: str | None = None,
) -> tuple[Array, dict[str, Array]]:
    """``alpha/2 ||w_bb - w0_bb||^2 + beta/2 ||w_head||^2`` and its two unweighted parts."""
    bb, hd, rest = split_leaves(params, pretrained_params, backbone, head)
    flat, flat0 = flatten_with_paths(params), flatten_with_paths(pretrained_params)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    sp = 0.5 * sum(
        (jnp.sum(jnp.square(f32(flat[p]) - jax.lax.stop_gradient(f32(flat0[p])))) for p in bb),
        jnp.float32(0.0),
    )
    head_l2 = 0.5 * sum((jnp.sum(jnp.square(f32(flat[p]))) for p in hd), jnp.float32(0.0))
    aux = {"sp": sp, "head_l2": head_l2, "num_unpenalised": jnp.asarray(len(rest))}
    return alpha * sp + beta * head_l2, aux


def loss(inputs: RegularizerInputs, config: Mapping[str, Any] | None = None):
    """L2-SP on ``inputs.params`` against ``inputs.pretrained_params``."""
    cfg = resolve_config(config, DEFAULTS, "l2_sp")
    require("l2_sp", params=inputs.params, pretrained_params=inputs.pretrained_params)
    return l2_sp(
        inputs.params,
        inputs.pretrained_params,
        alpha=cfg["alpha"],
        beta=cfg["beta"],
        backbone=cfg["backbone"],
        head=cfg["head"],
    )
