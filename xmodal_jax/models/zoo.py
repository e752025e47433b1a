"""Registry of towers by name: `build('vit_b16', num_classes=10)` -> a Flax module.

Overrides are module attributes (`num_classes`, `dtype`, `scan_layers`, `norm`, `stem`,
`width`, `pool`, ...); an unknown name or attribute raises a `UserError` (a `ValueError`) naming the
closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import flax.linen as nn

from xmodal_jax.errors import UserError
from xmodal_jax.models import (
    bert,
    clip_text,
    efficientnet_lite,
    mobilenet_v2,
    modified_resnet,
    resnet,
    siglip_text,
    vit,
)

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def _register(name: str, cls: type[nn.Module], **defaults: Any) -> None:
    _REGISTRY[name] = (cls, defaults)


for _depth in (18, 34, 50, 101, 152):
    _register(f"resnet{_depth}", resnet.ResNet, depth=_depth)
_register("mobilenet_v2", mobilenet_v2.MobileNetV2)
# EfficientNet-Lite0..2: width / depth coefficients and dropout of the TF reference
# (efficientnet_lite.VARIANTS).
for _v in ("lite0", "lite1", "lite2"):
    _w, _d, _res, _drop = efficientnet_lite.VARIANTS[_v]
    _register(f"efficientnet_{_v}", efficientnet_lite.EfficientNetLite, width=_w, depth=_d,
              dropout=_drop)  # fmt: skip
for _size, _cfg in vit.VARIANTS.items():
    for _patch in (8, 16, 32):
        _register(f"vit_{_size}{_patch}", vit.ViT, patch_size=_patch, **_cfg)
# BERT sizes: Devlin et al. 2019, Table 1; MiniLM: the all-MiniLM-L6-v2 / L12 configs.
_register("bert_base", bert.Bert, width=768, depth=12, num_heads=12, mlp_dim=3072)
_register("bert_large", bert.Bert, width=1024, depth=24, num_heads=16, mlp_dim=4096)
_register("minilm_l6", bert.Bert, width=384, depth=6, num_heads=12, mlp_dim=1536)
_register("minilm_l12", bert.Bert, width=384, depth=12, num_heads=12, mlp_dim=1536)
# CLIP text towers: Radford et al. 2021, Table 20 (ViT-B/* and ViT-L/14 text encoders).
_register("clip_text_b", clip_text.CLIPText, width=512, depth=12, num_heads=8, proj_dim=512)
_register("clip_text_l", clip_text.CLIPText, width=768, depth=12, num_heads=12, proj_dim=768)
# SigLIP text towers: the B, L and So400m text encoders of Zhai et al. 2023 (the HF
# google/siglip-* configs: vocabulary 32000, 64 tokens).
for _size, _width, _depth, _heads, _mlp in (("b", 768, 12, 12, 3072), ("l", 1024, 24, 16, 4096),
                                            ("so400m", 1152, 27, 16, 4304)):  # fmt: skip
    _register(f"siglip_text_{_size}", siglip_text.SigLIPText, width=_width, depth=_depth,
              num_heads=_heads, mlp_dim=_mlp, proj_dim=_width)  # fmt: skip
# CLIP's ModifiedResNet image towers (RN50 .. RN50x64); attention-pool heads: 32 * width / 64.
for _size, _cfg in modified_resnet.VARIANTS.items():
    _heads = _cfg["width"] // 2
    _register(f"modified_resnet{_size}", modified_resnet.ModifiedResNet, num_heads=_heads, **_cfg)


def names() -> list[str]:
    """All registered tower names, sorted."""
    return sorted(_REGISTRY)


def canonical(name: str) -> str:
    """`name` as registered: lower case, `-` as `_`, no `/` (`ViT-B/16` -> `vit_b16`)."""
    return name.strip().lower().replace("-", "_").replace("/", "")


def spec(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    """The module class and default attributes registered under `name`."""
    key = canonical(name)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, names(), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"Unknown model {name!r}; {hint}valid names: {', '.join(names())} "
            "(see xmodal_jax.models.zoo.names())."
        )
    cls, defaults = _REGISTRY[key]
    return cls, dict(defaults)


def build(name: str, **overrides: Any) -> nn.Module:
    """Build the tower registered as `name` with attribute `overrides`."""
    cls, kwargs = spec(name)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, fields, n=2, cutoff=0.5)
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise UserError(
            f"Unknown option(s) {', '.join(hints)} for model {name!r} ({cls.__name__}); "
            f"valid options: {', '.join(fields)}."
        )
    kwargs.update(overrides)
    return cls(**kwargs)
