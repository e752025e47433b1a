"""big_vision / vision_transformer ViT `.npz` checkpoints -> our ViT.

Layout (google-research/big_vision `big_vision/models/vit.py`, `_Model` and `Encoder`;
arrays saved by `big_vision/utils.py` with `/`-joined keys, optionally under `params/` or
`opt/target/`):
- `embedding/{kernel [p, p, 3, D], bias}`;
- `pos_embedding` [1, N, D], added *before* the `cls` token [1, 1, D] is prepended (so the cls
  token has no position embedding); older files keep it in `Transformer/pos_embedding` or
  `Transformer/posembed_input/pos_embedding`, the latter with a cls row (N + 1, added after);
- `Transformer/encoderblock_{i}/` (or one scanned `Transformer/encoderblock/` with a leading
  depth axis) holding `LayerNorm_0`, `MultiHeadDotProductAttention_0/{query,key,value}` (kernel
  [D, H, hd], bias [H, hd]) and `.../out` (kernel [H, hd, D]), `LayerNorm_1`,
  `MlpBlock_0/Dense_{0,1}`; google-research/vision_transformer files number the same modules
  `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`;
- `Transformer/encoder_norm`, `MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0,
  MlpBlock_0}` for `pool_type='map'`, `head/{kernel, bias}`.
Flax `nn.gelu` (tanh approximation) and LayerNorm epsilon 1e-6 are the defaults there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from xmodal_jax.transfer import torch_layout as tl
from xmodal_jax.transfer.converted import Converted, closest_arch


def strip_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    for prefix in ("params/", "opt/target/"):
        if tensors and all(k.startswith(prefix) for k in tensors):
            return {k[len(prefix) :]: v for k, v in tensors.items()}
    return dict(tensors)


def is_big_vision_vit(keys: set[str]) -> bool:
    return "embedding/kernel" in keys and any(
        k.startswith("Transformer/encoderblock") for k in keys
    )


def _modules(tensors: Mapping[str, np.ndarray], prefix: str) -> dict[str, list[str]]:
    """Child module names under `prefix`, grouped by type and sorted by their index."""
    kids = {k[len(prefix) :].split("/")[0] for k in tensors if k.startswith(prefix)}
    groups: dict[str, list[str]] = {}
    for kid in kids:
        m = re.match(r"^(.*)_(\d+)$", kid)
        if m:
            groups.setdefault(m.group(1), []).append(kid)
    return {t: sorted(v, key=lambda s: int(s.rsplit("_", 1)[1])) for t, v in groups.items()}


def _block(sd: tl.StateDict, src: str, index: int | None) -> dict[str, np.ndarray]:
    """One encoder block (or MAP head) `src/` as our leaves; `index` picks a scanned layer."""
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    mods = _modules(sd.tensors, src + "/")
    get = lambda key: pick(sd(key))
    out: dict[str, np.ndarray] = {}
    norms = mods.get("LayerNorm", [])
    (attn,), (mlp,) = mods["MultiHeadDotProductAttention"], mods["MlpBlock"]
    for ours, theirs in zip(("norm1", "norm2"), norms, strict=False):
        out[f"{ours}/scale"], out[f"{ours}/bias"] = (
            get(f"{src}/{theirs}/scale"),
            get(f"{src}/{theirs}/bias"),
        )
    for name in ("query", "key", "value", "out"):
        for leaf in ("kernel", "bias"):
            out[f"attn/{name}/{leaf}"] = get(f"{src}/{attn}/{name}/{leaf}")
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        for leaf in ("kernel", "bias"):
            out[f"mlp/{ours}/{leaf}"] = get(f"{src}/{mlp}/{theirs}/{leaf}")
    return out


def encoder(sd: tl.StateDict, src: str, p: dict[str, np.ndarray]) -> int:
    """big_vision `Encoder` `src/` (blocks, scanned or not, and `encoder_norm`) -> our
    `params/encoder/layer_{i}` and `params/norm`; returns the depth."""
    if sd.has(f"{src}/encoderblock/LayerNorm_0/scale"):  # scanned: a leading depth axis
        depth = int(sd.tensors[f"{src}/encoderblock/LayerNorm_0/scale"].shape[0])
        blocks = [(f"{src}/encoderblock", i) for i in range(depth)]
    else:
        depth = sd.count(f"{src}/encoderblock_{{}}/LayerNorm_0/scale")
        blocks = [(f"{src}/encoderblock_{i}", None) for i in range(depth)]
    for i, (block, index) in enumerate(blocks):
        tl.put(p, f"params/encoder/layer_{i}", _block(sd, block, index))
    p["params/norm/scale"] = sd(f"{src}/encoder_norm/scale")
    p["params/norm/bias"] = sd(f"{src}/encoder_norm/bias")
    return depth


def map_head(sd: tl.StateDict, p: dict[str, np.ndarray]) -> bool:
    """big_vision `MAPHead_0` (if there is one) -> our `params/map_head`."""
    if not sd.has("MAPHead_0/probe"):
        return False
    p["params/map_head/probe"] = sd("MAPHead_0/probe")
    head = _block(sd, "MAPHead_0", None)
    head["norm/scale"], head["norm/bias"] = head.pop("norm1/scale"), head.pop("norm1/bias")
    tl.put(p, "params/map_head", head)
    return True


def convert_vit(tensors: Mapping[str, np.ndarray], source: str) -> Converted:
    sd = tl.StateDict(strip_prefix(tensors), source)
    if any(k.startswith("pre_logits/") for k in sd.tensors):
        raise tl.ConversionError(
            f"{source}: ViTs with a pre_logits layer (rep_size) are not supported."
        )
    kernel = sd("embedding/kernel")
    p_size, width = int(kernel.shape[0]), int(kernel.shape[-1])
    p = {"params/embedding/kernel": kernel, "params/embedding/bias": sd("embedding/bias")}

    has_cls = sd.has("cls")
    if sd.has("Transformer/posembed_input/pos_embedding"):
        posemb = sd("Transformer/posembed_input/pos_embedding")
    elif sd.has("Transformer/pos_embedding"):
        posemb = sd("Transformer/pos_embedding")
    else:
        posemb = sd("pos_embedding")
    n = posemb.shape[1]
    grid = int(round(np.sqrt(n - 1 if has_cls and int(np.sqrt(n)) ** 2 != n else n)))
    if has_cls:
        p["params/cls"] = sd("cls")
        if n == grid * grid:  # cls added after posemb: its row of our table is zero
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    p["params/pos_embedding"] = posemb

    depth = encoder(sd, "Transformer", p)
    pool = "map" if map_head(sd, p) else ("cls" if has_cls else "gap")
    num_classes = 0
    if sd.has("head/kernel"):
        p["params/head/kernel"], p["params/head/bias"] = sd("head/kernel"), sd("head/bias")
        num_classes = int(p["params/head/kernel"].shape[1])
    sd.finish()

    q = p["params/encoder/layer_0/attn/query/kernel"]
    overrides: dict[str, Any] = dict(
        num_classes=num_classes,
        patch_size=p_size,
        image_size=grid * p_size,
        width=width,
        depth=depth,
        num_heads=int(q.shape[1]),
        mlp_dim=int(p["params/encoder/layer_0/mlp/fc1/kernel"].shape[1]),
        pool=pool,
        act="gelu_tanh",
        norm_eps=1e-6,
    )
    pre = {"image_size": grid * p_size, "mean": [0.5] * 3, "std": [0.5] * 3}  # inputs in [-1, 1]
    return Converted(closest_arch("vit", overrides, "vit_b16"), overrides, p, {"preprocess": pre})
