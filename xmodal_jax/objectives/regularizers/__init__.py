"""Transfer regularisers, each in its own module, and the one registry of them by the names a
config uses (`config.regularizer.name`).

A `RegularizerSpec` declares the regulariser's options with their defaults and which
`RegularizerInputs` fields it reads (the parameters, the starting point, feature maps of the
trained and the pretrained model, pooled features), so a task builds exactly those and never
branches on a name. `fn(inputs, options)` returns `(loss, parts)`: the weighted term added to
the training loss and its unweighted parts, logged as `train/reg/<part>`. Defaults follow the
task-adaptation recipes of thuml/Transfer-Learning-Library: L2-SP and DELTA trade-offs 0.01 for
the backbone and the head, BSS eta 0.001 with k = 1, DELTA attention temperature 5. TLlib sums
DELTA's distance over the batch; here it is a batch mean (`delta.py`), so configs scale `weight`
by their batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.objectives.regularizers import bss, delta, l1_l2, l2_sp
from xmodal_jax.objectives.regularizers.api import RegularizerInputs

Loss = tuple[jax.Array, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RegularizerSpec:
    """`fn(inputs, options) -> (loss, parts)`, its options' defaults and the input fields it
    reads."""

    fn: Callable[[RegularizerInputs, Mapping[str, Any]], Loss]
    defaults: Mapping[str, Any]
    needs: tuple[str, ...] = ()


def _none(inputs: RegularizerInputs, o: Mapping[str, Any]) -> Loss:
    return jnp.float32(0.0), {}


def _norm(kind: str) -> Callable[[RegularizerInputs, Mapping[str, Any]], Loss]:
    def fn(inputs: RegularizerInputs, o: Mapping[str, Any]) -> Loss:
        cfg = {kind: o["weight"], "include": o["include"], "exclude": o["exclude"]}
        value, aux = l1_l2.loss(inputs, cfg)
        return value, {kind: aux[kind]}

    return fn


def _l2sp(inputs: RegularizerInputs, o: Mapping[str, Any]) -> Loss:
    value, aux = l2_sp.loss(inputs, {k: o[k] for k in ("alpha", "beta", "backbone", "head")})
    return value, {"sp": aux["sp"], "head_l2": aux["head_l2"]}


def _delta(inputs: RegularizerInputs, o: Mapping[str, Any]) -> Loss:
    use_attention = inputs.channel_attention is not None
    return delta.loss(inputs, {"weight": o["weight"], "use_attention": use_attention})


def _bss(inputs: RegularizerInputs, o: Mapping[str, Any]) -> Loss:
    return bss.loss(inputs, {"eta": o["weight"], "k": o["k"]})


_NORM_DEFAULTS = {"include": l1_l2.DEFAULT_INCLUDE, "exclude": None}
REGULARIZERS: dict[str, RegularizerSpec] = {
    "none": RegularizerSpec(_none, {}),
    "l1": RegularizerSpec(_norm("l1"), {"weight": 1e-6, **_NORM_DEFAULTS}, ("params",)),
    "l2": RegularizerSpec(_norm("l2"), {"weight": 1e-4, **_NORM_DEFAULTS}, ("params",)),
    "l2sp": RegularizerSpec(
        _l2sp,
        {"alpha": 0.01, "beta": 0.01, "backbone": None, "head": None},
        ("params", "pretrained_params"),
    ),
    "delta": RegularizerSpec(
        _delta,
        {
            "weight": 0.01,
            "layers": (),  # module paths (`block6_project_conv`) whose outputs are compared
            "attention": False,  # weight channels by DELTA's supervised channel attention
            "attention_batches": 1,  # training batches the attention is averaged over
            "temperature": 5.0,
            "head_steps": 300,  # Adam steps fitting the attention's head on pretrained features
        },
        ("feature_maps", "pretrained_feature_maps", "channel_attention"),
    ),
    "bss": RegularizerSpec(_bss, {"weight": 0.001, "k": 1}, ("features",)),
}


def get_regularizer(name: str) -> RegularizerSpec:
    """The regulariser a config names; an unknown name is one error listing the valid ones."""
    if name not in REGULARIZERS:
        raise UserError(
            f"config.regularizer.name={name!r} is unknown; use one of {sorted(REGULARIZERS)}."
        )
    return REGULARIZERS[name]


__all__ = ["REGULARIZERS", "RegularizerInputs", "RegularizerSpec", "get_regularizer"]
