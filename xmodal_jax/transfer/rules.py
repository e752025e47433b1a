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
- `config.llrd = decay`: layer-wise learning-rate decay; see `rule_plans.layer_ids`.
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

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from xmodal_jax.errors import UserError
from xmodal_jax.transfer import rule_plans

# Presets: (name -> rules). `{head}`, `{img}`, `{txt}` come from config (see `preset`).
PRESETS: dict[str, list[tuple[str, Any]]] = {
    "finetune": [(".*", "base")],
    "linear_probe": [("{head}", "base"), (".*", None)],
    "lit": [("{img}/.*", None), (".*", "base")],
    "locked_text": [("{txt}/.*", None), (".*", "base")],
}


# ------------------------------------------------------------------ transformations


def _map_plans(fn: Callable, rules: rule_plans.Rules, tree: Any, *rest: Any) -> Any:
    """`fn(plan, leaf, *rest_leaves)` over the leaves of the full, unboxed `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    plans = rule_plans.leaf_plans(rules, tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    out = [
        fn(p, x, *(o[i] for o in others))
        for i, (p, x) in enumerate(zip(plans, leaves, strict=True))
    ]
    return treedef.unflatten(out)


def _labels(rules: rule_plans.Rules) -> Callable[[Any], Any]:
    """`optax.partition` labels: `frozen` for leaves frozen the whole run, else `train`."""

    def labels(params):
        params = nn.unbox(params)
        plans = rule_plans.leaf_plans(rules, params)
        treedef = jax.tree.structure(params)
        return treedef.unflatten(["frozen" if p.frozen else "train" for p in plans])

    return labels


def scale_by_rules(
    rules: rule_plans.Rules, schedules: Sequence[optax.Schedule]
) -> optax.GradientTransformation:
    """Multiplies each update by its learning rate: its rule's schedule at the current step,
    times its `lr_mults` and layer-wise decay factors (per layer for stacked leaves)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        lrs = jnp.stack([jnp.asarray(s(state.count), jnp.float32) for s in schedules])

        def one(p: rule_plans.LeafPlan, u):
            if p.schedule.size == 1:
                lr = lrs[int(p.schedule[0])]
            else:
                lr = lrs[jnp.asarray(p.schedule)].reshape((-1,) + (1,) * (u.ndim - 1))
            return (u * (lr * jnp.asarray(rule_plans.per_layer(p.lr, u.ndim), jnp.float32))).astype(
                u.dtype
            )

        updates = _map_plans(one, rules, updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def add_decayed_weights(wd: float, rules: rule_plans.Rules) -> optax.GradientTransformation:
    """Coupled weight decay `g + wd * wd_mult * w` (L2 in the gradient, as SGD's)."""

    def update(updates, state, params):
        if params is None:
            raise ValueError("add_decayed_weights needs the parameters.")
        fn = lambda p, u, w: u + (wd * jnp.asarray(rule_plans.per_layer(p.wd, u.ndim), u.dtype)) * w
        return _map_plans(fn, rules, updates, params), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_trainable(max_norm: float, rules: rule_plans.Rules) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` with the norm taken over the leaves that train (frozen
    leaves' gradients are computed but never used)."""

    def update(updates, state, params=None):
        del params
        plans, leaves = rule_plans.leaf_plans(rules, updates), jax.tree.leaves(updates)
        norm = optax.global_norm([x for p, x in zip(plans, leaves, strict=True) if not p.frozen])
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def zero_locked(rules: rule_plans.Rules) -> optax.GradientTransformation:
    """Zeroes the updates of every layer before its unlock step (see `transform` for where)."""

    def update(updates, state, params=None):
        del params

        def one(p: rule_plans.LeafPlan, x):
            if p.frozen or not p.unlock.any():
                return x
            unlocked = jnp.asarray(rule_plans.per_layer(p.unlock, x.ndim)) <= state.count
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
    rule_plans.compile_rules(entries, key, value_first)
    return entries


def _number(value: Any, what: str, cast: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"config.{what}: {value!r} is not a number.")
    return cast(value)


def from_config(config: Any) -> tuple[rule_plans.Rules, list[Any]]:
    """`Rules` from config, and the schedule spec of each rule (None for a frozen one)."""
    if config.get("schedule") and config.get("transfer"):
        raise UserError(
            "config.schedule and config.transfer are both set; use the preset or the rules."
        )
    if config.get("transfer"):
        schedule = preset(config.transfer, config)
    else:
        schedule = _entries(config, "schedule") or [(".*", "base")]
    rule_plans.compile_rules(schedule, "schedule")
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
    rules = rule_plans.Rules(
        patterns=tuple(p for p, _ in schedule),
        frozen=tuple(s is None for s in specs),
        lr_mults=mults("lr_mults"),
        wd_mults=mults("wd_mults"),
        llrd=None if llrd is None else float(llrd),
        unfreeze=unfreeze,
    )
    return rules, specs


def transform(
    rules: rule_plans.Rules,
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


def trainable_count(rules: rule_plans.Rules, params: Any) -> tuple[int, int]:
    """(trainable, total) number of parameter scalars, for the log."""
    plans = rule_plans.leaf_plans(rules, params)
    leaves = jax.tree.leaves(nn.unbox(params))
    total = sum(math.prod(np.shape(x)) for x in leaves)
    frozen = sum(math.prod(np.shape(x)) for p, x in zip(plans, leaves, strict=True) if p.frozen)
    return total - frozen, total
