"""SigLIP and LiT two-tower checkpoints -> our ViT (image) and `SigLIPText` (text) towers, with
the learned log-temperature `t` and, for SigLIP, the learned bias `b` of the pair score
`exp(t) * cos(image, text) + b` (a sigmoid of it is SigLIP's match probability).

Formats (`FORMATS`):
- `hf_siglip`: an HF `SiglipModel` folder (`transformers/models/siglip/modeling_siglip.py`):
  `vision_model.` = `embeddings.patch_embedding` (conv with bias), `embeddings.position_embedding`
  `[N, D]` (no class token), `encoder.layers.{i}` named as CLIP's (`layer_norm1`,
  `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc{1,2}`), `post_layernorm`, and the
  attention-pooling `head` (`probe`, a torch `MultiheadAttention` whose `in_proj_weight`
  stacks query, key and value, `layernorm`, `mlp`); `text_model.` =
  `embeddings.{token,position}_embedding`, the encoder, `final_layer_norm`, `head` (linear with
  bias, applied to the last position); `logit_scale` and `logit_bias`, one value each. Heads,
  activation and LayerNorm epsilon come from config.json (keys it omits take transformers'
  SigLIP defaults, as transformers does).
- `hf_siglip_text` / `hf_siglip_vision`: `SiglipTextModel` / `SiglipVisionModel` alone, keys
  bare (transformers 5) or under `text_model.` / `vision_model.`.
- `big_vision_two_towers`: big_vision `models/proj/image_text/two_towers.py` parameters in an
  `.npz` (`/`-joined, optionally under `params/`): `img/` a big_vision ViT (`from_big_vision`;
  its `head`, present in LiT and absent in SigLIP, projects into the joint space, with bias);
  `txt/` big_vision's `text_transformer.py`: `Embed_0/embedding`, `pos_embedding` `[1, L, D]`,
  `Encoder_0/` (blocks as the ViT's, `encoder_norm`), `MAPHead_0` for `pool_type='map'`,
  `head/{kernel, bias}`; `t` (log temperature) and, in SigLIP only, `b`. The file does not record
  `pool_type`: the text tower pools as big_vision's default, `'last'` (every published SigLIP and
  LiT text transformer), or `'map'` when it has a MAP head. A LiT file (no `b`) is a CLIP-style
  pair (softmax over `exp(t) * cos`); a BERT text tower is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from xmodal_jax.transfer import from_big_vision, from_hf, from_hf_clip
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch

FORMATS = ("hf_siglip", "hf_siglip_text", "hf_siglip_vision", "big_vision_two_towers")
Config = dict[str, Any]

# transformers' SiglipTextConfig / SiglipVisionConfig defaults, for keys a config.json omits
# (hub files written by early transformers versions hold only the non-default values).
_DEFAULTS = {"num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
             "pad_token_id": 1, "vision_use_head": True}  # fmt: skip
# SigLIP's preprocessing: the image resized to the model's size, values to [-1, 1]. A square
# image is resized whole (crop_fraction 1); a non-square one is centre-cropped to a square where
# SigLIP squashes it, and `VisionEncoder` resizes bilinearly where HF's processor uses bicubic.
_PRE = {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_fraction": 1.0}
_MARKS = {
    "text": ("text_model.", ("embeddings.token_embedding.weight", "final_layer_norm.weight",
                             "head.weight")),
    "image": ("vision_model.", ("embeddings.patch_embedding.weight", "post_layernorm.weight")),
}  # fmt: skip


def _tower(keys: set[str], kind: str) -> bool:
    prefix, marks = _MARKS[kind]
    return all(m in keys for m in marks) or all(prefix + m in keys for m in marks)


def detect(tensors: Mapping[str, np.ndarray]) -> str | None:
    """The SigLIP / two-tower format of a flat state dict (one of `FORMATS`), or None."""
    keys = set(tensors)
    if "logit_bias" in keys and _tower(keys, "text") and _tower(keys, "image"):
        return "hf_siglip"
    if "logit_scale" not in keys:
        # CLIP's vision tower has a `pre_layrnorm` and a class token; SigLIP's has neither.
        if _tower(keys, "text"):
            return "hf_siglip_text"
        clip_like = any(k.endswith(("pre_layrnorm.weight", "class_embedding")) for k in keys)
        if _tower(keys, "image") and not clip_like:
            return "hf_siglip_vision"
    bare = set(from_big_vision.strip_prefix(tensors))
    if "t" in bare and any(k.startswith("img/") for k in bare):
        if any(k.startswith("txt/") for k in bare):
            return "big_vision_two_towers"
    return None


# --------------------------------------------------------------------------------------------
# Hugging Face


def _get(config: Config, key: str) -> Any:
    return config[key] if key in config else _DEFAULTS[key]


def _hf_text(sd: tl.StateDict, tc: Config) -> Converted:
    heads = int(_get(tc, "num_attention_heads"))
    t = {"params/token_embedding/embedding": sd("text_model.embeddings.token_embedding.weight")}
    t["params/pos_embedding"] = sd("text_model.embeddings.position_embedding.weight")
    # The encoder layers are named as CLIP's.
    depth = from_hf_clip.encoder(sd, t, "text_model.encoder", "params/encoder", heads)
    tl.put(t, "params/norm", tl.layer_norm(sd, "text_model.final_layer_norm"))
    tl.put(t, "params/proj", tl.linear(sd, "text_model.head"))
    vocab, width = t["params/token_embedding/embedding"].shape
    over = dict(
        vocab_size=int(vocab),
        context_length=int(t["params/pos_embedding"].shape[0]),
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(t["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        proj_dim=int(t["params/proj/kernel"].shape[1]),
        act=from_hf.act(_get(tc, "hidden_act")),
        norm_eps=float(_get(tc, "layer_norm_eps")),
        pool="last",
    )
    pad = _get(tc, "pad_token_id")
    meta = {"pad_id": None if pad is None else int(pad)}
    return Converted(closest_arch("siglip_text", over, "siglip_text_b"), over, t, meta)


def _hf_vision(sd: tl.StateDict, vc: Config) -> Converted:
    heads = int(_get(vc, "num_attention_heads"))
    patch = sd("vision_model.embeddings.patch_embedding.weight")
    if patch.ndim != 4:
        raise tl.ConversionError(
            f"{sd.source}: the patch embedding is {patch.ndim}-D, not a convolution: a SigLIP 2 "
            "(NaFlex) vision tower, which is not supported; only SigLIP (1) towers are."
        )
    v = {"params/embedding/kernel": patch.transpose(2, 3, 1, 0)}
    v["params/embedding/bias"] = sd("vision_model.embeddings.patch_embedding.bias")
    v["params/pos_embedding"] = sd("vision_model.embeddings.position_embedding.weight")[None]
    depth = from_hf_clip.encoder(sd, v, "vision_model.encoder", "params/encoder", heads)
    tl.put(v, "params/norm", tl.layer_norm(sd, "vision_model.post_layernorm"))
    pool = "gap"  # without the head, SiglipForImageClassification averages the patch tokens
    if sd.has("vision_model.head.probe"):
        pool = "map"
        h = "vision_model.head"
        v["params/map_head/probe"] = sd(f"{h}.probe")
        w, b = sd(f"{h}.attention.in_proj_weight"), sd(f"{h}.attention.in_proj_bias")
        for i, name in enumerate(("query", "key", "value")):
            chunk = slice(i * w.shape[1], (i + 1) * w.shape[1])
            tl.put(v, f"params/map_head/attn/{name}", tl.heads_in(w[chunk], b[chunk], heads))
        out = tl.heads_out(sd(f"{h}.attention.out_proj.weight"), sd(f"{h}.attention.out_proj.bias"),
                           heads)  # fmt: skip
        tl.put(v, "params/map_head/attn/out", out)
        tl.put(v, "params/map_head/norm", tl.layer_norm(sd, f"{h}.layernorm"))
        tl.put(v, "params/map_head/mlp/fc1", tl.linear(sd, f"{h}.mlp.fc1"))
        tl.put(v, "params/map_head/mlp/fc2", tl.linear(sd, f"{h}.mlp.fc2"))
    elif _get(vc, "vision_use_head"):
        raise tl.ConversionError(
            f"{sd.source}: config.json says vision_use_head but the attention-pooling head "
            "(vision_model.head.*) is missing from the weights."
        )
    width, _, p_size, _ = patch.shape
    grid = int(round(np.sqrt(v["params/pos_embedding"].shape[1])))
    over = dict(
        patch_size=int(p_size),
        image_size=int(grid * p_size),
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(v["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        pool=pool,
        act=from_hf.act(_get(vc, "hidden_act")),
        norm_eps=float(_get(vc, "layer_norm_eps")),
    )
    pre = {"image_size": over["image_size"], **_PRE}
    return Converted(closest_arch("vit", over, "vit_b16"), over, v, {"preprocess": pre})


def _need_config(source: str, config: Config | None, what: str) -> Config:
    if not config or not str(config.get("model_type", "")).startswith("siglip"):
        raise tl.ConversionError(
            f"{source}: converting {what} needs its config.json (model_type 'siglip...', with "
            "the number of attention heads) beside the weights file; the tensors do not say it."
        )
    return config


def convert_hf(
    sd: tl.StateDict, config: Config | None
) -> tuple[Converted, Converted, float, float]:
    """`(image tower, text tower, logit_scale, logit_bias)` of an HF `SiglipModel`."""
    config = _need_config(sd.source, config, "a SigLIP model")
    text = _hf_text(sd, config.get("text_config") or {})
    image = _hf_vision(sd, config.get("vision_config") or {})
    scale, bias = float(sd("logit_scale").reshape(())), float(sd("logit_bias").reshape(()))
    sd.ignore([r"position_ids$"])
    sd.finish()
    return image, text, scale, bias


def hf_tower_names(tensors: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A standalone tower's tensors with its keys under `text_model.` / `vision_model.`."""
    prefix = _MARKS[kind][0]
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    return {prefix + k: v for k, v in tensors.items()}


def convert_hf_tower(sd: tl.StateDict, config: Config | None, kind: str) -> Converted:
    """An HF `SiglipTextModel` (`kind='text'`) or `SiglipVisionModel` (`'image'`) alone; its
    config.json may be the tower's own or a whole SigLIP config."""
    config = _need_config(sd.source, config, f"a SigLIP {kind} tower")
    tower = config.get("text_config" if kind == "text" else "vision_config", config)
    conv = (_hf_text if kind == "text" else _hf_vision)(sd, tower)
    sd.ignore([r"position_ids$"])
    sd.finish()
    return conv


# --------------------------------------------------------------------------------------------
# big_vision two towers (SigLIP, LiT)


def _big_vision_text(tensors: dict[str, np.ndarray], source: str) -> Converted:
    sd = tl.StateDict(tensors, source)
    if not sd.has("Embed_0/embedding"):
        sample = ", ".join(sorted(tensors)[:4])
        raise tl.ConversionError(
            f"{source}: the text tower (txt/{sample}, ...) is not big_vision's text_transformer "
            "(txt/Embed_0, txt/Encoder_0); only that text tower is supported (LiT's BERT "
            "towers are not)."
        )
    t = {"params/token_embedding/embedding": sd("Embed_0/embedding")}
    pos = sd("pos_embedding")
    t["params/pos_embedding"] = pos.reshape(pos.shape[-2:])
    depth = from_big_vision.encoder(sd, "Encoder_0", t)
    pool = "map" if from_big_vision.map_head(sd, t) else "last"
    proj_dim = 0
    if sd.has("head/kernel"):
        t["params/proj/kernel"], t["params/proj/bias"] = sd("head/kernel"), sd("head/bias")
        proj_dim = int(t["params/proj/kernel"].shape[1])
    sd.finish()
    vocab, width = t["params/token_embedding/embedding"].shape
    q = t["params/encoder/layer_0/attn/query/kernel"]
    over = dict(
        vocab_size=int(vocab),
        context_length=int(t["params/pos_embedding"].shape[0]),
        width=int(width),
        depth=depth,
        num_heads=int(q.shape[1]),
        mlp_dim=int(t["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        proj_dim=proj_dim,
        act="gelu_tanh",  # flax nn.gelu
        norm_eps=1e-6,  # flax nn.LayerNorm
        pool=pool,
    )
    return Converted(closest_arch("siglip_text", over, "siglip_text_b"), over, t)


def convert_big_vision(
    tensors: Mapping[str, np.ndarray], source: str
) -> tuple[Converted, Converted, float, float | None]:
    """`(image tower, text tower, log temperature t, bias b or None)` of a big_vision two-tower
    `.npz` (SigLIP has `b`, LiT does not)."""
    bare = from_big_vision.strip_prefix(tensors)
    towers: dict[str, dict[str, np.ndarray]] = {"img": {}, "txt": {}}
    rest = {}
    for key, value in bare.items():
        head, _, tail = key.partition("/")
        if head in towers and tail:
            towers[head][tail] = value
        else:
            rest[key] = value
    extra = sorted(set(rest) - {"t", "b"})
    if extra:
        raise tl.ConversionError(
            f"{source}: {len(extra)} array(s) outside img/, txt/, t and b were not converted: "
            f"{', '.join(extra[:10])}."
        )
    image = from_big_vision.convert_vit(towers["img"], f"{source}:img")
    if image.overrides.pop("num_classes"):  # img/head: the projection into the joint space
        image.variables["params/proj/kernel"] = image.variables.pop("params/head/kernel")
        image.variables["params/proj/bias"] = image.variables.pop("params/head/bias")
        image.overrides["proj_dim"] = int(image.variables["params/proj/kernel"].shape[1])
        image.overrides["proj_bias"] = True
    image.meta["preprocess"] = {**image.meta["preprocess"], "crop_fraction": 1.0}
    text = _big_vision_text(towers["txt"], f"{source}:txt")
    scale = float(np.asarray(rest["t"]).reshape(()))
    bias = float(np.asarray(rest["b"]).reshape(())) if "b" in rest else None
    return image, text, scale, bias


# --------------------------------------------------------------------------------------------
# Tokenizer


def tokenizer_meta(tokenizer_json: str | None, context_length: int, pad_id: int | None) -> Any:
    """The `tokenizer` metadata of a SigLIP text tower.

    SigLIP's vocabulary ships as a SentencePiece model (`spiece.model`, read by transformers'
    slow `SiglipTokenizer` through the `sentencepiece` package), which is not read here. A
    `tokenizer.json` (HF `tokenizers`) beside the weights is carried and applied as it is
    written, then truncated and padded to `context_length` (SigLIP's training input); without
    one, `encode(texts)` raises an error that says what to add, and `encode_ids` still works.
    """
    if tokenizer_json is not None:
        padding = json.loads(tokenizer_json).get("padding") or {}
        pad = padding.get("pad_id", pad_id)
        if pad is not None:
            return {"type": "tokenizer_json", "json": tokenizer_json, "max_len": context_length,
                    "pad_id": int(pad)}  # fmt: skip
        reason = (
            "its tokenizer.json sets no padding and no pad_token_id came with it; add "
            '"padding": {"pad_id": <id of </s>>, ...} to tokenizer.json (SigLIP pads with its '
            "end-of-text token) and convert again"
        )
    else:
        reason = (
            "no tokenizer.json came with it (SigLIP's vocabulary is a SentencePiece model, "
            "spiece.model, which xmodal_jax does not read); put the tokenizer.json of a fast "
            "tokenizer for this vocabulary beside the weights and convert again"
        )
    return {
        "type": "unavailable",
        "reason": (
            f"This SigLIP text tower has no tokenizer: {reason}. Or tokenize yourself, pad to "
            f"{context_length} tokens as SigLIP was trained"
            + (f" (pad id {pad_id})" if pad_id is not None else "")
            + ", and call encode_ids(ids)."
        ),
    }
