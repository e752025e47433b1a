"""Late fusion: one classifier per modality, their scores averaged with configurable weights."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense

COMBINE = ("logits", "log_probs")


class LateFusion(nn.Module):
    """fused = (w_img * s_img + w_txt * s_txt) / (w_img + w_txt), s = per-modality scores.

    `combine='logits'` averages raw logits; `'log_probs'` averages log-softmax scores (a
    weighted geometric mean of the per-modality class distributions). A weight of 0 drops a
    modality. Tokens and masks are ignored.
    """

    out_dim: int
    weights: Sequence[float] = (0.5, 0.5)
    combine: str = "logits"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        image_feats: jax.Array,
        text_feats: jax.Array,
        *,
        image_tokens: jax.Array | None = None,
        text_tokens: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        train: bool = False,
    ) -> dict[str, jax.Array]:
        check_inputs("late_fusion", image_feats, text_feats, image_tokens, text_tokens, text_mask)
        w = tuple(float(v) for v in self.weights)
        if len(w) != 2 or min(w) < 0 or sum(w) <= 0:
            raise ValueError(
                f"late_fusion: weights must be two non-negative numbers (image, text) with a "
                f"positive sum; got {self.weights}."
            )
        if self.combine not in COMBINE:
            raise ValueError(
                f"late_fusion: combine must be one of {COMBINE}; got {self.combine!r}."
            )
        names = ("embed", "classes")
        s_img = dense(self.out_dim, names, name="image_classifier", dtype=self.dtype)(image_feats)
        s_txt = dense(self.out_dim, names, name="text_classifier", dtype=self.dtype)(text_feats)
        if self.combine == "log_probs":
            s_img, s_txt = jax.nn.log_softmax(s_img), jax.nn.log_softmax(s_txt)
        fused = (w[0] * s_img + w[1] * s_txt) / sum(w)
        return {"fused": fused, "image_logits": s_img, "text_logits": s_txt}
