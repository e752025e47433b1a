"""The image-text matching head: a fusion head plus a linear match score over its `fused`
output (the ITM loss that trains it: `objectives/itm.py`)."""

import flax.linen as nn
import jax

from xmodal_jax.models.fusion.common import dense


class ITMHead(nn.Module):
    """Wraps a fusion head and adds `score` [B]: a linear layer over its `fused` output."""

    fusion: nn.Module

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
        out = dict(
            self.fusion(
                image_feats,
                text_feats,
                image_tokens=image_tokens,
                text_tokens=text_tokens,
                text_mask=text_mask,
                train=train,
            )
        )
        out["score"] = dense(1, ("embed", None), name="itm_score")(out["fused"])[:, 0]
        return out
