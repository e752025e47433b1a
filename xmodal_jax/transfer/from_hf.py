"""Hugging Face `transformers` state dicts (BERT / MiniLM, ViT, ResNet) -> our towers; CLIP is
in `from_hf_clip`.

Key names follow `transformers/models/{bert,vit,resnet}/modeling_*.py`. Sizes come from
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


def act(name: str) -> str:
    """Our name of an HF `hidden_act`."""
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


def attention(sd: tl.StateDict, flat: dict, ours: str, names: tuple[str, ...], heads: int) -> None:
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
        attention(sd, p, ours, qkvo, heads)
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
        act=act(config.get("hidden_act", "gelu")),
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
        attention(sd, p, o, names, heads)
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
        act=act(config.get("hidden_act", "gelu")),
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
