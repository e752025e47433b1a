"""Optimiser and learning-rate schedules from config, all Optax.

Config keys: `lr`, `wd` (coupled L2, as in SGD's weight_decay), `grad_clip_norm`,
`optimizer` (`name` in sgd/adam/adamw/lamb plus its options), `lr_schedule` (`name` in
constant/cosine/linear/inv, `warmup_steps`, and for `inv` `gamma`, `power`): the base schedule.
Transfer rules on top of it (`schedule`, `transfer`, `lr_mults`, `wd_mults`, `llrd`,
`unfreeze`) are described in `xmodal_jax.transfer.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from xmodal_jax.errors import UserError
from xmodal_jax.transfer import rules as rules_lib

OPTIMIZERS = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "lamb": optax.lamb}


def schedule_from(spec: Mapping[str, Any], lr: float, total_steps: int) -> optax.Schedule:
    """A schedule peaking at `lr` from a spec `{name, warmup_steps, ...}` (see module doc)."""
    sc = dict(spec or {})
    name, warmup = sc.pop("name", "constant"), sc.pop("warmup_steps", 0)
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), sc.get("alpha", 0.0))
    elif name == "linear":
        main = optax.linear_schedule(lr, sc.get("end", 0.0) * lr, max(total_steps - warmup, 1))
    elif name == "inv":
        # lr·(1 + γ·step)^-p, the annealing of Ganin & Lempitsky (2015); Optax has no such schedule.
        gamma, power = sc.get("gamma", 0.001), sc.get("power", 0.75)
        main = lambda step: lr * (1.0 + gamma * step) ** (-power)
    else:
        raise UserError(f"Schedule name={name!r} unknown; use constant, cosine, linear or inv.")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The base learning rate (`config.lr`, `config.lr_schedule`) as a function of the step."""
    return schedule_from(config.get("lr_schedule", {}), config.lr, config.total_steps)


def _rule_schedule(spec: Any, base: optax.Schedule, config) -> optax.Schedule:
    if spec is None or spec == "base":
        return base  # a frozen rule's schedule is never used
    if isinstance(spec, int | float):
        return optax.constant_schedule(float(spec))
    spec = dict(spec)
    return schedule_from(spec, spec.pop("lr", config.lr), config.total_steps)


def _base(opt: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimiser at learning rate 1 (`rules.transform` applies the learning rates)."""
    opt = dict(opt)
    name = opt.pop("name", "sgd")
    if name not in OPTIMIZERS:
        raise UserError(f"config.optimizer.name={name!r} unknown; use one of {sorted(OPTIMIZERS)}.")
    if "learning_rate" in opt:
        raise UserError("config.optimizer.learning_rate: set config.lr (and config.lr_schedule).")
    try:
        return OPTIMIZERS[name](learning_rate=1.0, **opt)
    except TypeError as e:
        raise UserError(f"config.optimizer: {e}; see optax.{name} for its options.") from None


def build(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, base schedule) with the transfer rules of `config` applied."""
    base = schedule(config)
    rules, specs = rules_lib.from_config(config)
    schedules = [_rule_schedule(s, base, config) for s in specs] + [base]
    tx = rules_lib.transform(
        rules,
        schedules,
        _base(config.get("optimizer", {"name": "sgd"})),
        grad_clip_norm=config.get("grad_clip_norm"),
        wd=config.get("wd"),
    )
    return tx, base
