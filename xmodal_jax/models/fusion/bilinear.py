"""Low-rank bilinear pooling (Kim et al. 2017, "Hadamard Product for Low-rank Bilinear Pooling").

A full bilinear map x^T W_k y per output k is factorised as P^T (tanh(U^T x) o tanh(V^T y)):
the Hadamard product of two rank-`rank` projections followed by an output projection.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense


class BilinearFusion(nn.Module):
    """fused = P^T (tanh(U^T x_img + b_u) o tanh(V^T x_txt + b_v)) + b_p."""

    out_dim: int
    rank: int = 512
    dropout_rate: float = 0.0
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
        check_inputs("bilinear", image_feats, text_feats, image_tokens, text_tokens, text_mask)
        kw = dict(dtype=self.dtype)
        u = jnp.tanh(dense(self.rank, ("embed", "mlp"), name="image_proj", **kw)(image_feats))
        v = jnp.tanh(dense(self.rank, ("embed", "mlp"), name="text_proj", **kw)(text_feats))
        joint = nn.Dropout(self.dropout_rate, deterministic=not train)(u * v)
        fused = dense(self.out_dim, ("mlp", "embed"), name="out", **kw)(joint)
        return {"fused": fused}
