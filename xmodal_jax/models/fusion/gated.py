"""Gated multimodal unit (Arevalo et al. 2017, "Gated Multimodal Units for Information Fusion").

h_v = tanh(W_v x_v), h_t = tanh(W_t x_t), z = sigmoid(W_z [x_v; x_t]),
h = z * h_v + (1 - z) * h_t: a learned, per-unit and per-example choice between modalities.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense


class GatedFusion(nn.Module):
    """GMU over the pooled features; returns the fused h and the gate z (1 = image)."""

    out_dim: int
    use_bias: bool = False  # the paper's equations have no biases
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
        check_inputs("gated", image_feats, text_feats, image_tokens, text_tokens, text_mask)
        kw = dict(use_bias=self.use_bias, dtype=self.dtype)
        names = ("embed", "mlp")
        h_v = jnp.tanh(dense(self.out_dim, names, name="image_proj", **kw)(image_feats))
        h_t = jnp.tanh(dense(self.out_dim, names, name="text_proj", **kw)(text_feats))
        both = jnp.concatenate([image_feats, text_feats], axis=-1)
        z = jax.nn.sigmoid(dense(self.out_dim, names, name="gate", **kw)(both))
        return {"fused": z * h_v + (1.0 - z) * h_t, "gate": z}
