"""Contrastive image-text losses: CLIP softmax InfoNCE and SigLIP sigmoid, plain and sharded."""

from xmodal_jax.objectives.contrastive.clip import (
    LogitScale,
    clamp_logit_scale,
    clip_loss,
    clip_loss_sharded,
)
from xmodal_jax.objectives.contrastive.common import l2_normalize
from xmodal_jax.objectives.contrastive.siglip import (
    SigLIPLogitParams,
    siglip_loss,
    siglip_loss_sharded,
)

__all__ = [
    "LogitScale",
    "SigLIPLogitParams",
    "clamp_logit_scale",
    "clip_loss",
    "clip_loss_sharded",
    "l2_normalize",
    "siglip_loss",
    "siglip_loss_sharded",
]
