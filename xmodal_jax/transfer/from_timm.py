"""timm `VisionTransformer` state dicts -> our ViT.

Key names of huggingface/pytorch-image-models `timm/models/vision_transformer.py`:
`cls_token` [1, 1, D], `pos_embed` [1, 1 + N, D], `patch_embed.proj`, `blocks.{i}.norm1`,
`blocks.{i}.attn.qkv` (one Linear, rows ordered q, k, v), `blocks.{i}.attn.proj`,
`blocks.{i}.norm2`, `blocks.{i}.mlp.fc1` / `fc2`, `norm` (or `fc_norm`, the norm after average
pooling), `head`. Pooling by the cls token (`global_pool='token'`) or by the patch tokens' mean
(`'avg'`); variants with register tokens, layer scale, attention pooling or q/k norms are
refused.

timm's hub folders hold a `config.json` beside the weights (`timm.models.save_for_hf`):
`architecture` (the timm model name), `model_args` (the arguments the model was created with,
such as `embed_dim`, `num_heads`, `global_pool`) and `pretrained_cfg` (input size, mean, std,
crop_pct, interpolation), which give what the tensors do not: heads, pooling, preprocessing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch

_UNSUPPORTED = (
    "reg_token",
    "blocks.0.ls1.gamma",
    "attn_pool.latent",
    "blocks.0.attn.q_norm.weight",
)


# timm's ViT sizes (`vit_<size>_patch...` in timm/models/vision_transformer.py): (width, heads).
# The head count is not in the tensors; a size whose width differs from the file's is refused.
SIZES = {
    "tiny": (192, 3),
    "small": (384, 6),
    "medium": (512, 8),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
    "giant": (1408, 16),
}


def num_heads(width: int, hint: dict[str, Any] | None, config: dict[str, Any] | None) -> int:
    """The number of attention heads: from `hint` (a zoo architecture), else from a timm
    `config.json` beside the weights: `model_args` (`embed_dim`, `num_heads`) over the sizes of
    the model name (`architecture`), as timm itself builds the model; never guessed from the
    width."""
    if hint and "num_heads" in hint:
        return int(hint["num_heads"])
    name = str((config or {}).get("architecture", ""))
    args = (config or {}).get("model_args") or {}
    size = name.split("_")[1] if name.startswith("vit_") and name.count("_") >= 2 else None
    if size in SIZES or "num_heads" in args:
        size_width, heads = SIZES.get(size or "", (None, None))
        size_width = int(args.get("embed_dim", size_width or width))
        heads = int(args.get("num_heads", heads))
        if size_width != width:
            raise tl.ConversionError(
                f"config.json names {name!r} (width {size_width}) but the weights are "
                f"{width} wide; pass arch=<zoo name> with the right number of heads."
            )
        return heads
    found = f" (config.json names {name!r}, not a timm ViT size)" if name else ""
    raise tl.ConversionError(
        f"The number of attention heads of this timm ViT (width {width}) is not in its tensors"
        f"{found}: pass arch=<zoo name> (`xmodal convert SRC DST --arch vit_b16`), or put timm's "
        "config.json (with `architecture`) beside the weights."
    )


def pooling(sd: tl.StateDict, config: dict[str, Any] | None) -> str:
    """timm's `global_pool` of these weights: from `config.json` (`model_args`, else its top
    level), else `'avg'` when the file has `fc_norm` (timm's default then), else `'token'`."""
    cfg = config or {}
    pool = (cfg.get("model_args") or {}).get("global_pool", cfg.get("global_pool"))
    if pool is None:
        pool = "avg" if sd.has("fc_norm.weight") else "token"
    if pool not in ("token", "avg"):
        raise tl.ConversionError(
            f"{sd.source}: timm ViT with global_pool={pool!r} is not supported ('token' and "
            "'avg' are)."
        )
    return str(pool)


def _preprocess(image_size: int, config: dict[str, Any] | None) -> dict[str, Any]:
    """Input size, mean, std, crop and interpolation: timm's `pretrained_cfg` where given, else
    timm's ImageNet defaults."""
    pre_cfg = (config or {}).get("pretrained_cfg") or {}
    pre: dict[str, Any] = {
        "image_size": image_size,
        "mean": [float(v) for v in pre_cfg.get("mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in pre_cfg.get("std", (0.229, 0.224, 0.225))],
    }
    if "crop_pct" in pre_cfg:
        pre["crop_fraction"] = float(pre_cfg["crop_pct"])
    if pre_cfg.get("interpolation") in ("bicubic", "bilinear"):
        pre["interpolation"] = pre_cfg["interpolation"]
    return pre


def is_timm_vit(keys: set[str]) -> bool:
    return "patch_embed.proj.weight" in keys and "blocks.0.attn.qkv.weight" in keys


def convert_vit(
    sd: tl.StateDict, hint: dict[str, Any] | None, config: dict[str, Any] | None = None
) -> Converted:
    found = [k for k in _UNSUPPORTED if sd.has(k)]
    if found or not sd.has("cls_token"):
        raise tl.ConversionError(
            f"{sd.source}: timm ViT variant with {found or 'no cls token'} is not supported "
            "(cls-token ViTs with a plain final norm are)."
        )
    patch = sd("patch_embed.proj.weight")
    width, _, p_size, _ = patch.shape
    heads = num_heads(width, hint, config)
    pool = pooling(sd, config)
    p = {"params/embedding/kernel": patch.transpose(2, 3, 1, 0)}
    p["params/embedding/bias"] = sd("patch_embed.proj.bias")
    p["params/cls"] = sd("cls_token")
    p["params/pos_embedding"] = sd("pos_embed")
    depth = sd.count("blocks.{}.attn.qkv.weight")
    for i in range(depth):
        s, o = f"blocks.{i}", f"params/encoder/layer_{i}"
        qkv_w, qkv_b = sd(f"{s}.attn.qkv.weight"), sd(f"{s}.attn.qkv.bias")
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            tl.put(p, f"{o}/attn/{name}", tl.heads_in(qkv_w[rows], qkv_b[rows], heads))
        tl.put(
            p,
            f"{o}/attn/out",
            tl.heads_out(sd(f"{s}.attn.proj.weight"), sd(f"{s}.attn.proj.bias"), heads),
        )
        tl.put(p, f"{o}/norm1", tl.layer_norm(sd, f"{s}.norm1"))
        tl.put(p, f"{o}/mlp/fc1", tl.linear(sd, f"{s}.mlp.fc1"))
        tl.put(p, f"{o}/mlp/fc2", tl.linear(sd, f"{s}.mlp.fc2"))
        tl.put(p, f"{o}/norm2", tl.layer_norm(sd, f"{s}.norm2"))
    fc_norm = sd.has("fc_norm.weight")
    if fc_norm and pool != "avg":
        raise tl.ConversionError(
            f"{sd.source}: timm ViT with fc_norm and global_pool={pool!r} is not supported."
        )
    tl.put(p, "params/norm", tl.layer_norm(sd, "fc_norm" if fc_norm else "norm"))
    num_classes = 0
    if sd.has("head.weight"):
        tl.put(p, "params/head", tl.linear(sd, "head"))
        num_classes = int(p["params/head/kernel"].shape[1])
    sd.finish()
    grid = int(np.sqrt(p["params/pos_embedding"].shape[1] - 1))
    overrides = dict(
        num_classes=num_classes,
        patch_size=int(p_size),
        image_size=int(grid * p_size),
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(p["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        pool="cls" if pool == "token" else "gap",
        cls_token=True,
        norm_after_pool=fc_norm,
        act="gelu",
        norm_eps=1e-6,
    )
    pre = _preprocess(overrides["image_size"], config)
    return Converted(closest_arch("vit", overrides, "vit_b16"), overrides, p, {"preprocess": pre})
