"""ResNet v1.5 (He et al. 2016; stride in the 3x3 conv of a bottleneck, as torchvision).

`norm='batch'` is the torchvision model; `norm='group'` swaps BatchNorm for GroupNorm and
standardises conv weights (BiT-style transfer, Kolesnikov et al. 2020), which does not depend
on batch statistics. `stem='small'` replaces the 7x7/2 conv + max-pool by one 3x3/1 conv for
small images (CIFAR-size, digits). `pool` picks the stem's max-pool: `reduce_window`
(`nn.max_pool`, the default) or `strided` (`pooling.max_pool`), the same values and gradients;
on CPU the second left the ResNet-50 train step level at batch 4 and made it much slower at
batch 16 (`xmodal bench --ablations max_pool`, BENCHMARKS.md), so it is not the default.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.errors import UserError
from xmodal_jax.models import axes, layers, pooling, residuals

STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """ResNet v1.5 tower: `{'pooled': [B, C], 'features': [B, H, W, C], 'logits'?}`."""

    depth: int = 50
    num_classes: int = 0
    width: float = 1.0  # multiplies the base widths 64, 128, 256, 512
    stage_sizes: tuple[int, ...] | None = None  # blocks per stage; default from `depth`
    block: str | None = None  # 'basic' | 'bottleneck'; default from `depth`
    norm: str = "batch"  # 'batch' | 'group'
    norm_groups: int = 32
    weight_std: bool | None = None  # default: True with GroupNorm
    stem: str = "imagenet"  # 'imagenet' | 'small'
    pool: str = "reduce_window"  # the stem's max-pool: 'reduce_window' | 'strided'
    bn_momentum: float = 0.9
    norm_eps: float = 1e-5
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _arch(self) -> tuple[str, tuple[int, ...]]:
        if self.stage_sizes is None and self.depth not in STAGES:
            raise UserError(
                f"ResNet depth {self.depth} is not one of {sorted(STAGES)}; pass stage_sizes=... "
                "and block='basic'|'bottleneck' for a custom depth."
            )
        block, sizes = STAGES.get(self.depth, ("bottleneck", ()))
        return self.block or block, tuple(self.stage_sizes or sizes)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
        block, sizes = self._arch()
        layers.check_choice("block", block, ("basic", "bottleneck"))
        layers.check_choice("stem", self.stem, ("imagenet", "small"))
        layers.check_choice("pool", self.pool, ("reduce_window", "strided"))
        ws = self.norm == "group" if self.weight_std is None else self.weight_std
        conv = lambda *a, **k: layers.Conv(
            *a, weight_std=ws, dtype=self.dtype, param_dtype=self.param_dtype, **k
        )

        def norm(name: str, channels: int, zero: bool = False) -> nn.Module:
            if self.norm == "group" and channels % self.norm_groups:
                raise UserError(
                    f"GroupNorm: {channels} channels in {name} are not divisible by "
                    f"norm_groups={self.norm_groups}; choose a divisor of every stage width."
                )
            return layers.cnn_norm(
                self.norm,
                train=train,
                name=name,
                groups=self.norm_groups,
                momentum=self.bn_momentum,
                eps=self.norm_eps,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                zero_scale=zero,
            )

        base = max(1, round(64 * self.width))
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(base, 7, strides=2, name="stem_conv")(x)
            x = jax.nn.relu(norm("stem_norm", base)(x))
            pool = pooling.max_pool if self.pool == "strided" else nn.max_pool
            x = pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = conv(base, 3, name="stem_conv")(x)
            x = jax.nn.relu(norm("stem_norm", base)(x))

        expansion = 4 if block == "bottleneck" else 1
        for i, n_blocks in enumerate(sizes):
            mid = base * 2**i
            out = mid * expansion
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                prefix = f"stage{i + 1}_block{j + 1}"
                residual = x
                if stride != 1 or x.shape[-1] != out:
                    residual = conv(out, 1, strides=stride, name=f"{prefix}_proj_conv")(x)
                    residual = norm(f"{prefix}_proj_norm", out)(residual)
                if block == "basic":
                    y = conv(mid, 3, strides=stride, name=f"{prefix}_conv1")(x)
                    y = jax.nn.relu(norm(f"{prefix}_norm1", mid)(y))
                    y = conv(out, 3, name=f"{prefix}_conv2")(y)
                    y = norm(f"{prefix}_norm2", out, self.zero_init_residual)(y)
                else:
                    y = conv(mid, 1, name=f"{prefix}_conv1")(x)
                    y = jax.nn.relu(norm(f"{prefix}_norm1", mid)(y))
                    y = conv(mid, 3, strides=stride, name=f"{prefix}_conv2")(y)
                    y = jax.nn.relu(norm(f"{prefix}_norm2", mid)(y))
                    y = conv(out, 1, name=f"{prefix}_conv3")(y)
                    y = norm(f"{prefix}_norm3", out, self.zero_init_residual)(y)
                x = residuals.stored(jax.nn.relu(y + residual))  # see `residuals.py`

        pooled = jnp.mean(x, axis=(1, 2))
        out = {"pooled": pooled, "features": x}
        if self.num_classes:
            out["logits"] = layers.Dense(
                self.num_classes,
                (axes.EMBED, axes.CLASSES),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="head",
            )(pooled)
        return out
