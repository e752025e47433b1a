"""Convert foreign weights into our converted-checkpoint format (torch-free).

`convert(src, dst)` reads `src` (a `.pth`/`.bin`/`.safetensors`/`.npz` file, or a directory
holding one), detects its layout from the tensor names, maps it onto one of our towers, checks
every tensor against that tower's shapes, and writes `dst` (see `checkpoint_io`) with the
architecture and preprocessing / tokenizer metadata that `pretrained.load(dst)` needs.

Layouts: torchvision ResNet / MobileNetV2, HF BERT / MiniLM, HF CLIP (both towers, projections
and logit scale), open_clip / OpenAI CLIP (ViT or ModifiedResNet image tower; its
`open_clip_config.json` or an open_clip model name as `arch`), HF ViT, timm ViT, big_vision ViT
`.npz`, HF ResNet, EfficientNet-Lite (`efficientnet_lite_pytorch`), HF SigLIP and big_vision
two-tower (SigLIP / LiT) `.npz` (`from_siglip`: towers, temperature and bias). Files beside
the weights are used when present: `config.json`
(sizes), `vocab.txt` / `tokenizer_config.json` / `sentence_bert_config.json` /
`1_Pooling/config.json` (BERT tokenizer and pooling), `vocab.json` + `merges.txt` (CLIP BPE),
`tokenizer.json` (SigLIP), `preprocessor_config.json`
(image mean / std / size).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.transfer import (
    checkpoint_io,
    from_big_vision,
    from_efficientnet,
    from_hf,
    from_hf_clip,
    from_open_clip,
    from_siglip,
    from_timm,
    from_torchvision,
    open_clip_configs,
    open_clip_tokenizer,
    surgery,
)
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted

FORMATS = (
    "torchvision_resnet",
    "torchvision_mobilenet_v2",
    "efficientnet_lite",
    "hf_bert",
    "hf_clip",
    "hf_clip_text",
    "hf_clip_vision",
    "open_clip",
    "hf_vit",
    "hf_resnet",
    "timm_vit",
    "big_vision_vit",
    *from_siglip.FORMATS,
)


def detect_format(tensors: dict[str, np.ndarray]) -> str:
    """The layout of a flat state dict (one of `FORMATS`), from its tensor names."""
    keys = set(tensors)
    if (siglip := from_siglip.detect(tensors)) is not None:  # before CLIP: same text key names
        return siglip
    if from_open_clip.is_open_clip(keys):
        return "open_clip"
    if from_hf_clip.is_clip(keys):
        return "hf_clip"
    if (tower := from_hf_clip.is_clip_tower(keys)) is not None:
        return "hf_clip_text" if tower == "text" else "hf_clip_vision"
    if from_hf.bert_prefix(keys) is not None:
        return "hf_bert"
    if from_hf.vit_prefix(keys) is not None:
        return "hf_vit"
    if from_hf.resnet_prefix(keys) is not None:
        return "hf_resnet"
    if from_timm.is_timm_vit(keys):
        return "timm_vit"
    if from_big_vision.is_big_vision_vit(set(from_big_vision.strip_prefix(tensors))):
        return "big_vision_vit"
    if from_torchvision.is_mobilenet_v2(keys):
        return "torchvision_mobilenet_v2"
    if from_torchvision.is_resnet(keys):
        return "torchvision_resnet"
    if from_efficientnet.is_efficientnet(keys):
        return "efficientnet_lite"
    sample = ", ".join(sorted(keys)[:8])
    raise UserError(
        f"Unrecognised checkpoint layout (first tensors: {sample}). "
        f"Supported: {', '.join(FORMATS)}."
    )


def _sidecar(src: str, name: str) -> str | None:
    folder = src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None


def _json(src: str, name: str) -> dict[str, Any] | None:
    path = _sidecar(src, name)
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _bert_extras(src: str) -> tuple[str | None, dict[str, Any]]:
    """Pooling mode and tokenizer metadata of a BERT checkpoint from the files beside it."""
    pool = None
    pooling = _json(src, os.path.join("1_Pooling", "config.json"))
    if pooling:  # sentence-transformers model
        pool = "mean" if pooling.get("pooling_mode_mean_tokens") else "cls"
    meta: dict[str, Any] = {}
    vocab = _sidecar(src, "vocab.txt")
    if vocab:
        tok_cfg = _json(src, "tokenizer_config.json") or {}
        st_cfg = _json(src, "sentence_bert_config.json") or {}
        meta["tokenizer"] = {
            "type": "wordpiece",
            "vocab": _read(vocab),
            "lowercase": bool(tok_cfg.get("do_lower_case", True)),
            "max_len": int(st_cfg.get("max_seq_length", tok_cfg.get("model_max_length", 512))),
        }
    modules = _json(src, "modules.json")
    if modules is not None:  # sentence-transformers: L2-normalised iff it has a Normalize module
        meta["normalize"] = any("Normalize" in m.get("type", "") for m in modules)
    return pool, meta


def _clip_tokenizer(src: str) -> dict[str, Any]:
    vocab, merges = _sidecar(src, "vocab.json"), _sidecar(src, "merges.txt")
    if not (vocab and merges):
        return {}
    return {"tokenizer": {"type": "clip_bpe", "vocab": _read(vocab), "merges": _read(merges)}}


def _preprocess(src: str, meta: dict[str, Any]) -> dict[str, Any]:
    cfg = _json(src, "preprocessor_config.json")
    if not cfg or "preprocess" not in meta:
        return meta
    pre = dict(meta["preprocess"])
    pre["mean"] = list(cfg.get("image_mean", pre["mean"]))
    pre["std"] = list(cfg.get("image_std", pre["std"]))
    return {**meta, "preprocess": pre}


def _check(conv: Converted, source: str) -> dict[str, Any]:
    """Nested variables of `conv`, checked leaf by leaf against the tower's own shapes."""
    model = zoo.build(conv.arch, **conv.overrides)
    target = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_input(model)))
    loaded = checkpoint_io.unflatten(conv.variables)
    merged = surgery.merge(target, loaded, resize=None, source=source)
    return jax.tree.map(np.asarray, checkpoint_io.unflatten(checkpoint_io.flatten(merged)))


def _dummy_input(model: Any) -> jax.Array:
    from xmodal_jax.models import bert, clip_text, siglip_text

    if isinstance(model, bert.Bert | clip_text.CLIPText | siglip_text.SigLIPText):
        return jnp.ones((1, 4), jnp.int32)
    size = getattr(model, "image_size", 32)
    return jnp.zeros((1, size, size, 3), jnp.float32)


def _clip_pair(
    image: Converted, text: Converted, scale: float, bias: float | None, fmt: str, name: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Variables and metadata of a two-tower checkpoint: CLIP (and LiT), or SigLIP when it has
    a learned `bias`."""
    variables = {
        "image": _check(image, name),
        "text": _check(text, name),
        "logit_scale": np.asarray(scale, np.float32),
    }
    meta = {
        "arch": "clip" if bias is None else "siglip",
        "source_format": fmt,
        "logit_scale": scale,
        "image": {"arch": image.arch, "overrides": image.overrides, **image.meta},
        "text": {"arch": text.arch, "overrides": text.overrides, **text.meta},
    }
    if bias is not None:
        variables["logit_bias"] = np.asarray(bias, np.float32)
        meta["logit_bias"] = bias
    return variables, meta


def _siglip(
    src: str, fmt: str, tensors: dict, config: Any, name: str, arch: str | None
) -> tuple[dict, dict]:
    """`(variables, metadata)` of a SigLIP / LiT checkpoint: one tower, or both with the
    temperature and (SigLIP) the bias; a pair without a bias (LiT) is scored as CLIP is."""
    if fmt in ("hf_siglip_text", "hf_siglip_vision"):
        kind = "text" if fmt == "hf_siglip_text" else "image"
        tensors = from_siglip.hf_tower_names(tensors, kind)
        towers = {kind: from_siglip.convert_hf_tower(tl.StateDict(tensors, name), config, kind)}
        pair = None
    elif fmt == "hf_siglip":
        image, text, scale, bias = from_siglip.convert_hf(tl.StateDict(tensors, name), config)
        towers, pair = {"image": image, "text": text}, (scale, bias)
    else:
        image, text, scale, bias = from_siglip.convert_big_vision(tensors, name)
        towers, pair = {"image": image, "text": text}, (scale, bias)
    if "text" in towers:
        text = towers["text"]
        tok_json = _sidecar(src, "tokenizer.json")
        pad_id = text.meta.pop("pad_id", None)
        text.meta["tokenizer"] = from_siglip.tokenizer_meta(
            _read(tok_json) if tok_json else None, text.overrides["context_length"], pad_id
        )
    if "image" in towers:
        towers["image"].meta = _preprocess(src, towers["image"].meta)
    if pair is None:
        (conv,) = towers.values()
        conv.arch = zoo.canonical(arch) if arch else conv.arch
        meta = {"arch": conv.arch, "overrides": conv.overrides, "source_format": fmt, **conv.meta}
        return _check(conv, name), meta
    return _clip_pair(towers["image"], towers["text"], *pair, fmt, name)


def load_foreign(src: str, arch: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(variables, metadata)` of foreign weights `src`, validated against our tower.

    `arch` (a zoo name; for open_clip weights an open_clip model name such as `ViT-B-32`)
    supplies what the file cannot tell, such as the number of heads of a BERT without
    config.json. For CLIP (and LiT) the variables are `{'image': ..., 'text': ...}` and the
    metadata has one entry per tower plus `logit_scale`; SigLIP adds `logit_bias`.
    """
    src = os.fspath(src)
    tensors = checkpoint_io.read_state_dict(open_clip_configs.hub_weights(src) or src)
    fmt = detect_format(tensors)
    config = _json(src, "config.json")
    name = os.path.basename(src.rstrip("/"))

    if fmt == "open_clip":
        model_cfg, pre_cfg, where = open_clip_configs.read_config(src, arch)
        sd = tl.StateDict(tensors, name)
        image, text, scale = from_open_clip.convert_clip(sd, model_cfg, pre_cfg, where)
        vocab = text.overrides["vocab_size"]
        text.meta.update(
            open_clip_tokenizer.tokenizer_meta(src, model_cfg.get("text_cfg") or {}, vocab)
        )
        return _clip_pair(image, text, scale, None, fmt, name)
    hint = zoo.spec(arch)[1] if arch else None
    if fmt == "hf_clip":
        image, text, scale = from_hf_clip.convert_clip(tl.StateDict(tensors, name), config)
        text.meta.update(_clip_tokenizer(src))
        image.meta = _preprocess(src, image.meta)
        return _clip_pair(image, text, scale, None, fmt, name)

    if fmt in from_siglip.FORMATS:
        return _siglip(src, fmt, tensors, config, name, arch)
    if fmt == "hf_bert":
        pool, extra = _bert_extras(src)
        sd = tl.StateDict(tensors, name, from_hf.bert_prefix(set(tensors)) or "")
        conv = from_hf.convert_bert(sd, config, hint, pool)
        conv.meta.update(extra)
    elif fmt in ("hf_clip_text", "hf_clip_vision"):
        kind = "text" if fmt == "hf_clip_text" else "image"
        tensors = from_hf_clip.clip_tower_names(tensors, kind)
        conv = from_hf_clip.convert_clip_tower(tl.StateDict(tensors, name), config, kind)
        if kind == "text":
            conv.meta.update(_clip_tokenizer(src))
    elif fmt == "hf_vit":
        tensors = from_hf.vit_hub_names(tensors)
        sd = tl.StateDict(tensors, name, from_hf.vit_prefix(set(tensors)) or "")
        vit_cfg = {**(config or {}), **(_json(src, "preprocessor_config.json") or {})}
        conv = from_hf.convert_vit(sd, vit_cfg, hint)
    elif fmt == "hf_resnet":
        sd = tl.StateDict(tensors, name, from_hf.resnet_prefix(set(tensors)) or "")
        conv = from_hf.convert_resnet(sd, config)
    elif fmt == "timm_vit":
        conv = from_timm.convert_vit(tl.StateDict(tensors, name), hint, config)
    elif fmt == "big_vision_vit":
        conv = from_big_vision.convert_vit(tensors, name)
    elif fmt == "torchvision_resnet":
        conv = from_torchvision.convert_resnet(tl.StateDict(tensors, name))
    elif fmt == "efficientnet_lite":
        conv = from_efficientnet.convert_efficientnet_lite(tl.StateDict(tensors, name))
    else:
        conv = from_torchvision.convert_mobilenet_v2(tl.StateDict(tensors, name))
    conv.meta = _preprocess(src, conv.meta)
    if arch:
        conv.arch = zoo.canonical(arch)
    variables = _check(conv, name)
    meta = {"arch": conv.arch, "overrides": conv.overrides, "source_format": fmt, **conv.meta}
    return variables, meta


def convert(src: str, dst: str, arch: str | None = None) -> None:
    """Convert foreign weights `src` into a checkpoint `dst` (`.safetensors`) that
    `xmodal_jax.pretrained.load(dst)` reads back. `arch` is an optional zoo name (an open_clip
    model name for open_clip weights)."""
    if not os.fspath(dst).endswith(".safetensors"):
        raise UserError(f"Destination {dst!r} must end in .safetensors (the converted format).")
    variables, meta = load_foreign(src, arch)
    meta["converted_from"] = os.path.basename(os.fspath(src).rstrip("/"))
    checkpoint_io.save(dst, variables, meta)
