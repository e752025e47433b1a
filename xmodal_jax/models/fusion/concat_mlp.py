"""Early fusion: concatenate the pooled image and text features and run an MLP."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import layers
from xmodal_jax.models.fusion.common import Dtype, check_inputs, dense


class ConcatMLP(nn.Module):
    """fused = W_out act(... act(W_1 [x_img; x_txt] + b_1) ...) + b_out.

    Tokens and masks are accepted for interface compatibility and ignored.
    """

    out_dim: int
    hidden_dim: int = 512
    num_hidden_layers: int = 1
    dropout_rate: float = 0.0
    activation: str = "relu"
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
        check_inputs("concat_mlp", image_feats, text_feats, image_tokens, text_tokens, text_mask)
        act = layers.activation(self.activation)
        x = jnp.concatenate([image_feats, text_feats], axis=-1)
        for i in range(self.num_hidden_layers):
            names = ("embed", "mlp") if i == 0 else (None, "mlp")
            x = act(dense(self.hidden_dim, names, name=f"hidden_{i}", dtype=self.dtype)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        fused = dense(self.out_dim, ("mlp", "embed"), name="out", dtype=self.dtype)(x)
        return {"fused": fused}
