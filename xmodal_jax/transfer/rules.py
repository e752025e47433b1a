"""Optimiser rules for transfer: which parameters train, how fast, with how much decay, and when.

Rules are regexes over `/`-joined parameter paths (`encoder/layer_3/attn/query/kernel`, no
collection prefix), matched with `re.fullmatch`, first match wins:

- `config.schedule = [(regex, schedule | None), ...]`: every parameter must match a rule (an
  error lists the ones that do not); `None` freezes, a schedule is `'base'` (`config.lr_schedule`
  at `config.lr`), a number (a constant learning rate) or a dict in the form of
  `config.lr_schedule`, optionally with its own peak `lr`. A rule that no parameter reaches is an
  error too. Without it, or with `config.transfer` (a preset, below), the rules are implied.
- `config.lr_mults`, `config.wd_mults = [(regex, multiplier), ...]`: scale the learning rate /
  `config.wd` of matching parameters (others: 1).
- `config.llrd = decay`: layer-wise learning-rate decay; see `layer_ids`.
- `config.unfreeze = [(step, regex), ...]`: matching parameters stay fixed before `step`, then
  train (with their schedule, or the base one if their rule froze them): gradual unfreezing as
  in ULMFiT (Howard & Ruder 2018).

Layers stacked by `nn.scan` (one leaf `.../layers/...` holding every layer on axis 0) are seen
by every rule as their layers, `.../layer_{i}/...`: multipliers, decay and unlock steps become
per-layer vectors along the stacked axis, so a scanned and an unscanned model train alike.

Frozen leaves go to `optax.set_to_zero()` through `optax.partition`, so they carry no optimiser
state. Leaves that are locked only for a while (an `unfreeze` entry) or only in part (some
layers of a stack) carry state, and `zero_locked` holds their locked layers at rest.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xmodal_jax.errors import UserError
from xmodal_jax.tree_paths import path_str

NEVER = np.iinfo(np.int32).max  # unlock step of a parameter that stays frozen
_STACKED = re.compile(r"^(?P<pre>(?:.*/)?)layers(?P<post>/.*)$")

# Presets: (name -> rules). `{head}`, `{img}`, `{txt}` come from config (see `preset`).
PRESETS: dict[str, list[tuple[str, Any]]] = {
    "finetune": [(".*", "base")],
    "linear_probe": [("{head}", "base"), (".*", None)],
    "lit": [("{img}/.*", None), (".*", "base")],
    "locked_text": [("{txt}/.*", None), (".*", "base")],
}


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


def _compile(rules: Sequence, what: str, value_first: bool = False) -> list[tuple[Any, Any]]:
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
    sched = _compile(list(zip(rules.patterns, rules.frozen, strict=True)), "schedule")
    lr_m = _compile(rules.lr_mults, "lr_mults")
    wd_m = _compile(rules.wd_mults, "wd_mults")
    unf = _compile(rules.unfreeze, "unfreeze", value_first=True)
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


def _per_layer(values: np.ndarray, ndim: int) -> Any:
    """Per-layer values shaped to broadcast over a leaf (a Python scalar for one layer)."""
    if values.size == 1:
        return values.item()
    return values.reshape((-1,) + (1,) * (ndim - 1))


# ------------------------------------------------------------------ transformations


def leaf_plans(rules: Rules, tree: Any) -> list[LeafPlan]:
    """One `LeafPlan` per leaf of `tree` (a parameter tree), in `jax.tree.leaves` order."""
    named = tuple((p, tuple(np.shape(x))) for p, x in named_leaves(tree))
    return _cached_plan(rules, named)


@functools.lru_cache(maxsize=32)
def _cached_plan(rules: Rules, named: tuple) -> list[LeafPlan]:
    return plan(rules, named)


def _map_plans(fn: Callable, rules: Rules, tree: Any, *rest: Any) -> Any:
    """`fn(plan, leaf, *rest_leaves)` over the leaves of the full, unboxed `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    plans = leaf_plans(rules, tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    out = [
        fn(p, x, *(o[i] for o in others))
        for i, (p, x) in enumerate(zip(plans, leaves, strict=True))
    ]
    return treedef.unflatten(out)


def _labels(rules: Rules) -> Callable[[Any], Any]:
    """`optax.partition` labels: `frozen` for leaves frozen the whole run, else `train`."""

    def labels(params):
        params = nn.unbox(params)
        plans = leaf_plans(rules, params)
        treedef = jax.tree.structure(params)
        return treedef.unflatten(["frozen" if p.frozen else "train" for p in plans])

    return labels


def scale_by_rules(
    rules: Rules, schedules: Sequence[optax.Schedule]
) -> optax.GradientTransformation:
    """Multiplies each update by its learning rate: its rule's schedule at the current step,
    times its `lr_mults` and layer-wise decay factors (per layer for stacked leaves)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        lrs = jnp.stack([jnp.asarray(s(state.count), jnp.float32) for s in schedules])

        def one(p: LeafPlan, u):
            if p.schedule.size == 1:
                lr = lrs[int(p.schedule[0])]
            else:
                lr = lrs[jnp.asarray(p.schedule)].reshape((-1,) + (1,) * (u.ndim - 1))
            return (u * (lr * jnp.asarray(_per_layer(p.lr, u.ndim), jnp.float32))).astype(u.dtype)

        updates = _map_plans(one, rules, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def add_decayed_weights(wd: float, rules: Rules) -> optax.GradientTransformation:
    """Coupled weight decay `g + wd * wd_mult * w` (L2 in the gradient, as SGD's)."""

    def update(updates, state, params):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters.")
        fn = lambda p, u, w: u + (wd * jnp.asarray(_per_layer(p.wd, u.ndim), u.dtype)) * w
        return _map_plans(fn, rules, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_trainable(max_norm: float, rules: Rules) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with the norm taken over the leaves that train (frozen
    leaves' gradients are computed but never used)."""

    def update(updates, state, params=None):
        del params
        plans, leaves = leaf_plans(rules, updates), jax.tree.leaves(updates)
        norm = optax.global_norm([x for p, x in zip(plans, leaves, strict=True) if not p.frozen])
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def zero_locked(rules: Rules) -> optax.GradientTransformation:
    """Zeroes the updates of every layer before its unlock step (see `transform` for where)."""

    def update(updates, state, params=None):
        del params

        def one(p: LeafPlan, x):
            if p.frozen or not p.unlock.any():
                return x
            unlocked = jnp.asarray(_per_layer(p.unlock, x.ndim)) <= state.count
            return jnp.where(unlocked, x, jnp.zeros_like(x))

        updates = _map_plans(one, rules, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    init = lambda _: optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))
    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------ from config


def preset(name: str, config: Any) -> list[tuple[str, Any]]:
    """The schedule rules of `config.transfer = name`.

    `linear_probe` trains `config.head_regex` (default: any `head/...`), `lit` locks the image
    tower `config.image_tower` (default `img`), `locked_text` the text tower
    `config.text_tower` (default `txt`), `finetune` trains everything.
    """
    if name not in PRESETS:
        raise UserError(f"config.transfer={name!r} unknown; use one of {sorted(PRESETS)}.")
    fill = {
        "head": config.get("head_regex", "(?:.*/)?head/.*"),
        "img": re.escape(config.get("image_tower", "img")),
        "txt": re.escape(config.get("text_tower", "txt")),
    }
    return [(pattern.format(**fill), value) for pattern, value in PRESETS[name]]


def _entries(config: Any, key: str, value_first: bool = False) -> list[tuple[Any, Any]]:
    """`config[key]` as a checked list of pairs (one clear error for a malformed entry)."""
    raw = config.get(key) or ()
    entries = [tuple(e) if isinstance(e, list | tuple) else e for e in raw]
    _compile(entries, key, value_first)
    return entries


def _number(value: Any, what: str, cast: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"config.{what}: {value!r} is not a number.")
    return cast(value)


def from_config(config: Any) -> tuple[Rules, list[Any]]:
    """`Rules` from config, and the schedule spec of each rule (None for a frozen one)."""
    if config.get("schedule") and config.get("transfer"):
        raise UserError(
            "config.schedule and config.transfer are both set; use the preset or the rules."
        )
    if config.get("transfer"):
        schedule = preset(config.transfer, config)
    else:
        schedule = _entries(config, "schedule") or [(".*", "base")]
    _compile(schedule, "schedule")
    specs = [value for _, value in schedule]
    for spec in specs:
        ok = spec is None or spec == "base" or isinstance(spec, int | float | Mapping)
        if not ok or isinstance(spec, bool):
            raise UserError(
                f"config.schedule: {spec!r} is not a schedule; use None (freeze), 'base', a "
                "number or a dict like {'name': 'cosine', 'warmup_steps': 100}."
            )
    llrd = config.get("llrd")
    if llrd is not None and not 0.0 < _number(llrd, "llrd") <= 1.0:
        raise UserError(f"config.llrd={llrd}: the layer-wise decay must be in (0, 1].")
    unfreeze = tuple(
        (_number(step, "unfreeze step", int), regex)
        for step, regex in _entries(config, "unfreeze", value_first=True)
    )
    if any(step < 0 for step, _ in unfreeze):
        raise UserError(f"config.unfreeze={list(unfreeze)}: steps must be >= 0.")
    mults = lambda key: tuple((r, _number(m, key)) for r, m in _entries(config, key))
    rules = Rules(
        patterns=tuple(p for p, _ in schedule),
        frozen=tuple(s is None for s in specs),
        lr_mults=mults("lr_mults"),
        wd_mults=mults("wd_mults"),
        llrd=None if llrd is None else float(llrd),
        unfreeze=unfreeze,
    )
    return rules, specs


def transform(
    rules: Rules,
    schedules: Sequence[optax.Schedule],
    optimizer: optax.GradientTransformation,
    *,
    grad_clip_norm: float | None = None,
    wd: float | None = None,
) -> optax.GradientTransformation:
    """Locked layers zeroed -> clipping -> coupled weight decay -> locked layers zeroed ->
    [trainable leaves: `optimizer` at learning rate 1; frozen leaves: `set_to_zero`, no state]
    -> per-leaf learning rate -> locked layers zeroed.

    `schedules` has one entry per rule (any for a frozen rule) plus the base schedule last.
    Clipping comes before weight decay (as `torch.nn.utils.clip_grad_norm_` before an SGD step)
    and sees only trained leaves. Locked layers are zeroed before clipping (not in the norm),
    before the optimiser (its state stays at rest) and at the end (decoupled decay of adamw).
    The optimisers used here (sgd, adam, adamw, lamb) end in a plain scaling by the learning
    rate, so running them at rate 1 and scaling after is the same update.
    """
    if len(schedules) != rules.base_index + 1:
        raise ValueError(f"{len(schedules)} schedules for {rules.base_index} rules + base.")
    return optax.chain(
        zero_locked(rules),
        *([clip_trainable(grad_clip_norm, rules)] if grad_clip_norm else []),
        *([add_decayed_weights(wd, rules), zero_locked(rules)] if wd else []),
        optax.partition({"train": optimizer, "frozen": optax.set_to_zero()}, _labels(rules)),
        scale_by_rules(rules, schedules),
        zero_locked(rules),
    )


def trainable_count(rules: Rules, params: Any) -> tuple[int, int]:
    """(trainable, total) number of parameter scalars, for the log."""
    plans = leaf_plans(rules, params)
    leaves = jax.tree.leaves(nn.unbox(params))
    total = sum(math.prod(np.shape(x)) for x in leaves)
    frozen = sum(math.prod(np.shape(x)) for p, x in zip(plans, leaves, strict=True) if p.frozen)
    return total - frozen, total
