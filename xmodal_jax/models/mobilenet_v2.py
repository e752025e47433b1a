"""MobileNetV2 (Sandler et al. 2018), the torchvision layout: inverted residual blocks of
1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, BatchNorm and ReLU6.

`width` is the width multiplier (channels rounded to multiples of 8, as in the paper's
reference code); `depthwise` picks the depthwise-conv implementation ('conv' | 'shift' |
'shift_vjp' | 'auto', see `layers.DepthwiseConv`) without changing the parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import axes, layers

# (expansion t, output channels c, repeats n, first stride s): Table 2 of the paper.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round `value` to a multiple of `divisor`, never more than 10% below it."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class MobileNetV2(nn.Module):
    """MobileNetV2 tower: `{'pooled': [B, 1280], 'features': [B, H, W, 1280], 'logits'?}`."""

    num_classes: int = 0
    width: float = 1.0
    depthwise: str = "auto"  # 'conv' | 'shift' | 'shift_vjp' | 'auto'
    stem: str = "imagenet"  # 'imagenet' (stride-2 first conv) | 'small' (stride 1)
    dropout: float = 0.2  # before the classifier, as torchvision
    bn_momentum: float = 0.9
    norm_eps: float = 1e-5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        layers.check_choice("stem", self.stem, ("imagenet", "small"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.cnn_norm(
            "batch", train=train, name=name, momentum=self.bn_momentum, eps=self.norm_eps, **kw
        )
        relu6 = jax.nn.relu6

        c_in = make_divisible(32 * self.width)
        x = x.astype(self.dtype)
        stride = 2 if self.stem == "imagenet" else 1
        x = layers.Conv(c_in, 3, strides=stride, name="stem_conv", **kw)(x)
        x = relu6(norm("stem_norm")(x))

        index = 0
        for t, c, n, s in SETTINGS:
            c_out = make_divisible(c * self.width)
            for i in range(n):
                index += 1
                name = f"block{index}"
                stride = s if i == 0 else 1
                y = x
                hidden = int(round(x.shape[-1] * t))
                if t != 1:
                    y = layers.Conv(hidden, 1, name=f"{name}_expand_conv", **kw)(y)
                    y = relu6(norm(f"{name}_expand_norm")(y))
                y = layers.DepthwiseConv(3, stride, self.depthwise, name=f"{name}_dw_conv", **kw)(y)
                y = relu6(norm(f"{name}_dw_norm")(y))
                y = layers.Conv(c_out, 1, name=f"{name}_project_conv", **kw)(y)
                y = norm(f"{name}_project_norm")(y)
                x = x + y if (stride == 1 and x.shape[-1] == c_out) else y

        c_last = make_divisible(1280 * max(1.0, self.width))
        x = layers.Conv(c_last, 1, name="last_conv", **kw)(x)
        x = relu6(norm("last_norm")(x))

        pooled = jnp.mean(x, axis=(1, 2))
        out = {"pooled": pooled, "features": x}
        if self.num_classes:
            h = nn.Dropout(self.dropout)(pooled, deterministic=not train)
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(h)
        return out
