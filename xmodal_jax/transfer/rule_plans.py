"""From optimiser rules to a plan per parameter leaf (`rules.py` turns plans into Optax
transformations): rules matched against `/`-joined parameter paths, layers of an `nn.scan`
stack seen as `.../layer_{i}/...`, layer ids for layer-wise decay, and the per-leaf (or
per-layer) schedule, multipliers and unlock step."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.tree_paths import path_str

NEVER = np.iinfo(np.int32).max  # unlock step of a parameter that stays frozen
_STACKED = re.compile(r"^(?P<pre>(?:.*/)?)layers(?P<post>/.*)$")


# ------------------------------------------------------------------ paths


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`(path, leaf)` for every leaf of the unboxed `tree`, in `jax.tree.leaves` order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))
    return [(path_str(p), x) for p, x in flat]


def layer_paths(path: str, shape: Sequence[int]) -> list[str]:
    """The paths rules see for one leaf: one, or one per layer of an `nn.scan` stack."""
    m = _STACKED.match(path)
    if not m or not shape:
        return [path]
    return [f"{m['pre']}layer_{i}{m['post']}" for i in range(shape[0])]


def compile_rules(rules: Sequence, what: str, value_first: bool = False) -> list[tuple[Any, Any]]:
    out = []
    for rule in rules:
        if not isinstance(rule, tuple | list) or len(rule) != 2:
            form = "(step, regex)" if value_first else "(regex, value)"
            raise UserError(f"config.{what}: entry {rule!r} is not a pair {form}.")
        value, pattern = rule if value_first else rule[::-1]
        if not isinstance(pattern, str):
            raise UserError(f"config.{what}: {pattern!r} in {rule!r} is not a regex string.")
        if pattern.startswith("/"):
            raise UserError(
                f"config.{what}: {pattern!r} starts with '/'; parameter paths do not "
                "(e.g. 'encoder/layer_0/mlp/fc1/kernel')."
            )
        try:
            out.append((re.compile(pattern), value))
        except re.error as e:
            raise UserError(f"config.{what}: {pattern!r} is not a valid regex ({e}).") from None
    return out


def _first(compiled: Sequence[tuple[re.Pattern, Any]], path: str) -> int | None:
    for i, (pattern, _) in enumerate(compiled):
        if pattern.fullmatch(path):
            return i
    return None


def _list(paths: Sequence[str], limit: int = 12) -> str:
    more = f" ... and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


# ------------------------------------------------------------------ layer-wise decay

_TOWER = r"^(?P<tower>(?:[^/]+/)*?)"  # shortest prefix: the outermost match names the tower
_BLOCK = re.compile(_TOWER + r"[^/]+/layer_(?P<i>\d+)/")
_STAGE = re.compile(_TOWER + r"(?:stage|block)(?P<i>\d+)_[^/]*/")
_STEM = re.compile(
    _TOWER + r"(?:stem_[^/]*|embedding|pos_embedding|cls|[^/]*_embeddings?"
    r"|embed_norm|norm_pre)(?:/|$)"
)


def layer_ids(paths: Sequence[str]) -> tuple[list[tuple[str, int] | None], dict[str, int]]:
    """Depth of each (per-layer) path inside its tower, and each tower's number of layers.

    Transformer block `<tower>/<stack>/layer_i/...` has depth i+1; a ResNet stage
    `<tower>/stage{s}_...` depth s; a MobileNetV2 block `<tower>/block{b}_...` depth b; stems
    and embeddings (patch / token / position embeddings, cls token, `stem_*`) depth 0. Anything
    else inside a tower (final norm, pooling, head) sits on top, depth L+1. A tower is the path
    prefix before these names (`''` for a single model, `img/` in a two-tower model).
    """
    found: list[tuple[str, int] | None] = []
    for p in paths:
        m = _BLOCK.match(p)
        if m:
            found.append((m["tower"], int(m["i"]) + 1))
        elif m := _STAGE.match(p):
            found.append((m["tower"], int(m["i"])))
        elif m := _STEM.match(p):
            found.append((m["tower"], 0))
        else:
            found.append(None)
    depth: dict[str, int] = {}
    for f in found:
        if f is not None:
            depth[f[0]] = max(depth.get(f[0], 0), f[1])
    towers = sorted(depth, key=len, reverse=True)
    out = []
    for p, f in zip(paths, found, strict=True):
        if f is None:
            tower = next((t for t in towers if p.startswith(t)), None)
            f = (tower, depth[tower] + 1) if tower is not None else None
        out.append(f)
    return out, depth


def llrd_scales(paths: Sequence[str], decay: float) -> list[float]:
    """`decay ** (L + 1 - depth)` per path (1 outside any tower): the top trains at the base
    rate, each layer below at `decay` times the one above it."""
    ids, depth = layer_ids(paths)
    if not depth:
        raise UserError(
            f"config.llrd={decay} but no parameter is in a recognised layer (transformer "
            "'layer_i', ResNet 'stage{s}_', MobileNet 'block{b}_'); the paths are e.g. "
            f"{_list(list(paths), 5)}. Unset config.llrd or use config.lr_mults."
        )
    return [1.0 if f is None else float(decay) ** (depth[f[0]] + 1 - f[1]) for f in ids]


# ------------------------------------------------------------------ the plan


@dataclasses.dataclass(frozen=True)
class Rules:
    """Parsed rules. Schedule rule `i` selects schedule `i`; schedule `len(patterns)` is the
    base one, which layers that an `unfreeze` entry unlocks train with."""

    patterns: tuple[str, ...]  # config.schedule regexes
    frozen: tuple[bool, ...]  # whether rule i freezes (its schedule is None)
    lr_mults: tuple[tuple[str, float], ...] = ()
    wd_mults: tuple[tuple[str, float], ...] = ()
    llrd: float | None = None
    unfreeze: tuple[tuple[int, str], ...] = ()

    @property
    def base_index(self) -> int:
        return len(self.patterns)


class LeafPlan(NamedTuple):
    """Per leaf: `frozen` for the whole run, or per-layer (axis 0 of a stack) vectors."""

    frozen: bool
    schedule: np.ndarray  # index into the schedule list
    lr: np.ndarray  # learning-rate multiplier (lr_mults x llrd)
    wd: np.ndarray  # weight-decay multiplier
    unlock: np.ndarray  # first step at which the layer trains


def plan(rules: Rules, named: Sequence[tuple[str, tuple[int, ...]]]) -> list[LeafPlan]:
    """One `LeafPlan` per `(path, shape)`; errors list uncovered paths and dead rules."""
    sched = compile_rules(list(zip(rules.patterns, rules.frozen, strict=True)), "schedule")
    lr_m = compile_rules(rules.lr_mults, "lr_mults")
    wd_m = compile_rules(rules.wd_mults, "wd_mults")
    unf = compile_rules(rules.unfreeze, "unfreeze", value_first=True)
    expanded = [(p, layer_paths(p, s)) for p, s in named]
    every = [lp for _, lps in expanded for lp in lps]

    hits = [_first(sched, p) for p in every]
    missing = [p for p, h in zip(every, hits, strict=True) if h is None]
    if missing:
        raise UserError(
            f"config.schedule covers no rule for {len(missing)} parameters: {_list(missing)}. "
            "Add a rule for them, e.g. ('.*', None) to freeze the rest or ('.*', 'base')."
        )
    reached = set(hits)
    dead = [rules.patterns[i] for i in range(len(sched)) if i not in reached]
    if dead:
        raise UserError(
            f"config.schedule rules {dead} match no parameter (or only ones an earlier rule "
            f"took); parameters are e.g. {_list(every, 6)}. Fix or remove them."
        )
    for name, compiled, entries in (
        ("lr_mults", lr_m, rules.lr_mults),
        ("wd_mults", wd_m, rules.wd_mults),
        ("unfreeze", unf, rules.unfreeze),
    ):
        for (pattern, _), entry in zip(compiled, entries, strict=True):
            if not any(pattern.fullmatch(p) for p in every):
                raise UserError(
                    f"config.{name} entry {tuple(entry)!r} matches no parameter; parameters "
                    f"are e.g. {_list(every, 6)}."
                )
    decay = llrd_scales(every, rules.llrd) if rules.llrd is not None else [1.0] * len(every)

    out, k = [], 0
    for _, lps in expanded:
        n = len(lps)
        idx, scale = hits[k : k + n], decay[k : k + n]
        k += n
        frozen = [rules.frozen[i] for i in idx]
        u = [_first(unf, p) for p in lps]
        unlock = [NEVER if f else 0 for f in frozen]
        unlock = [unf[j][1] if j is not None else s for j, s in zip(u, unlock, strict=True)]
        lr = [
            scale[i] * (lr_m[j][1] if (j := _first(lr_m, p)) is not None else 1.0)
            for i, p in enumerate(lps)
        ]
        wd = [wd_m[j][1] if (j := _first(wd_m, p)) is not None else 1.0 for p in lps]
        out.append(
            LeafPlan(
                frozen=all(f and j is None for f, j in zip(frozen, u, strict=True)),
                schedule=np.asarray(
                    [rules.base_index if f else i for f, i in zip(frozen, idx, strict=True)]
                ),
                lr=np.asarray(lr, np.float32),
                wd=np.asarray(wd, np.float32),
                unlock=np.asarray(unlock, np.int32),
            )
        )
    return out


def per_layer(values: np.ndarray, ndim: int) -> Any:
    """Per-layer values shaped to broadcast over a leaf (a Python scalar for one layer)."""
    if values.size == 1:
        return values.item()
    return values.reshape((-1,) + (1,) * (ndim - 1))


def leaf_plans(rules: Rules, tree: Any) -> list[LeafPlan]:
    """One `LeafPlan` per leaf of `tree` (a parameter tree), in `jax.tree.leaves` order."""
    named = tuple((p, tuple(np.shape(x))) for p, x in named_leaves(tree))
    return _cached_plan(rules, named)


def frozen_throughout(rules: Rules, tree: Any, prefix: str) -> bool:
    """Whether `tree` has leaves under `prefix/` and the rules freeze all of them for the whole
    run (`config.transfer='lit'`, a `None` schedule)."""
    paths = [p for p, _ in named_leaves(tree)]
    own = [
        plan.frozen
        for p, plan in zip(paths, leaf_plans(rules, tree), strict=True)
        if p.startswith(prefix + "/")
    ]
    return bool(own) and all(own)


@functools.lru_cache(maxsize=32)
def _cached_plan(rules: Rules, named: tuple) -> list[LeafPlan]:
    return plan(rules, named)
