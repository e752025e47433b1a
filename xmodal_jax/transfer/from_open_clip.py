"""open_clip CLIP checkpoints (and OpenAI CLIP's, which have the same layout) -> our towers.

The image tower is a ViT (`visual.conv1` a patch convolution, `visual.class_embedding`,
`visual.transformer.resblocks.*`) or a ModifiedResNet (`visual.layer1..4`, `visual.attnpool`);
the text tower is CLIP's causal transformer (`token_embedding`, `transformer.resblocks.*`,
`ln_final`, `text_projection`; under `text.` for open_clip's `CustomTextCLIP`). Tensor names
follow open_clip's `model.py`, `transformer.py` and `modified_resnet.py`.

What the tensors do not say (attention heads, GELU or quick-GELU, pooling, LayerNorm eps,
preprocessing) comes from open_clip's model config: the `open_clip_config.json` of a hub
folder (`model_cfg` and `preprocess_cfg`), or the open_clip model name given as `arch`
(`ViT-B-32`, `RN50`, `ViT-L-14-quickgelu`: a name known here, or any config of an installed
open_clip package, read as a file). Keys the config omits take open_clip's own defaults
(`CLIPVisionCfg`, `CLIPTextCfg`, `PreprocessCfg`). Without a config the conversion stops: the
number of heads is not in the tensors, and a guess would convert into a different model
(`open_clip_configs` finds the config, `open_clip_tokenizer` the vocabulary).

The tokenizer: open_clip's CLIP BPE (49,408 tokens) is written into the converted checkpoint,
read from, in order, `vocab.json` + `merges.txt` beside the weights (hub folders hold them),
a `tokenizer.json` there, or the `bpe_simple_vocab_16e6.txt.gz` that the open_clip package
ships (located with `importlib.util.find_spec`; the package is not imported). When none is
found, or the model uses a Hugging Face tokenizer (`hf_tokenizer_name`), the checkpoint is
written without one and its metadata says how to supply token ids (`no_tokenizer_fix`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xmodal_jax.transfer import open_clip_configs as configs
from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch
from xmodal_jax.transfer.from_hf_clip import OPENAI_MEAN, OPENAI_STD
from xmodal_jax.transfer.open_clip_configs import Config

# Options of open_clip towers that these towers do not have (unset, False or 'default' is fine).
_CUSTOM_BLOCK = ("ls_init_value", "act_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
                 "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")  # fmt: skip
_UNSUPPORTED_VISION = ("timm_model_name", "attentional_pool", *_CUSTOM_BLOCK)
_UNSUPPORTED_TEXT = ("hf_model_name", "embed_cls", "no_causal_mask", "proj_bias", *_CUSTOM_BLOCK)


def is_open_clip(keys: set[str]) -> bool:
    """An open_clip / OpenAI CLIP state dict: `visual.*`, a CLIP text tower, `logit_scale`."""
    text = "token_embedding.weight" in keys or "text.token_embedding.weight" in keys
    return "visual.conv1.weight" in keys and "logit_scale" in keys and text


# --------------------------------------------------------------------------------------------
# Towers


def _check_options(cfg: Config, unsupported: tuple[str, ...], tower: str, where: str) -> None:
    for key in unsupported:
        if cfg.get(key) not in (None, False, "default", {}):
            raise tl.ConversionError(
                f"{where}: the {tower} tower sets {key}={cfg[key]!r}, which this converter does "
                "not support (supported: CLIP ViT and ModifiedResNet image towers and CLIP's "
                "causal text transformer, without layer scale or custom attention blocks)."
            )


def _agree(where: str, what: str, config: Any, tensors: Any) -> None:
    if config != tensors:
        raise tl.ConversionError(
            f"{where} says {what} = {config}, the tensors have {tensors}: that config (or "
            "model name) does not describe these weights."
        )


def _eps(cfg: Config) -> float:
    return float((cfg.get("norm_kwargs") or {}).get("eps", 1e-5))


def _encoder(sd: tl.StateDict, flat: dict, src: str, ours: str, heads: int) -> int:
    """`{src}.resblocks.*` (torch `MultiheadAttention` + `c_fc`/`c_proj` MLP) -> our layers."""
    depth = sd.count(f"{src}.resblocks.{{}}.attn.in_proj_weight")
    for i in range(depth):
        s, o = f"{src}.resblocks.{i}", f"{ours}/layer_{i}"
        weights = np.split(sd(f"{s}.attn.in_proj_weight"), 3)
        biases = np.split(sd(f"{s}.attn.in_proj_bias"), 3)
        for name, w, b in zip(("query", "key", "value"), weights, biases, strict=True):
            tl.put(flat, f"{o}/attn/{name}", tl.heads_in(w, b, heads))
        out = tl.heads_out(sd(f"{s}.attn.out_proj.weight"), sd(f"{s}.attn.out_proj.bias"), heads)
        tl.put(flat, f"{o}/attn/out", out)
        tl.put(flat, f"{o}/norm1", tl.layer_norm(sd, f"{s}.ln_1"))
        tl.put(flat, f"{o}/mlp/fc1", tl.linear(sd, f"{s}.mlp.c_fc"))
        tl.put(flat, f"{o}/mlp/fc2", tl.linear(sd, f"{s}.mlp.c_proj"))
        tl.put(flat, f"{o}/norm2", tl.layer_norm(sd, f"{s}.ln_2"))
    return depth


def _heads(width: int, head_width: int, where: str) -> int:
    if width % head_width:
        raise tl.ConversionError(
            f"{where}: image tower width {width} is not a multiple of head_width {head_width}."
        )
    return width // head_width


def _image_size(vc: Config, where: str) -> int:
    size = vc.get("image_size", 224)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise tl.ConversionError(
                f"{where}: non-square image_size {size} is not supported (square images only)."
            )
        size = size[0]
    return int(size)


def _vit(sd: tl.StateDict, vc: Config, act: str, where: str) -> Converted:
    v: dict[str, np.ndarray] = {}
    patch = sd("visual.conv1.weight")
    width, _, p_size, _ = patch.shape
    _agree(where, "vision_cfg.width", int(vc.get("width", 768)), int(width))
    _agree(where, "vision_cfg.patch_size", int(vc.get("patch_size", 16)), int(p_size))
    v["params/embedding/kernel"] = patch.transpose(2, 3, 1, 0)
    v["params/cls"] = sd("visual.class_embedding").reshape(1, 1, -1)
    v["params/pos_embedding"] = sd("visual.positional_embedding")[None]
    pre_norm = not vc.get("no_ln_pre", False)
    if pre_norm:
        tl.put(v, "params/norm_pre", tl.layer_norm(sd, "visual.ln_pre"))
    heads = _heads(int(width), int(vc.get("head_width", 64)), where)
    depth = _encoder(sd, v, "visual.transformer", "params/encoder", heads)
    _agree(where, "vision_cfg.layers", int(vc.get("layers", 12)), depth)
    tl.put(v, "params/norm", tl.layer_norm(sd, "visual.ln_post"))
    if sd.has("visual.proj"):
        v["params/proj/kernel"] = sd("visual.proj")
    size = _image_size(vc, where)
    grid = size // int(p_size)
    _agree(
        where,
        "vision_cfg.image_size // patch_size",
        grid**2 + 1,
        v["params/pos_embedding"].shape[1],
    )
    pool = vc.get("pool_type", "tok")
    if pool not in ("tok", "avg"):
        raise tl.ConversionError(
            f"{where}: vision pool_type {pool!r} is not supported ('tok' or 'avg')."
        )
    over = dict(
        patch_size=int(p_size),
        image_size=size,
        width=int(width),
        depth=depth,
        num_heads=heads,
        mlp_dim=int(v["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        pool="cls" if pool == "tok" else "gap",
        cls_token=True,
        norm_after_pool=bool(vc.get("final_ln_after_pool", False)),
        act=act,
        norm_eps=_eps(vc),
        pre_norm=pre_norm,
        patch_bias=False,
        proj_dim=int(v["params/proj/kernel"].shape[1]) if "params/proj/kernel" in v else 0,
    )
    return Converted(closest_arch("vit", over, "vit_b16"), over, v)


def _modified_resnet(sd: tl.StateDict, vc: Config, where: str) -> Converted:
    p: dict[str, np.ndarray] = {}

    def conv_bn(conv: str, bn: str, ours: str) -> None:
        tl.put(p, f"params/{ours}_conv", tl.conv(sd, conv))
        bn_p, bn_s = tl.batch_norm(sd, bn)
        tl.put(p, f"params/{ours}_norm", bn_p)
        tl.put(p, f"batch_stats/{ours}_norm", bn_s)

    for k in (1, 2, 3):
        conv_bn(f"visual.conv{k}", f"visual.bn{k}", f"stem{k}")
    sizes = tuple(sd.count(f"visual.layer{i}.{{}}.conv1.weight") for i in (1, 2, 3, 4))
    for i, count in enumerate(sizes):
        for j in range(count):
            src, ours = f"visual.layer{i + 1}.{j}", f"stage{i + 1}_block{j + 1}"
            for k in (1, 2, 3):
                conv_bn(f"{src}.conv{k}", f"{src}.bn{k}", f"{ours}_{k}")
            if sd.has(f"{src}.downsample.0.weight"):
                conv_bn(f"{src}.downsample.0", f"{src}.downsample.1", f"{ours}_proj")
    width = int(p["params/stem3_conv/kernel"].shape[-1])
    _agree(where, "vision_cfg.width", int(vc.get("width", 64)), width)
    _agree(where, "vision_cfg.layers", [int(n) for n in vc["layers"]], list(sizes))
    p["params/attn_pool/pos_embedding"] = sd("visual.attnpool.positional_embedding")[None]
    for theirs, mine in (("q", "query"), ("k", "key"), ("v", "value"), ("c", "out")):
        tl.put(p, f"params/attn_pool/{mine}", tl.linear(sd, f"visual.attnpool.{theirs}_proj"))
    size = _image_size(vc, where)
    rows = p["params/attn_pool/pos_embedding"].shape[1]
    _agree(where, "(vision_cfg.image_size // 32) ** 2 + 1", (size // 32) ** 2 + 1, rows)
    over = dict(
        stage_sizes=sizes,
        width=width,
        image_size=size,
        num_heads=_heads(32 * width, int(vc.get("head_width", 64)), where),
        proj_dim=int(p["params/attn_pool/out/kernel"].shape[1]),
    )
    return Converted(closest_arch("modified_resnet", over, "modified_resnet50"), over, p)


def _text(sd: tl.StateDict, tc: Config, act: str, where: str) -> Converted:
    t: dict[str, np.ndarray] = {"params/token_embedding/embedding": sd("token_embedding.weight")}
    t["params/pos_embedding"] = sd("positional_embedding")
    width = int(t["params/token_embedding/embedding"].shape[1])
    _agree(where, "text_cfg.width", int(tc.get("width", 512)), width)
    heads = int(tc.get("heads", 8))
    depth = _encoder(sd, t, "transformer", "params/encoder", heads)
    _agree(where, "text_cfg.layers", int(tc.get("layers", 12)), depth)
    tl.put(t, "params/norm", tl.layer_norm(sd, "ln_final"))
    if sd.has("text_projection"):
        t["params/proj/kernel"] = sd("text_projection")
    pool = tc.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise tl.ConversionError(
            f"{where}: text pool_type {pool!r} is not supported ('argmax' or 'eos')."
        )
    vocab, context = (
        t["params/token_embedding/embedding"].shape[0],
        t["params/pos_embedding"].shape[0],
    )
    _agree(
        where, "text_cfg.vocab_size", int(tc.get("vocab_size", configs.BPE_VOCAB_SIZE)), int(vocab)
    )
    _agree(where, "text_cfg.context_length", int(tc.get("context_length", 77)), int(context))
    over = dict(
        vocab_size=int(vocab),
        context_length=int(context),
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=int(t["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        proj_dim=int(t["params/proj/kernel"].shape[1]) if "params/proj/kernel" in t else 0,
        act=act,
        norm_eps=_eps(tc),
        eos_id=int(tc.get("eos_id", 2)) if pool == "eos" else None,
        pad_id=None,  # open_clip attends to every position before the causal mask's edge
    )
    return Converted(closest_arch("clip_text", over, "clip_text_b"), over, t)


def preprocess(pc: Config, image_size: int, where: str) -> dict[str, Any]:
    """Our preprocessing metadata from open_clip's `preprocess_cfg` (its defaults otherwise):
    shorter side resized to the model's image size, centre crop, OpenAI mean / std. open_clip
    takes the size from the image tower, as here."""
    mode = pc.get("resize_mode", "shortest")
    interpolation = pc.get("interpolation", "bicubic")
    if mode != "shortest" or interpolation not in ("bicubic", "bilinear"):
        raise tl.ConversionError(
            f"{where}: preprocess_cfg resize_mode={mode!r} interpolation={interpolation!r} is "
            "not supported (resize_mode 'shortest' with 'bicubic' or 'bilinear')."
        )
    return {
        "image_size": image_size,
        "mean": [float(m) for m in pc.get("mean", OPENAI_MEAN)],
        "std": [float(s) for s in pc.get("std", OPENAI_STD)],
        "crop_fraction": 1.0,
        "interpolation": interpolation,
    }


def convert_clip(
    sd: tl.StateDict, model_cfg: Config, preprocess_cfg: Config, where: str
) -> tuple[Converted, Converted, float]:
    """`(image tower, text tower, logit_scale)` of an open_clip CLIP state dict."""
    vc, tc = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    _check_options(vc, _UNSUPPORTED_VISION, "image", where)
    _check_options(tc, _UNSUPPORTED_TEXT, "text", where)
    if sd.has("logit_bias"):
        raise tl.ConversionError(
            f"{sd.source}: the checkpoint has a logit_bias (a sigmoid-loss, SigLIP-style model); "
            "this converter takes softmax CLIP models only."
        )
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    resnet = isinstance(vc.get("layers"), list | tuple)
    if resnet != sd.has("visual.layer1.0.conv1.weight"):
        kinds = ("a ModifiedResNet", "a ViT")
        raise tl.ConversionError(
            f"{where} describes {kinds[not resnet]} image tower, the tensors hold "
            f"{kinds[resnet]}: that config (or model name) does not describe these weights."
        )
    image = _modified_resnet(sd, vc, where) if resnet else _vit(sd, vc, act, where)
    text_sd = sd.with_prefix("text." if sd.has("text.token_embedding.weight") else "")
    text = _text(text_sd, tc, act, where)
    embed = model_cfg.get("embed_dim")
    for conv in (image, text):
        dim = conv.overrides["proj_dim"]
        if embed is not None and dim:
            _agree(where, "embed_dim", int(embed), dim)
    image.meta["preprocess"] = preprocess(preprocess_cfg, image.overrides["image_size"], where)
    scale = sd("logit_scale")
    if scale.size != 1:
        raise tl.ConversionError(
            f"{sd.source}: logit_scale has shape {scale.shape}, not one value."
        )
    # OpenAI's files also store the sizes as tensors; the attention mask is a buffer.
    sd.ignore([r"^(input_resolution|context_length|vocab_size)$", r"attn_mask$"])
    sd.finish()
    return image, text, float(scale.reshape(-1)[0])
