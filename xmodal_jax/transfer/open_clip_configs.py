"""Where an open_clip checkpoint's model config comes from: the `open_clip_config.json` of a hub
folder (`model_cfg`, `preprocess_cfg`), else an open_clip model name (`--arch ViT-B-32`): one of
`MODEL_CONFIGS` or a `model_configs/NAME.json` file of an installed open_clip package (read as
a file, the package is not imported).
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from xmodal_jax.transfer import torch_layout as tl

Config = dict[str, Any]

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
BPE_VOCAB_SIZE = 49408  # 256 bytes, 256 bytes ending a word, 48,894 merges, 2 special tokens

# Model configs of the common open_clip names (open_clip `model_configs/*.json`; Radford et al.
# 2021, Tables 19-20). `NAME-quickgelu` is NAME with quick-GELU (OpenAI-trained weights).
_RN = lambda layers, width, size: dict(image_size=size, layers=list(layers), width=width)
_VIT = lambda width, layers, patch, size=224, **kw: dict(
    image_size=size, layers=layers, width=width, patch_size=patch, **kw
)
_TEXT = lambda width, heads, layers=12: dict(
    context_length=77, vocab_size=BPE_VOCAB_SIZE, width=width, heads=heads, layers=layers
)
MODEL_CONFIGS: dict[str, Config] = {
    "RN50": dict(embed_dim=1024, vision_cfg=_RN((3, 4, 6, 3), 64, 224), text_cfg=_TEXT(512, 8)),
    "RN101": dict(embed_dim=512, vision_cfg=_RN((3, 4, 23, 3), 64, 224), text_cfg=_TEXT(512, 8)),
    "RN50x4": dict(embed_dim=640, vision_cfg=_RN((4, 6, 10, 6), 80, 288), text_cfg=_TEXT(640, 10)),
    "RN50x16": dict(embed_dim=768, vision_cfg=_RN((6, 8, 18, 8), 96, 384), text_cfg=_TEXT(768, 12)),
    "RN50x64": dict(
        embed_dim=1024, vision_cfg=_RN((3, 15, 36, 10), 128, 448), text_cfg=_TEXT(1024, 16)
    ),
    "ViT-B-32": dict(embed_dim=512, vision_cfg=_VIT(768, 12, 32), text_cfg=_TEXT(512, 8)),
    "ViT-B-16": dict(embed_dim=512, vision_cfg=_VIT(768, 12, 16), text_cfg=_TEXT(512, 8)),
    "ViT-B-16-plus-240": dict(
        embed_dim=640, vision_cfg=_VIT(896, 12, 16, 240), text_cfg=_TEXT(640, 10)
    ),
    "ViT-L-14": dict(embed_dim=768, vision_cfg=_VIT(1024, 24, 14), text_cfg=_TEXT(768, 12)),
    "ViT-L-14-336": dict(
        embed_dim=768, vision_cfg=_VIT(1024, 24, 14, 336), text_cfg=_TEXT(768, 12)
    ),
    "ViT-H-14": dict(
        embed_dim=1024,
        vision_cfg=_VIT(1280, 32, 14, head_width=80),
        text_cfg=_TEXT(1024, 16, 24),
    ),
    "ViT-g-14": dict(
        embed_dim=1024,
        vision_cfg=_VIT(1408, 40, 14, head_width=88, mlp_ratio=4.3637),
        text_cfg=_TEXT(1024, 16, 24),
    ),
    "ViT-bigG-14": dict(
        embed_dim=1280,
        vision_cfg=_VIT(1664, 48, 14, head_width=104, mlp_ratio=4.9231),
        text_cfg=_TEXT(1280, 20, 32),
    ),
}


def folder(src: str) -> str:
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def beside(src: str, name: str) -> str | None:
    path = os.path.join(folder(src), name)
    return path if os.path.isfile(path) else None


def hub_weights(src: str) -> str | None:
    """The open_clip weights file of a hub folder (`open_clip_config.json` beside
    `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), None for anything else.
    Hub folders often also hold the Hugging Face `transformers` form of the same model."""
    if not (os.path.isdir(src) and beside(src, HUB_CONFIG)):
        return None
    return next((p for p in (beside(src, n) for n in HUB_WEIGHTS) if p), None)


def package_file(*parts: str) -> str | None:
    """A file of the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, *parts)
        if os.path.isfile(path):
            return path
    return None


def named_config(arch: str) -> Config | None:
    name, quick = arch.strip(), False
    if name.lower().endswith("-quickgelu"):
        name, quick = name[: -len("-quickgelu")], True
    found = {k.lower(): v for k, v in MODEL_CONFIGS.items()}.get(name.lower())
    if found is None:
        for candidate in (arch.strip(), name):
            path = package_file("model_configs", f"{candidate}.json")
            if path:
                with open(path) as f:
                    found = json.load(f)
                break
    if found is None:
        return None
    return {**found, "quick_gelu": bool(found.get("quick_gelu")) or quick}


def read_config(src: str, arch: str | None) -> tuple[Config, Config, str]:
    """`(model_cfg, preprocess_cfg, where)`: from `open_clip_config.json` beside the weights,
    else from the open_clip model name `arch`; `where` names the source for error messages."""
    path = beside(src, HUB_CONFIG)
    if path:
        with open(path) as f:
            cfg = json.load(f)
        if "model_cfg" not in cfg:
            raise tl.ConversionError(
                f"{path} has no 'model_cfg'; an open_clip_config.json holds model_cfg and "
                "preprocess_cfg (as open_clip's hub repositories do)."
            )
        return cfg["model_cfg"], cfg.get("preprocess_cfg") or {}, path
    if arch:
        cfg = named_config(arch)
        if cfg is None:
            raise tl.ConversionError(
                f"Unknown open_clip model name {arch!r}: known here are "
                f"{', '.join(MODEL_CONFIGS)} (each also as NAME-quickgelu); other names need "
                "the open_clip package installed (its model_configs/NAME.json is read) or the "
                "model's open_clip_config.json beside the weights."
            )
        return cfg, {}, f"open_clip model {arch!r}"
    raise tl.ConversionError(
        f"{src}: an open_clip checkpoint does not say its number of attention heads or its "
        "activation. Fix: put its open_clip_config.json beside the weights, or pass the open_clip "
        "model name (--arch ViT-B-32, RN50, ...; NAME-quickgelu for OpenAI-trained weights)."
    )
