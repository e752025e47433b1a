"""The domain discriminator of adversarial domain adaptation (DANN, CDAN, importance weighting):
an MLP over features (or CDAN's multilinear maps) giving one "is source" logit per example."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

Array = jax.Array


class DomainDiscriminator(nn.Module):
    """MLP ``in -> hidden[0] -> ... -> 1`` with ReLU; returns [B] logits of "is source"."""

    hidden: Sequence[int] = (1024, 1024)
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(1, name="out")(x)[..., 0]
