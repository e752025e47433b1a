"""Domain-adaptation losses, each in its own module, behind one calling convention.

The train step builds an ``AdaptationInputs`` and calls ``get_loss(name)(inputs, config)``,
which returns ``(weighted_loss, aux)``. ``SPECS[name]`` says what the train step must provide:
whether a domain discriminator is needed (built by ``dann.make_discriminator(config)`` and
initialised on ``[1, spec.discriminator_input_dim(feature_dim, num_classes, config)]``) and
whether the loss replaces the plain source cross-entropy (importance weighting).

Losses: ``dann``, ``mmd`` (MK-MMD; aliases ``dan``, ``mk_mmd``), ``jmmd`` (alias ``jan``),
``coral``, ``cdan``, ``cdan_e``, ``entropy`` (minimisation), ``mcc`` (minimum class confusion),
``bnm`` (batch nuclear-norm maximisation), ``im`` (SHOT's information maximisation on the
target logits, here beside the source loss: ``shot.im_loss``) and ``importance`` (weighting by
a domain classifier).

AdaBN (``adabn.adapt_batch_norm``), the proxy A-distance and the t-SNE plot are procedures
run around training, not losses, and are not in this registry; nor are TENT (``tent``: the
test-time loss and optimiser of the ``tent_classification`` evaluator) and SHOT's
pseudo-labels (``shot``: the source-free task ``source_free``), which see no source batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from xmodal_jax.objectives.adaptation import (
    bnm,
    cdan,
    coral,
    dann,
    entropy,
    importance,
    jmmd,
    mcc,
    mmd,
    shot,
)
from xmodal_jax.objectives.adaptation.api import AdaptationInputs


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the train step drives one adaptation loss."""

    fn: Callable
    defaults: dict
    discriminator_input_dim: Callable[..., int] | None = None  # None: no discriminator
    replaces_source_loss: bool = False


SPECS: dict[str, LossSpec] = {
    "dann": LossSpec(dann.loss, dann.DEFAULTS, dann.discriminator_input_dim),
    "mmd": LossSpec(mmd.loss, mmd.DEFAULTS),
    "jmmd": LossSpec(jmmd.loss, jmmd.DEFAULTS),
    "coral": LossSpec(coral.loss, coral.DEFAULTS),
    "cdan": LossSpec(cdan.loss, cdan.DEFAULTS, cdan.discriminator_input_dim),
    "cdan_e": LossSpec(
        cdan.loss_e, {**cdan.DEFAULTS, "entropy_conditioning": True}, cdan.discriminator_input_dim
    ),
    "entropy": LossSpec(entropy.loss, entropy.DEFAULTS),
    "mcc": LossSpec(mcc.loss, mcc.DEFAULTS),
    "bnm": LossSpec(bnm.loss, bnm.DEFAULTS),
    "im": LossSpec(shot.im_loss, shot.IM_DEFAULTS),
    "importance": LossSpec(
        importance.loss,
        importance.DEFAULTS,
        importance.discriminator_input_dim,
        replaces_source_loss=True,
    ),
}
ALIASES = {"dan": "mmd", "mk_mmd": "mmd", "jan": "jmmd"}


def get_spec(name: str) -> LossSpec:
    """The ``LossSpec`` registered under ``name`` (or an alias such as "dan", "jan")."""
    key = ALIASES.get(name, name)
    if key not in SPECS:
        raise ValueError(
            f"unknown domain-adaptation loss {name!r}; choose one of "
            f"{sorted(SPECS) + sorted(ALIASES)}."
        )
    return SPECS[key]


def get_loss(name: str) -> Callable:
    """``loss(inputs, config) -> (loss, aux)`` registered under ``name``."""
    return get_spec(name).fn


__all__ = ["ALIASES", "SPECS", "AdaptationInputs", "LossSpec", "get_loss", "get_spec"]
