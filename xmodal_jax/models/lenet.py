"""LeNet for 28x28 digits with a bottleneck, the backbone of the digits adaptation tables.

Layout follows the digits LeNet used in domain adaptation benchmarks (two 5x5 convolutions with
20 and 50 channels, max-pool, a 500-unit layer, dropout), then a `bottleneck`-wide feature layer
and a linear head. No BatchNorm by default; `norm="batch"` adds BatchNorm after each
convolution and the 500-unit layer (the variant AdaBN adapts). `pool` picks the max-pooling form:
`tiled` (`pooling.tiled_max_pool`, the default) or `reduce_window` (`nn.max_pool`): the same
values and gradients, the first with about twice as fast a train step on CPU
(`xmodal bench --ablations max_pool`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from xmodal_jax.models.pooling import tiled_max_pool

_conv_init = nn.with_logical_partitioning(
    nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")
)
_bias = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",))


def _dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    kernel = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
    return nn.Dense(features, kernel_init=kernel, bias_init=_bias, name=name)


class LeNet(nn.Module):
    """Returns `pooled` (bottleneck features), `features` (last conv map) and `logits`."""

    num_classes: int = 10
    bottleneck: int = 256
    dropout: float = 0.5
    norm: str | None = None
    pool: str = "tiled"

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.norm not in (None, "batch"):
            raise ValueError(f"LeNet norm={self.norm!r}: use None or 'batch'.")
        if self.pool not in ("tiled", "reduce_window"):
            raise ValueError(f"LeNet pool={self.pool!r}: use 'tiled' or 'reduce_window'.")

        def norm(y):
            if self.norm is None:
                return y
            return nn.BatchNorm(use_running_average=not train, momentum=0.9)(y)

        def pool(y):
            if self.pool == "tiled":
                return tiled_max_pool(y, (2, 2))
            return nn.max_pool(y, (2, 2), strides=(2, 2))

        x = nn.Conv(20, (5, 5), padding="VALID", kernel_init=_conv_init, bias_init=_bias)(x)
        x = nn.relu(pool(norm(x)))
        x = nn.Conv(50, (5, 5), padding="VALID", kernel_init=_conv_init, bias_init=_bias)(x)
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(norm(x))
        fmap = nn.relu(pool(x))
        x = fmap.reshape(fmap.shape[0], -1)
        x = nn.relu(norm(_dense(500, ("embed", "mlp"), "fc")(x)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        feats = nn.relu(_dense(self.bottleneck, ("mlp", "embed"), "bottleneck")(x))
        logits = _dense(self.num_classes, ("embed", "classes"), "head")(feats)
        return {"pooled": feats, "features": fmap, "logits": logits}
