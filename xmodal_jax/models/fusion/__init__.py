"""Fusion heads over pooled (and optionally token-level) image and text features.

Every head is a Flax module with the same call:
    head(image_feats [B, Di], text_feats [B, Dt], *, image_tokens=None [B, N, Di],
         text_tokens=None [B, M, Dt], text_mask=None [B, M], train=False)
    -> {'fused': [B, out_dim], ...}
and is built by name with `build(name, **config)`.
"""

import dataclasses
import difflib

import flax.linen as nn

from xmodal_jax.models.fusion.bilinear import BilinearFusion
from xmodal_jax.models.fusion.concat_mlp import ConcatMLP
from xmodal_jax.models.fusion.cross_attention import CrossAttentionFusion
from xmodal_jax.models.fusion.film import FiLMFusion
from xmodal_jax.models.fusion.gated import GatedFusion
from xmodal_jax.models.fusion.late_fusion import LateFusion

HEADS: dict[str, type[nn.Module]] = {
    "concat_mlp": ConcatMLP,
    "late_fusion": LateFusion,
    "gated": GatedFusion,
    "film": FiLMFusion,
    "bilinear": BilinearFusion,
    "cross_attention": CrossAttentionFusion,
}


def config_keys(name: str) -> dict[str, object]:
    """The config keys of head `name` and their defaults (required keys map to None)."""
    cls = _lookup(name)
    keys = {}
    for f in dataclasses.fields(cls):
        if f.name in ("parent", "name"):
            continue
        keys[f.name] = None if f.default is dataclasses.MISSING else f.default
    return keys


def build(name: str, **kwargs) -> nn.Module:
    """Builds the fusion head registered as `name` with config `kwargs`."""
    cls = _lookup(name)
    unknown = sorted(set(kwargs) - set(config_keys(name)))
    if unknown:
        raise ValueError(
            f"Fusion head {name!r} has no config keys {unknown}; its keys are "
            f"{sorted(config_keys(name))}."
        )
    return cls(**kwargs)


def _lookup(name: str) -> type[nn.Module]:
    if name not in HEADS:
        close = difflib.get_close_matches(name, HEADS, n=3, cutoff=0.4)
        hint = f"did you mean {close}? " if close else ""
        raise ValueError(f"Unknown fusion head {name!r}; {hint}valid names: {sorted(HEADS)}.")
    return HEADS[name]


__all__ = [
    "HEADS",
    "BilinearFusion",
    "ConcatMLP",
    "CrossAttentionFusion",
    "FiLMFusion",
    "GatedFusion",
    "LateFusion",
    "build",
    "config_keys",
]
