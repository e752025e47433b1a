"""FiLM (Perez et al. 2018, "FiLM: Visual Reasoning with a General Conditioning Layer").

The text produces per-channel gamma and beta that modulate the image features:
FiLM(x) = gamma * x + beta. Each block follows the paper's residual block with 1x1 convolutions
(Dense over channels) and LayerNorm without affine parameters in place of BatchNorm (FiLM
supplies the affine part):  x <- x + relu(FiLM(norm(W x))).  gamma = 1 + delta_gamma so a block
starts close to the unmodulated one. Spatial maps / patches come in as image_tokens [B, N, C]
and are mean-pooled after the blocks; without tokens the pooled image_feats are modulated.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense, layer_norm


class FiLMFusion(nn.Module):
    out_dim: int
    hidden_dim: int = 256
    num_blocks: int = 1
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
        check_inputs("film", image_feats, text_feats, image_tokens, text_tokens, text_mask)
        h, kw = self.hidden_dim, dict(dtype=self.dtype)
        x = image_tokens if image_tokens is not None else image_feats[:, None, :]
        x = nn.relu(dense(h, ("embed", "mlp"), name="image_in", **kw)(x))
        film = dense(2 * h * self.num_blocks, ("embed", "mlp"), name="film_generator", **kw)
        gammas, betas = jnp.split(film(text_feats).reshape(-1, self.num_blocks, 2, h), 2, axis=2)
        for i in range(self.num_blocks):
            y = dense(h, (None, "mlp"), name=f"block_{i}", **kw)(x)
            y = layer_norm(name=f"block_{i}_norm", affine=False, dtype=self.dtype)(y)
            gamma, beta = 1.0 + gammas[:, i, 0][:, None, :], betas[:, i, 0][:, None, :]
            x = x + nn.relu(gamma * y + beta)
        pooled = jnp.mean(x, axis=1)
        fused = dense(self.out_dim, ("mlp", "embed"), name="out", **kw)(pooled)
        return {"fused": fused}
