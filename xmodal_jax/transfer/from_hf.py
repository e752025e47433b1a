"""Hugging Face `transformers` state dicts (BERT / MiniLM, CLIP, ViT, ResNet) -> our towers.

Key names follow `transformers/models/{bert,clip,vit,resnet}/modeling_*.py`. Sizes come from
the model's `config.json` when it sits beside the weights (`config` here), else from tensor
shapes plus the `hint` of a named architecture (the number of heads is not in the shapes).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from xmodal_jax.models import resnet
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch
from xmodal_jax.transfer.from_torchvision import IMAGENET

Config = dict[str, Any]
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "quick_gelu": "quick_gelu", "relu": "relu"}  # fmt: skip


def _act(name: str) -> str:
    if name not in _ACTS:
        raise tl.ConversionError(
            f"Activation {name!r} of the checkpoint is not supported ({sorted(_ACTS)})."
        )
    return _ACTS[name]


def _heads(config: Config | None, hint: Config | None, key: str, what: str, example: str) -> int:
    """The number of attention heads, from config.json or the named architecture; the tensors do
    not say it, and a width-based guess would convert without error into a different model."""
    if config and key in config:
        return int(config[key])
    if hint and "num_heads" in hint:
        return int(hint["num_heads"])
    raise tl.ConversionError(
        f"The number of attention heads of this {what} checkpoint is not in its tensors: put its "
        f"config.json beside the weights file, or pass arch=<zoo name> (e.g. {example!r})."
    )


def _attention(sd: tl.StateDict, flat: dict, ours: str, names: tuple[str, ...], heads: int) -> None:
    """HF q/k/v/out `Linear`s (`names`) -> our `attn/{query,key,value,out}`."""
    for theirs, mine in zip(names[:3], ("query", "key", "value"), strict=True):
        leaves = tl.heads_in(sd(f"{theirs}.weight"), sd(f"{theirs}.bias"), heads)
        tl.put(flat, f"{ours}/attn/{mine}", leaves)
    tl.put(
        flat,
        f"{ours}/attn/out",
        tl.heads_out(sd(f"{names[3]}.weight"), sd(f"{names[3]}.bias"), heads),
    )


# --------------------------------------------------------------------------------------------
# BERT / MiniLM


def bert_prefix(keys: set[str]) -> str | None:
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in keys and any(
            k.startswith(f"{prefix}encoder.layer.") for k in keys
        ):
            return prefix
    return None


def convert_bert(
    sd: tl.StateDict, config: Config | None, hint: Config | None, pool: str | None
) -> Converted:
    heads = _heads(config, hint, "num_attention_heads", "BERT", "minilm_l6")
    word = sd("embeddings.word_embeddings.weight")
    pos = sd("embeddings.position_embeddings.weight")
    types = sd("embeddings.token_type_embeddings.weight")
    p = {
        "params/word_embeddings/embedding": word,
        "params/position_embeddings/embedding": pos,
        "params/token_type_embeddings/embedding": types,
    }
    tl.put(p, "params/embed_norm", tl.layer_norm(sd, "embeddings.LayerNorm"))
    depth = sd.count("encoder.layer.{}.attention.self.query.weight")
    for i in range(depth):
        src, ours = f"encoder.layer.{i}", f"params/encoder/layer_{i}"
        a = f"{src}.attention"
        qkvo = (f"{a}.self.query", f"{a}.self.key", f"{a}.self.value", f"{a}.output.dense")
        _attention(sd, p, ours, qkvo, heads)
        tl.put(p, f"{ours}/norm1", tl.layer_norm(sd, f"{a}.output.LayerNorm"))
        tl.put(p, f"{ours}/mlp/fc1", tl.linear(sd, f"{src}.intermediate.dense"))
        tl.put(p, f"{ours}/mlp/fc2", tl.linear(sd, f"{src}.output.dense"))
        tl.put(p, f"{ours}/norm2", tl.layer_norm(sd, f"{src}.output.LayerNorm"))
    has_pooler = sd.has("pooler.dense.weight")
    pool = pool or ("pooler" if has_pooler else "cls")
    if pool == "pooler":
        tl.put(p, "params/pooler", tl.linear(sd, "pooler.dense"))
    # Buffers, an unused pooler, and pre-training heads (masked LM, next sentence).
    sd.ignore([r"position_ids$", r"^(bert\.)?pooler\.", r"^cls\."])
    sd.finish()
    config = config or {}
    overrides = dict(
        vocab_size=int(word.shape[0]),
        max_len=int(pos.shape[0]),
        type_vocab_size=int(types.shape[0]),
        width=int(word.shape[1]),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(p["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        act=_act(config.get("hidden_act", "gelu")),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        pool=pool,
        pad_id=int(config.get("pad_token_id", 0) or 0),
    )
    return Converted(
        closest_arch("minilm", overrides, closest_arch("bert", overrides, "bert_base")),
        overrides,
        p,
    )


# --------------------------------------------------------------------------------------------
# CLIP (both towers, projections, logit scale)


def is_clip(keys: set[str]) -> bool:
    return "text_model.embeddings.token_embedding.weight" in keys and "logit_scale" in keys


def _clip_encoder(sd: tl.StateDict, flat: dict, src: str, ours: str, heads: int) -> int:
    depth = sd.count(f"{src}.layers.{{}}.self_attn.q_proj.weight")
    for i in range(depth):
        s, o = f"{src}.layers.{i}", f"{ours}/layer_{i}"
        a = f"{s}.self_attn"
        _attention(
            sd, flat, o, (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj", f"{a}.out_proj"), heads
        )
        tl.put(flat, f"{o}/norm1", tl.layer_norm(sd, f"{s}.layer_norm1"))
        tl.put(flat, f"{o}/mlp/fc1", tl.linear(sd, f"{s}.mlp.fc1"))
        tl.put(flat, f"{o}/mlp/fc2", tl.linear(sd, f"{s}.mlp.fc2"))
        tl.put(flat, f"{o}/norm2", tl.layer_norm(sd, f"{s}.layer_norm2"))
    return depth


# A standalone tower's own keys: under `text_model.` / `vision_model.` (hub files, and any
# `...WithProjection`), or bare (`CLIPTextModel` / `CLIPVisionModel` saved by transformers 5).
_CLIP_TOWERS = {
    "text": ("text_model.", ("embeddings.token_embedding.weight", "final_layer_norm.weight")),
    "image": ("vision_model.", ("embeddings.patch_embedding.weight", "pre_layrnorm.weight")),
}


def is_clip_tower(keys: set[str]) -> str | None:
    """`'text'` or `'image'` for a standalone HF `CLIPTextModel` / `CLIPVisionModel` (with or
    without their projection), None otherwise."""
    if "logit_scale" in keys:
        return None
    found = [
        kind
        for kind, (prefix, marks) in _CLIP_TOWERS.items()
        if all(m in keys for m in marks) or all(prefix + m in keys for m in marks)
    ]
    return found[0] if len(found) == 1 else None


def clip_tower_names(tensors: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """A standalone tower's tensors with its keys under `text_model.` / `vision_model.`."""
    prefix = _CLIP_TOWERS[kind][0]
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    projection = ("text_projection.", "visual_projection.")
    return {k if k.startswith(projection) else prefix + k: v for k, v in tensors.items()}


_CLIP_PRE = {"mean": [0.48145466, 0.4578275, 0.40821073],
             "std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip


def _clip_text(sd: tl.StateDict, tc: Config) -> Converted:
    """The text tower (and `text_projection`, if the checkpoint has one)."""
    heads = int(tc["num_attention_heads"])
    t = {"params/token_embedding/embedding": sd("text_model.embeddings.token_embedding.weight")}
    t["params/pos_embedding"] = sd("text_model.embeddings.position_embedding.weight")
    depth = _clip_encoder(sd, t, "text_model.encoder", "params/encoder", heads)
    tl.put(t, "params/norm", tl.layer_norm(sd, "text_model.final_layer_norm"))
    if sd.has("text_projection.weight"):
        t["params/proj/kernel"] = sd("text_projection.weight").T
    vocab, width = t["params/token_embedding/embedding"].shape
    eos = int(tc.get("eos_token_id", 2))
    over = dict(
        vocab_size=int(vocab),
        context_length=int(t["params/pos_embedding"].shape[0]),
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(t["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        proj_dim=int(t["params/proj/kernel"].shape[1]) if "params/proj/kernel" in t else 0,
        act=_act(tc.get("hidden_act", "quick_gelu")),
        norm_eps=float(tc.get("layer_norm_eps", 1e-5)),
        # transformers treats eos_token_id == 2 (old configs) as "take the highest id".
        eos_id=None if eos == 2 else eos,
        pad_id=None,  # HF CLIP attends to every position unless given an attention mask
    )
    return Converted(closest_arch("clip_text", over, "clip_text_b"), over, t)


def _clip_vision(sd: tl.StateDict, vc: Config) -> Converted:
    """The image tower (and `visual_projection`, if the checkpoint has one)."""
    heads = int(vc["num_attention_heads"])
    v = {}
    patch = sd("vision_model.embeddings.patch_embedding.weight")
    v["params/embedding/kernel"] = patch.transpose(2, 3, 1, 0)
    v["params/cls"] = sd("vision_model.embeddings.class_embedding").reshape(1, 1, -1)
    v["params/pos_embedding"] = sd("vision_model.embeddings.position_embedding.weight")[None]
    tl.put(v, "params/norm_pre", tl.layer_norm(sd, "vision_model.pre_layrnorm"))
    depth = _clip_encoder(sd, v, "vision_model.encoder", "params/encoder", heads)
    tl.put(v, "params/norm", tl.layer_norm(sd, "vision_model.post_layernorm"))
    if sd.has("visual_projection.weight"):
        v["params/proj/kernel"] = sd("visual_projection.weight").T
    width, _, p_size, _ = patch.shape
    grid = int(np.sqrt(v["params/pos_embedding"].shape[1] - 1))
    over = dict(
        patch_size=int(p_size),
        image_size=int(grid * p_size),
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(v["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        pool="cls",
        act=_act(vc.get("hidden_act", "quick_gelu")),
        norm_eps=float(vc.get("layer_norm_eps", 1e-5)),
        pre_norm=True,
        patch_bias=False,
        proj_dim=int(v["params/proj/kernel"].shape[1]) if "params/proj/kernel" in v else 0,
    )
    pre = {"image_size": over["image_size"], **_CLIP_PRE}
    return Converted(closest_arch("vit", over, "vit_b16"), over, v, {"preprocess": pre})


def convert_clip(sd: tl.StateDict, config: Config | None) -> tuple[Converted, Converted, float]:
    """`(image tower, text tower, logit_scale)` of an HF `CLIPModel`; needs its config.json."""
    if not config or "text_config" not in config or "vision_config" not in config:
        raise tl.ConversionError(
            f"{sd.source}: converting CLIP needs its config.json (with text_config and "
            "vision_config) beside the weights file."
        )
    text = _clip_text(sd, config["text_config"])
    image = _clip_vision(sd, config["vision_config"])
    logit_scale = float(sd("logit_scale"))
    sd.ignore([r"position_ids$"])
    sd.finish()
    return image, text, logit_scale


def convert_clip_tower(sd: tl.StateDict, config: Config | None, kind: str) -> Converted:
    """One tower of CLIP alone: an HF `CLIPTextModel` (`kind='text'`) or `CLIPVisionModel`
    (`'image'`), `...WithProjection` included; the heads come from its config.json (its own,
    or a whole CLIP config's `text_config` / `vision_config`)."""
    config = config or {}
    tower_config = config.get("text_config" if kind == "text" else "vision_config", config)
    if "num_attention_heads" not in tower_config:
        raise tl.ConversionError(
            f"{sd.source}: converting a CLIP {kind} tower needs its config.json (with "
            "num_attention_heads) beside the weights file."
        )
    conv = (_clip_text if kind == "text" else _clip_vision)(sd, tower_config)
    sd.ignore([r"position_ids$"])
    sd.finish()
    return conv


# --------------------------------------------------------------------------------------------
# ViT


# transformers >= 5 names ViT modules differently in memory (`model.state_dict()`); files
# written by `save_pretrained` keep the hub names above. Rewrite the former into the latter.
_VIT_V5 = (
    (r"(^|\.)layers\.(\d+)\.attention\.q_proj\.", r"\1encoder.layer.\2.attention.attention.query."),
    (r"(^|\.)layers\.(\d+)\.attention\.k_proj\.", r"\1encoder.layer.\2.attention.attention.key."),
    (r"(^|\.)layers\.(\d+)\.attention\.v_proj\.", r"\1encoder.layer.\2.attention.attention.value."),
    (r"(^|\.)layers\.(\d+)\.attention\.o_proj\.", r"\1encoder.layer.\2.attention.output.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc1\.", r"\1encoder.layer.\2.intermediate.dense."),
    (r"(^|\.)layers\.(\d+)\.mlp\.fc2\.", r"\1encoder.layer.\2.output.dense."),
    (r"(^|\.)layers\.(\d+)\.layernorm_", r"\1encoder.layer.\2.layernorm_"),
)


def vit_hub_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ViT tensors under the hub's names, whichever transformers version saved them."""
    out = {}
    for key, value in tensors.items():
        for pattern, repl in _VIT_V5:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def vit_prefix(keys: set[str]) -> str | None:
    for prefix in ("", "vit."):
        if f"{prefix}embeddings.patch_embeddings.projection.weight" in keys:
            return prefix
    return None


def convert_vit(sd: tl.StateDict, config: Config | None, hint: Config | None) -> Converted:
    config = config or {}
    patch = sd("embeddings.patch_embeddings.projection.weight")
    width, _, p_size, _ = patch.shape
    heads = _heads(config, hint, "num_attention_heads", "ViT", "vit_b16")
    p = {"params/embedding/kernel": patch.transpose(2, 3, 1, 0)}
    p["params/embedding/bias"] = sd("embeddings.patch_embeddings.projection.bias")
    p["params/cls"] = sd("embeddings.cls_token")
    p["params/pos_embedding"] = sd("embeddings.position_embeddings")
    depth = sd.count("encoder.layer.{}.attention.attention.query.weight")
    for i in range(depth):
        s, o = f"encoder.layer.{i}", f"params/encoder/layer_{i}"
        a = f"{s}.attention"
        names = (
            f"{a}.attention.query",
            f"{a}.attention.key",
            f"{a}.attention.value",
            f"{a}.output.dense",
        )
        _attention(sd, p, o, names, heads)
        tl.put(p, f"{o}/norm1", tl.layer_norm(sd, f"{s}.layernorm_before"))
        tl.put(p, f"{o}/mlp/fc1", tl.linear(sd, f"{s}.intermediate.dense"))
        tl.put(p, f"{o}/mlp/fc2", tl.linear(sd, f"{s}.output.dense"))
        tl.put(p, f"{o}/norm2", tl.layer_norm(sd, f"{s}.layernorm_after"))
    tl.put(p, "params/norm", tl.layer_norm(sd, "layernorm"))
    num_classes = 0
    top = sd.with_prefix("")  # task heads sit beside the `vit.` backbone
    if top.has("classifier.weight"):
        tl.put(p, "params/head", tl.linear(top, "classifier"))
        num_classes = int(p["params/head/kernel"].shape[1])
    # The tanh pooler of ViTModel is not part of the ViT tower (it pools by the cls token).
    sd.ignore([r"position_ids$", r"^(vit\.)?pooler\."])
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
        pool="cls",
        act=_act(config.get("hidden_act", "gelu")),
        norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    )
    pre = {"image_size": overrides["image_size"], "mean": config.get("image_mean", [0.5] * 3),
           "std": config.get("image_std", [0.5] * 3)}  # fmt: skip
    meta: dict[str, Any] = {"preprocess": pre}
    labels = config.get("id2label") or {}
    if num_classes and len(labels) == num_classes:
        meta["class_names"] = [
            labels[str(i)] if str(i) in labels else labels[i] for i in range(num_classes)
        ]
    return Converted(closest_arch("vit", overrides, "vit_b16"), overrides, p, meta)


# --------------------------------------------------------------------------------------------
# ResNet (transformers ResNetModel / ResNetForImageClassification)


def resnet_prefix(keys: set[str]) -> str | None:
    for prefix in ("", "resnet."):
        if f"{prefix}embedder.embedder.convolution.weight" in keys:
            return prefix
    return None


def convert_resnet(sd: tl.StateDict, config: Config | None) -> Converted:
    config = config or {}
    if config.get("downsample_in_bottleneck") or config.get("downsample_in_first_stage"):
        raise tl.ConversionError(
            f"{sd.source}: this ResNet strides in the 1x1 conv or in the first stage (ResNet v1 "
            "variants); only ResNet v1.5 is supported."
        )
    p, s = {}, {}

    def conv_bn(src: str, ours: str) -> None:
        tl.put(p, f"params/{ours}_conv", tl.conv(sd, f"{src}.convolution"))
        bn_p, bn_s = tl.batch_norm(sd, f"{src}.normalization")
        tl.put(p, f"params/{ours}_norm", bn_p)
        tl.put(s, f"batch_stats/{ours}_norm", bn_s)

    conv_bn("embedder.embedder", "stem")
    stages = sd.count("encoder.stages.{}.layers.0.layer.0.convolution.weight")
    sizes = tuple(
        sd.count(f"encoder.stages.{i}.layers.{{}}.layer.0.convolution.weight")
        for i in range(stages)
    )
    n = sd.count("encoder.stages.0.layers.0.layer.{}.convolution.weight")
    block = {2: "basic", 3: "bottleneck"}[n]
    for i, count in enumerate(sizes):
        for j in range(count):
            src, ours = f"encoder.stages.{i}.layers.{j}", f"stage{i + 1}_block{j + 1}"
            for k in range(n):
                tl.put(p, f"params/{ours}_conv{k + 1}", tl.conv(sd, f"{src}.layer.{k}.convolution"))
                bn_p, bn_s = tl.batch_norm(sd, f"{src}.layer.{k}.normalization")
                tl.put(p, f"params/{ours}_norm{k + 1}", bn_p)
                tl.put(s, f"batch_stats/{ours}_norm{k + 1}", bn_s)
            if sd.has(f"{src}.shortcut.convolution.weight"):
                conv_bn(f"{src}.shortcut", f"{ours}_proj")
    base = int(p["params/stem_conv/kernel"].shape[-1])
    first_mid = int(p["params/stage1_block1_conv1/kernel"].shape[-1])
    if first_mid != base:
        raise tl.ConversionError(
            f"{sd.source}: stem width {base} differs from the first stage width {first_mid}; "
            "our ResNet ties them (embedding_size == hidden_sizes[0] / expansion)."
        )
    overrides = dict(width=base / 64, num_classes=0)
    depth = next((d for d, (b, st) in resnet.STAGES.items() if (b, st) == (block, sizes)), None)
    if depth is None:
        overrides.update(stage_sizes=sizes, block=block, depth=50)
    else:
        overrides["depth"] = depth
    top = sd.with_prefix("")  # the classifier sits beside the `resnet.` backbone
    if top.has("classifier.1.weight"):
        tl.put(p, "params/head", tl.linear(top, "classifier.1"))
        overrides["num_classes"] = int(p["params/head/kernel"].shape[1])
    sd.finish()
    return Converted(
        closest_arch("resnet", overrides, "resnet50"),
        overrides,
        {**p, **s},
        {"preprocess": IMAGENET},
    )
