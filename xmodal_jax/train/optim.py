"""Optimiser and learning-rate schedule from config, all Optax.

Config keys: `lr`, `wd` (coupled L2, as in SGD's weight_decay), `grad_clip_norm`,
`optimizer` (`name` in sgd/adam/adamw plus its options), `lr_schedule` (`name` in
constant/cosine/linear/inv, `warmup_steps`, and for `inv` `gamma`, `power`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
import optax

from xmodal_jax.errors import UserError


def schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the step."""
    sc = dict(config.get("lr_schedule", {}) or {})
    name, warmup = sc.pop("name", "constant"), sc.pop("warmup_steps", 0)
    lr, steps = config.lr, config.total_steps
    if name == "constant":
        main = optax.constant_schedule(lr)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, max(steps - warmup, 1), sc.get("alpha", 0.0))
    elif name == "linear":
        main = optax.linear_schedule(lr, sc.get("end", 0.0) * lr, max(steps - warmup, 1))
    elif name == "inv":
        # lr·(1 + γ·step)^-p, the annealing of Ganin & Lempitsky (2015); Optax has no such schedule.
        gamma, power = sc.get("gamma", 0.001), sc.get("power", 0.75)
        main = lambda step: lr * (1.0 + gamma * step) ** (-power)
    else:
        raise UserError(
            f"config.lr_schedule.name={name!r} unknown; use constant, cosine, linear or inv."
        )
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(opt: Mapping[str, Any], lr: optax.Schedule) -> optax.GradientTransformation:
    opt = dict(opt)
    name = opt.pop("name", "sgd")
    makers = {"sgd": optax.sgd, "adam": optax.adam, "adamw": optax.adamw, "lamb": optax.lamb}
    if name not in makers:
        raise UserError(f"config.optimizer.name={name!r} unknown; use one of {sorted(makers)}.")
    try:
        return makers[name](learning_rate=lr, **opt)
    except TypeError as e:
        raise UserError(f"config.optimizer: {e}; see optax.{name} for its options.") from None


def build(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, schedule): clip -> weight decay -> optimiser."""
    lr = schedule(config)
    parts = []
    if config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.get("wd"):
        parts.append(optax.add_decayed_weights(config.wd))
    parts.append(_base(config.get("optimizer", {"name": "sgd"}), lr))
    return optax.chain(*parts), lr
