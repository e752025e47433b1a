"""Losses of the two-tower task: the contrastive loss named by `config.model.loss.name` and the
image-text matching (ITM) loss of a fused head.

A contrastive loss is one `Loss` entry of `LOSSES`: its form over class prompts (`class_names`
texts, per head, masked to the head's classes), over matched pairs (`captions` texts, plain and
sharded over the batch axes of a mesh) and its temperature defaults.

Temperature: open_clip clamps its `logit_scale` parameter to <= log 100 after every optimiser
step (`training/train.py`); a task cannot hook the step, so the two-tower task leaves the
parameter unconstrained and clamps the *value used* to `loss.max_log_scale` (CLIP default
log 100, SigLIP none). The clamp's gradient is a projection: above the bound, gradients that
would push the parameter further up are dropped and those that pull it down pass at once; the
value used never exceeds the bound (only optimiser momentum can carry the parameter a little
past it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from xmodal_jax import config as config_lib
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import contrastive, itm
from xmodal_jax.objectives.class_contrastive import class_clip_loss, class_siglip_loss


@dataclasses.dataclass(frozen=True)
class Loss:
    classes: Callable[..., jax.Array]  # (head outputs, labels [B], log_scale [H], mask) -> [H]
    pairs: Callable[..., jax.Array]  # (zi, zt, log_scale, bias) -> scalar
    pairs_sharded: Callable[..., jax.Array]  # (zi, zt, log_scale, bias, mesh) -> scalar
    log_scale_init: float
    max_log_scale: float | None


def _class_clip(out, labels, log_scale, mask):
    loss = jax.vmap(class_clip_loss, (0, 0, None, 0, 0))
    return loss(out["image"], out["text"], labels, log_scale, mask)


def _class_siglip(out, labels, log_scale, mask):
    loss = jax.vmap(class_siglip_loss, (0, 0, None, 0, 0, 0))
    return loss(out["image"], out["text"], labels, log_scale, out["bias"], mask)


LOSSES = {
    "clip": Loss(
        classes=_class_clip,
        pairs=lambda zi, zt, scale, bias: contrastive.clip_loss(zi, zt, scale),
        pairs_sharded=lambda zi, zt, scale, bias, mesh: contrastive.clip_loss_sharded(
            zi, zt, scale, mesh=mesh
        ),
        log_scale_init=contrastive.clip.LOG_SCALE_INIT,
        max_log_scale=contrastive.clip.LOG_SCALE_MAX,
    ),
    "siglip": Loss(
        classes=_class_siglip,
        pairs=contrastive.siglip_loss,
        pairs_sharded=lambda zi, zt, scale, bias, mesh: contrastive.siglip_loss_sharded(
            zi, zt, scale, bias, mesh=mesh
        ),
        log_scale_init=contrastive.siglip.LOG_SCALE_INIT,
        max_log_scale=None,
    ),
}

LOSS_DEFAULTS = {
    "name": "clip",
    "log_scale_init": None,  # CLIP: log(1/0.07); SigLIP: log(10)
    "bias_init": contrastive.siglip.BIAS_INIT,
    "max_log_scale": "default",  # CLIP: log(100); SigLIP: none. None disables the clamp.
    "weight": 1.0,
    "sharded": False,  # captions: shard_map losses over the batch axes
}
FUSION_DEFAULTS = {"name": None, "weight": 1.0, "sampling": "hardest", "temperature": 1.0}


def loss_options(given: Mapping[str, Any] | None) -> tuple[dict[str, Any], Loss]:
    """`config.model.loss` with its defaults (the named loss's temperature defaults filled in)
    and the `Loss` it names."""
    opts = config_lib.options(given, LOSS_DEFAULTS, "config.model.loss")
    if opts["name"] not in LOSSES:
        raise UserError(f"config.model.loss.name={opts['name']!r}: use {tuple(LOSSES)}.")
    loss = LOSSES[opts["name"]]
    if opts["log_scale_init"] is None:
        opts["log_scale_init"] = loss.log_scale_init
    if opts["max_log_scale"] == "default":
        opts["max_log_scale"] = loss.max_log_scale
    return opts, loss


def fusion_options(given: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict | None]:
    """`config.model.fusion` split into the ITM loss's options (`FUSION_DEFAULTS`) and the
    fused head's name and module options (None without a fused head)."""
    given = dict(given.to_dict() if hasattr(given, "to_dict") else given or {})
    head = {k: v for k, v in given.items() if k not in FUSION_DEFAULTS}
    given = {k: v for k, v in given.items() if k in FUSION_DEFAULTS}
    opts = config_lib.options(given, FUSION_DEFAULTS, "config.model.fusion")
    return opts, ({"name": opts["name"], **head} if opts["name"] else None)


def itm_loss(
    head_module: nn.Module,
    opts: Mapping[str, Any],
    head_vars: Any,
    image_feats: jax.Array,
    text_pairs: jax.Array,
    sim_pairs: jax.Array,
    labels: jax.Array | None,
    mask: jax.Array | None,
    rng: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Per-head ITM loss and accuracy `([H], [H])` with in-batch hard negatives under each
    head's contrastive similarity (`text_pairs` [H, B, Dt], `sim_pairs` [H, B, B]); `opts` is
    `config.model.fusion` (`FUSION_DEFAULTS`).

    With class names (`labels` [B], `mask` [H, C]) a head sees only the examples of its own
    classes: other examples are never picked as negatives and their pairs get weight 0, and
    texts of the same class are never negatives of each other."""
    b, num_heads = image_feats.shape[0], sim_pairs.shape[0]

    def one(hv, sim, texts, r, train):
        if labels is None:
            exclude, w = None, jnp.ones((b,), jnp.float32)
        else:
            w = train[labels].astype(jnp.float32)
            outside = w[:, None] * w[None, :] == 0
            exclude = (labels[:, None] == labels[None, :]) | outside
        t_for_i, i_for_t = itm.hard_negatives(
            sim,
            sampling=opts["sampling"],
            rng=r,
            temperature=opts["temperature"],
            positive_mask=exclude,
        )
        inputs, target = itm.itm_pairs(image_feats, texts, t_for_i, i_for_t)
        score = head_module.apply(
            hv, inputs["image_feats"], inputs["text_feats"], method="match"
        ).astype(jnp.float32)
        weight = jnp.concatenate([w, w, w])  # positives, image negatives, text negatives
        total = jnp.maximum(weight.sum(), 1.0)
        bce = optax.sigmoid_binary_cross_entropy(score, target)
        correct = (score > 0) == (target > 0.5)
        return jnp.sum(weight * bce) / total, jnp.sum(weight * correct) / total

    rngs = jax.random.split(rng, num_heads)
    train = mask if mask is not None else jnp.ones((num_heads, 1), bool)
    return jax.vmap(one)(head_vars, sim_pairs, text_pairs, rngs, train)
