"""Transfer regularisers, each in its own module, behind one calling convention.

The train step builds a ``RegularizerInputs`` and calls ``get_regularizer(name)(inputs,
config)``, which returns ``(loss, aux)`` with the regulariser's coefficients already applied.
"""

from __future__ import annotations

from collections.abc import Callable

from xmodal_jax.objectives.regularizers import bss, delta, l1_l2, l2_sp
from xmodal_jax.objectives.regularizers.api import RegularizerInputs

REGULARIZERS: dict[str, Callable] = {
    "l1_l2": l1_l2.loss,
    "l2_sp": l2_sp.loss,
    "delta": delta.loss,
    "bss": bss.loss,
}
DEFAULTS: dict[str, dict] = {
    "l1_l2": l1_l2.DEFAULTS,
    "l2_sp": l2_sp.DEFAULTS,
    "delta": delta.DEFAULTS,
    "bss": bss.DEFAULTS,
}


def get_regularizer(name: str) -> Callable:
    """``loss(inputs, config) -> (loss, aux)`` registered under ``name``."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regulariser {name!r}; choose one of {sorted(REGULARIZERS)}.")
    return REGULARIZERS[name]


__all__ = ["DEFAULTS", "REGULARIZERS", "RegularizerInputs", "get_regularizer"]
