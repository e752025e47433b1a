"""Contrastive losses of images against class prompts, and the projected temperature clamp.

With a classification dataset the texts of a batch are its class prompts, and one prompt
matches many images. `class_clip_loss` is CLIP's image->text InfoNCE (Radford et al. 2021) with
the class prompts as the candidate texts; `class_siglip_loss` is SigLIP's pairwise sigmoid
(Zhai et al. 2023) over every image x class pair, summed over classes and averaged over images
as SigLIP sums over texts and averages over images. Both take a class mask, so several heads
can train on different class subsets of the same batch (examples of other classes get weight 0).

`clamp_projected(x, upper)` is `min(x, upper)` whose gradient acts like a projection onto
x <= upper: in bounds it is the identity; above the bound a gradient g passes only when the
descent step -g lowers x. It clamps a learnable log-temperature where it is used, in place of
clamping the parameter after each optimiser step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from xmodal_jax.objectives.contrastive import l2_normalize


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def clamp_projected(x: jax.Array, upper: float) -> jax.Array:
    """`min(x, upper)`; above `upper` only gradients that lower `x` pass (see the module doc)."""
    return jnp.minimum(x, upper)


def _clamp_fwd(x, upper):
    return jnp.minimum(x, upper), x


def _clamp_bwd(upper, x, g):
    # Gradient descent moves x by -g: keep g when x is in bounds or when -g points down.
    return (jnp.where((x <= upper) | (g > 0), g, jnp.zeros_like(g)),)


clamp_projected.defvjp(_clamp_fwd, _clamp_bwd)


def class_clip_loss(
    image_emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    log_scale: jax.Array,
    class_mask: jax.Array,
) -> jax.Array:
    """CLIP's image->text InfoNCE against class prompts: mean over the images whose class is in
    `class_mask` [C] of -log softmax_c(exp(log_scale) cos(image, class_c)) at the true class,
    the softmax running over the classes of `class_mask` only."""
    zi, zc = l2_normalize(image_emb), l2_normalize(class_emb)
    logits = jnp.exp(log_scale) * (zi @ zc.T)
    logits = jnp.where(class_mask[None, :], logits, -jnp.inf)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], 1)[:, 0]
    weight = class_mask[labels].astype(jnp.float32)
    return jnp.sum(jnp.where(weight > 0, nll, 0.0)) / jnp.maximum(weight.sum(), 1.0)


def class_siglip_loss(
    image_emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    log_scale: jax.Array,
    bias: jax.Array,
    class_mask: jax.Array,
) -> jax.Array:
    """SigLIP against class prompts: -sum_c log sigmoid(y_ic (exp(t') cos(image, class_c) + b))
    over the classes of `class_mask`, y = +1 at the true class and -1 elsewhere, averaged over
    the images whose class is in `class_mask` (SigLIP's sum over texts, mean over images)."""
    zi, zc = l2_normalize(image_emb), l2_normalize(class_emb)
    logits = jnp.exp(log_scale) * (zi @ zc.T) + bias
    y = 2.0 * jax.nn.one_hot(labels, class_emb.shape[0]) - 1.0
    nll = -jnp.sum(jnp.where(class_mask[None, :], jax.nn.log_sigmoid(y * logits), 0.0), axis=-1)
    weight = class_mask[labels].astype(jnp.float32)
    return jnp.sum(nll * weight) / jnp.maximum(weight.sum(), 1.0)
