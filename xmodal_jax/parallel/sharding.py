"""Where every array of the train state lives on the mesh: logical-axis rules, then FSDP.

Two passes decide each leaf's `PartitionSpec`:

1. **Logical rules.** Towers annotate their parameters with logical axis names
   (`xmodal_jax.models.axes`); `config.sharding_rules`, a list of `(logical name, mesh axis or
   None)`, maps them to mesh axes, ahead of `DEFAULT_RULES` (tensor parallelism: attention heads
   and MLP hidden units over `model`). A dimension that the chosen mesh axes do not divide
   stays whole (ViT-Ti's 3 heads on a `model` axis of 2, say).
2. **FSDP.** Every leaf with at least `config.fsdp_min_size` elements that does not use `fsdp`
   yet is split over `fsdp` along its largest free dimension that `fsdp` divides (never the
   stacked `layers` axis of `nn.scan`, which the scan slices step by step).

The optimiser state is placed the same way: `tx.init` on annotated (boxed) parameters keeps the
annotations (`nn.Partitioned` is a pytree node), so moments get their parameter's spec, and
unannotated leaves (step counters, unannotated modules) fall to pass 2 only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes
from xmodal_jax.parallel import mesh as mesh_lib

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = ((axes.HEADS, "model"), (axes.MLP, "model"))
FSDP_MIN_SIZE = 2**16  # elements; smaller leaves are cheaper to replicate than to gather


def rules_from_config(config) -> Rules:
    """`config.sharding_rules` (checked) ahead of `DEFAULT_RULES`."""
    user = [r if isinstance(r, tuple | list) else (r,) for r in config.get("sharding_rules") or ()]
    for rule in user:
        if len(rule) != 2:
            raise UserError(
                f"config.sharding_rules entry {rule!r} is not (logical name, mesh axis); "
                "write e.g. ('embed', 'fsdp') or ('mlp', None)."
            )
        logical, target = rule
        if logical not in axes.ALL:
            raise UserError(
                f"config.sharding_rules: unknown logical axis {logical!r}; use one of {axes.ALL}."
            )
        targets = target if isinstance(target, tuple | list) else (target,)
        bad = [t for t in targets if t is not None and t not in mesh_lib.AXES]
        if bad:
            raise UserError(
                f"config.sharding_rules: ({logical!r}, {target!r}) names mesh axes {bad}; "
                f"use {mesh_lib.AXES} or None."
            )
    return tuple((lg, tuple(t) if isinstance(t, list) else t) for lg, t in user) + DEFAULT_RULES


def _axis_size(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[n] for n in names if n is not None)


def _used(entries) -> set[str]:
    out = set()
    for e in entries:
        out.update(e if isinstance(e, tuple) else (e,))
    return out - {None}


def leaf_spec(
    shape: Sequence[int],
    logical: PartitionSpec | None,
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    fsdp_min_size: int = FSDP_MIN_SIZE,
) -> PartitionSpec:
    """The mesh `PartitionSpec` of one array of `shape` with logical axis names `logical`."""
    names = tuple(logical) if logical else ()
    names = names + (None,) * (len(shape) - len(names))
    entries = list(nn.logical_to_mesh_axes(PartitionSpec(*names), rules)) if names else []
    entries += [None] * (len(shape) - len(entries))
    for i, entry in enumerate(entries):
        size = 1 if entry is None else _axis_size(mesh, entry)
        if size == 1 or shape[i] % size:
            entries[i] = None  # axes of size 1 split nothing; others must divide the dimension
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and "fsdp" not in _used(entries) and math.prod(shape) >= fsdp_min_size:
        free = [
            i
            for i, n in enumerate(shape)
            if entries[i] is None and names[i] != axes.LAYERS and n % fsdp == 0
        ]
        if free:
            entries[max(free, key=lambda i: shape[i])] = "fsdp"
    return PartitionSpec(*entries)


def tree_shardings(
    boxed: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, fsdp_min_size: int = FSDP_MIN_SIZE
) -> Any:
    """`NamedSharding`s for a (possibly boxed, possibly abstract) tree, shaped like its unboxed
    version: logical specs from `nn.get_partition_spec`, mapped by `rules`, then FSDP."""
    logical = nn.get_partition_spec(boxed)
    values = nn.unbox(boxed)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, leaf_spec(x.shape, spec, mesh, rules, fsdp_min_size)),
        logical,
        values,
        is_leaf=lambda s: isinstance(s, PartitionSpec),
    )


def from_config(config, boxed: Any, mesh: Mesh) -> Any:
    """`tree_shardings` with the rules and FSDP threshold of `config`."""
    return tree_shardings(
        boxed, mesh, rules_from_config(config), config.get("fsdp_min_size", FSDP_MIN_SIZE)
    )
