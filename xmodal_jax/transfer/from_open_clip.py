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
number of heads is not in the tensors, and a guess would convert into a different model.

The tokenizer: open_clip's CLIP BPE (49,408 tokens) is written into the converted checkpoint,
read from, in order, `vocab.json` + `merges.txt` beside the weights (hub folders hold them),
a `tokenizer.json` there, or the `bpe_simple_vocab_16e6.txt.gz` that the open_clip package
ships (located with `importlib.util.find_spec`; the package is not imported). When none is
found, or the model uses a Hugging Face tokenizer (`hf_tokenizer_name`), the checkpoint is
written without one and its metadata says how to supply token ids (`no_tokenizer_fix`).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from typing import Any

import numpy as np

from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch

Config = dict[str, Any]
HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
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

# Options of open_clip towers that these towers do not have (unset, False or 'default' is fine).
_CUSTOM_BLOCK = ("ls_init_value", "act_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
                 "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")  # fmt: skip
_UNSUPPORTED_VISION = ("timm_model_name", "attentional_pool", *_CUSTOM_BLOCK)
_UNSUPPORTED_TEXT = ("hf_model_name", "embed_cls", "no_causal_mask", "proj_bias", *_CUSTOM_BLOCK)


def is_open_clip(keys: set[str]) -> bool:
    """An open_clip / OpenAI CLIP state dict: `visual.*`, a CLIP text tower, `logit_scale`."""
    text = "token_embedding.weight" in keys or "text.token_embedding.weight" in keys
    return "visual.conv1.weight" in keys and "logit_scale" in keys and text


def _folder(src: str) -> str:
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def _beside(src: str, name: str) -> str | None:
    path = os.path.join(_folder(src), name)
    return path if os.path.isfile(path) else None


def hub_weights(src: str) -> str | None:
    """The open_clip weights file of a hub folder (`open_clip_config.json` beside
    `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), None for anything else.
    Hub folders often also hold the Hugging Face `transformers` form of the same model."""
    if not (os.path.isdir(src) and _beside(src, HUB_CONFIG)):
        return None
    return next((p for p in (_beside(src, n) for n in HUB_WEIGHTS) if p), None)


def _package_file(*parts: str) -> str | None:
    """A file of the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, *parts)
        if os.path.isfile(path):
            return path
    return None


def _named_config(arch: str) -> Config | None:
    name, quick = arch.strip(), False
    if name.lower().endswith("-quickgelu"):
        name, quick = name[: -len("-quickgelu")], True
    found = {k.lower(): v for k, v in MODEL_CONFIGS.items()}.get(name.lower())
    if found is None:
        for candidate in (arch.strip(), name):
            path = _package_file("model_configs", f"{candidate}.json")
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
    path = _beside(src, HUB_CONFIG)
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
        cfg = _named_config(arch)
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
    _agree(where, "text_cfg.vocab_size", int(tc.get("vocab_size", BPE_VOCAB_SIZE)), int(vocab))
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


# --------------------------------------------------------------------------------------------
# Tokenizer


def _byte_symbols() -> list[str]:
    """CLIP's (GPT-2's) printable stand-in for each byte, in vocabulary order: the bytes that
    print as themselves ('!'..'~', '¡'..'¬', '®'..'ÿ') first, then the others mapped to
    chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def bpe_from_merges(text: str) -> tuple[str, str]:
    """`(vocab.json, merges.txt)` texts from open_clip's `bpe_simple_vocab_16e6.txt` (a version
    line, then merges by rank). The vocabulary is the 256 byte symbols, the same ending a word
    (`</w>`), one token per merge, then `<|startoftext|>` and `<|endoftext|>`; open_clip keeps
    the first 49,408 - 514 merges of the file."""
    n_merges = BPE_VOCAB_SIZE - 2 * 256 - 2
    merges = text.split("\n")[1 : 1 + n_merges]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges) + "\n"


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _hub_tokenizer(src: str) -> tuple[str, str] | None:
    vocab, merges = _beside(src, "vocab.json"), _beside(src, "merges.txt")
    if vocab and merges:
        return _read(vocab), _read(merges)
    path = _beside(src, "tokenizer.json")
    if path:
        model = json.loads(_read(path)).get("model") or {}
        if model.get("type") == "BPE":
            lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
            return json.dumps(model["vocab"], ensure_ascii=False), "\n".join(
                ["#version: 0.2", *lines]
            )
    return None


NO_BPE_FIX = (
    "convert the open_clip weights again with open_clip installed (`pip install --no-deps "
    "open-clip-torch`: its BPE vocabulary file is read, the package is not imported), or with "
    "the vocab.json and merges.txt of a CLIP tokenizer beside them; or tokenize with open_clip "
    "and call encode_ids(ids)"
)


def tokenizer_meta(src: str, text_cfg: Config, vocab_size: int) -> dict[str, Any]:
    """Tokenizer metadata for the text tower: `{'tokenizer': ...}`, or `{'no_tokenizer_fix':
    ...}` saying how to supply token ids when no tokenizer can be carried."""
    if text_cfg.get("hf_tokenizer_name"):
        return {
            "no_tokenizer_fix": f"tokenize with the Hugging Face tokenizer "
            f"{text_cfg['hf_tokenizer_name']!r} as open_clip does and call encode_ids(ids)"
        }
    found = _hub_tokenizer(src)
    if found is not None:
        n = len(json.loads(found[0]))
        if n != vocab_size:
            raise tl.ConversionError(
                f"{src}: the tokenizer files beside the weights have {n} tokens, the text tower "
                f"{vocab_size}; remove the tokenizer files that do not belong to these weights."
            )
    elif vocab_size != BPE_VOCAB_SIZE:
        return {
            "no_tokenizer_fix": f"this text tower has {vocab_size} tokens, not the "
            f"{BPE_VOCAB_SIZE} of open_clip's CLIP BPE: put its own vocab.json and merges.txt "
            "beside the weights and convert again, or call encode_ids(ids)"
        }
    elif path := _package_file("bpe_simple_vocab_16e6.txt.gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            found = bpe_from_merges(f.read())
    else:
        return {"no_tokenizer_fix": NO_BPE_FIX}
    vocab, merges = found
    return {"tokenizer": {"type": "clip_bpe", "vocab": vocab, "merges": merges}}
