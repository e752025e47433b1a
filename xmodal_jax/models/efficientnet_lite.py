"""EfficientNet-Lite (Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for Convolutional
Neural Networks", with the Lite changes of the TF reference, tensorflow/tpu
`models/official/efficientnet/lite/efficientnet_lite_builder.py`): no squeeze-excitation, ReLU6
instead of swish, and stem (32) and head (1280) widths fixed under scaling, as are the repeats
of the first and last stages.

Blocks are MBConv: 1x1 expansion (absent at expansion 1) -> k x k depthwise -> 1x1 linear
projection, BatchNorm after each (epsilon 1e-3, decay 0.99: the TF reference; torch momentum
0.01), a residual when the stride is 1 and the width unchanged. Convolutions pad as TF's 'SAME'
(for a stride of 2 on an even size one row / column less before than after), which is what the
weights were trained with. Parameters are named as MobileNetV2's (`stem_*`, `block{i}_*`,
`last_*`, `head`), so layer-wise decay sees one depth per block.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.models import axes, layers
from xmodal_jax.models.mobilenet_v2 import make_divisible

STEM, HEAD = 32, 1280  # fixed for every Lite variant

# EfficientNet-B0's stages (Table 1 of the paper; the TF reference's block strings
# 'r1_k3_s11_e1_i32_o16', ..., 'r1_k3_s11_e6_i192_o320', without '_se0.25' in Lite):
# (kernel, first stride, expansion, output channels, repeats).
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

# (width coefficient, depth coefficient, resolution, dropout): `efficientnet_lite_params` of
# the TF reference.
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}


def blocks(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """`(kernel, stride, expansion, in channels, out channels)` of every MBConv block: widths
    `make_divisible(c * width)`, repeats `ceil(n * depth)` except in the first and last stage."""
    out, c_in = [], STEM
    for i, (k, s, e, c, n) in enumerate(STAGES):
        c_out = make_divisible(c * width)
        repeats = n if i in (0, len(STAGES) - 1) else int(math.ceil(n * depth))
        for r in range(repeats):
            out.append((k, s if r == 0 else 1, e, c_in, c_out))
            c_in = c_out
    return out


def same_pad(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """Pad NHWC `x` as TF's 'SAME' does before a `kernel` x `kernel` convolution of `stride`:
    `max((ceil(n / s) - 1) * s + k - n, 0)` in all, the smaller half before."""
    pads = [(0, 0)]
    for n in x.shape[1:3]:
        total = max((-(-n // stride) - 1) * stride + kernel - n, 0)
        pads.append((total // 2, total - total // 2))
    return jnp.pad(x, [*pads, (0, 0)])


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite tower: `{'pooled': [B, 1280], 'features': [B, H, W, 1280], 'logits'?}`.

    `width` / `depth` are the compound-scaling coefficients (`VARIANTS`); `depthwise` picks the
    depthwise-conv implementation ('conv' | 'shift' | 'shift_vjp' | 'auto', see
    `layers.DepthwiseConv`).
    """

    num_classes: int = 0
    width: float = 1.0
    depth: float = 1.0
    depthwise: str = "auto"  # 'conv' | 'shift' | 'shift_vjp' | 'auto'
    dropout: float = 0.2  # before the classifier
    bn_momentum: float = 0.99
    norm_eps: float = 1e-3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: layers.cnn_norm(
            "batch", train=train, name=name, momentum=self.bn_momentum, eps=self.norm_eps, **kw
        )
        relu6 = jax.nn.relu6

        x = same_pad(x.astype(self.dtype), 3, 2)
        x = layers.Conv(STEM, 3, strides=2, padding=0, name="stem_conv", **kw)(x)
        x = relu6(norm("stem_norm")(x))
        for index, (k, s, e, c_in, c_out) in enumerate(blocks(self.width, self.depth), 1):
            name = f"block{index}"
            y = x
            if e != 1:
                y = layers.Conv(c_in * e, 1, name=f"{name}_expand_conv", **kw)(y)
                y = relu6(norm(f"{name}_expand_norm")(y))
            dw = layers.DepthwiseConv(k, s, self.depthwise, padding=0, name=f"{name}_dw_conv", **kw)
            y = dw(same_pad(y, k, s))
            y = relu6(norm(f"{name}_dw_norm")(y))
            y = layers.Conv(c_out, 1, name=f"{name}_project_conv", **kw)(y)
            y = norm(f"{name}_project_norm")(y)
            x = x + y if (s == 1 and c_in == c_out) else y

        x = layers.Conv(HEAD, 1, name="last_conv", **kw)(x)
        x = relu6(norm("last_norm")(x))

        pooled = jnp.mean(x, axis=(1, 2))
        out = {"pooled": pooled, "features": x}
        if self.num_classes:
            h = nn.Dropout(self.dropout)(pooled, deterministic=not train)
            out["logits"] = layers.Dense(
                self.num_classes, (axes.EMBED, axes.CLASSES), name="head", **kw
            )(h)
        return out
