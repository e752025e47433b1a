"""Models built from config: `build(config.model)`; `name` picks the architecture."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from xmodal_jax.errors import UserError
from xmodal_jax.models.lenet import LeNet

_LOCAL = {"lenet": LeNet}


def build(cfg: Mapping[str, Any]) -> nn.Module:
    """A module from `{'name': ..., **attributes}`; names are `lenet` or any zoo tower."""
    kwargs = dict(cfg)
    name = kwargs.pop("name", None)
    if name is None:
        raise UserError("config.model has no 'name'; set e.g. config.model.name = 'lenet'.")
    if name in _LOCAL:
        cls = _LOCAL[name]
        unknown = set(kwargs) - set(cls.__dataclass_fields__)
        if unknown:
            fields = [f for f in cls.__dataclass_fields__ if f not in ("parent", "name")]
            raise UserError(f"config.model: {name} has no {sorted(unknown)}; it takes {fields}.")
        return cls(**kwargs)
    from xmodal_jax.models import zoo

    if name not in zoo.names():
        close = difflib.get_close_matches(name, [*_LOCAL, *zoo.names()], n=3)
        raise UserError(f"Unknown model {name!r}; closest: {close}.")
    return zoo.build(name, **kwargs)
