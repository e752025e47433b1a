"""Gradient reversal layer and the DANN coefficient schedule.

Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015: the layer is
the identity going forward and multiplies the incoming gradient by -lambda going backward, so one
optimiser step trains the domain discriminator to separate the domains while it trains the
feature extractor to confuse it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


@jax.custom_vjp
def _reverse(x: PyTree, coeff: jax.Array) -> PyTree:
    return x


def _reverse_fwd(x, coeff):
    return x, coeff


def _reverse_bwd(coeff, g):
    flipped = jax.tree.map(lambda t: (-coeff).astype(t.dtype) * t, g)
    return flipped, jnp.zeros_like(coeff)


_reverse.defvjp(_reverse_fwd, _reverse_bwd)


def gradient_reversal(x: PyTree, coeff: Any = 1.0) -> PyTree:
    """Identity on ``x`` (array or pytree); its backward pass is ``-coeff * incoming gradient``.

    ``coeff`` may be traced (e.g. from ``dann_coefficient(progress)``); no gradient flows to it.
    """
    return _reverse(x, jnp.asarray(coeff, jnp.float32))


def dann_coefficient(p: Any, gamma: float = 10.0, lo: float = 0.0, hi: float = 1.0) -> jax.Array:
    """``lo + (hi - lo) * (2 / (1 + exp(-gamma * p)) - 1)``, rising from ``lo`` at p=0 to ~``hi``.

    ``p`` is training progress in [0, 1]; gamma=10 is the value of Ganin & Lempitsky (2015).
    """
    p = jnp.asarray(p, jnp.float32)
    return lo + (hi - lo) * (2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0)
