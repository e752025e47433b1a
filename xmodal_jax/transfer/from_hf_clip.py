"""Hugging Face CLIP state dicts (`CLIPModel`: both towers, projections, logit scale; or one
tower alone, `CLIPTextModel` / `CLIPVisionModel`) -> our towers.

Key names follow `transformers/models/clip/modeling_clip.py`; the number of heads comes from
the model's `config.json`, which must sit beside the weights.
"""

from __future__ import annotations

import numpy as np

from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch
from xmodal_jax.transfer.from_hf import Config, act, attention

# OpenAI CLIP's image normalisation (`preprocessor_config.json` of the hub models).
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def is_clip(keys: set[str]) -> bool:
    return "text_model.embeddings.token_embedding.weight" in keys and "logit_scale" in keys


def encoder(sd: tl.StateDict, flat: dict, src: str, ours: str, heads: int) -> int:
    """The HF CLIP encoder layers under `src` into our `ours/layer_{i}`; returns the depth."""
    depth = sd.count(f"{src}.layers.{{}}.self_attn.q_proj.weight")
    for i in range(depth):
        s, o = f"{src}.layers.{i}", f"{ours}/layer_{i}"
        a = f"{s}.self_attn"
        attention(
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


# transformers' CLIPImageProcessor: shorter side resized (bicubic) to the image size, centre
# crop of that size (nothing cut beyond the longer side), OpenAI mean / std.
_CLIP_PRE = {
    "mean": OPENAI_MEAN,
    "std": OPENAI_STD,
    "crop_fraction": 1.0,
    "interpolation": "bicubic",
}


def _clip_text(sd: tl.StateDict, tc: Config) -> Converted:
    """The text tower (and `text_projection`, if the checkpoint has one)."""
    heads = int(tc["num_attention_heads"])
    t = {"params/token_embedding/embedding": sd("text_model.embeddings.token_embedding.weight")}
    t["params/pos_embedding"] = sd("text_model.embeddings.position_embedding.weight")
    depth = encoder(sd, t, "text_model.encoder", "params/encoder", heads)
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
        act=act(tc.get("hidden_act", "quick_gelu")),
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
    depth = encoder(sd, v, "vision_model.encoder", "params/encoder", heads)
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
        act=act(vc.get("hidden_act", "quick_gelu")),
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
