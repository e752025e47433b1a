"""Measured parity of every weights format `xmodal convert` reads, as a record:
`benchmarks/results/parity.json` (rendered to parity.md, which the README embeds).

    .venv/bin/python benchmarks/parity.py benchmarks/results/parity.json
    make tables   # renders parity.md beside it

For each format, the model the tests compare against is built in its own library (random and
small, as in the tests; the real MiniLM, MobileNetV2 and EfficientNet-Lite0 weights for the
named assets), converted with our code and run on the same inputs; each row is the largest
`|ours - theirs| / max |theirs|` of one output, beside the bound its test asserts. The models
and inputs are the tests' own (their helpers are imported from `tests/`); timm and open_clip run
in their oracle subprocesses (`tests/timm_oracle.py`, `tests/open_clip_oracle.py`). torch,
transformers, timm, open_clip and efficientnet_lite_pytorch are test-only oracles: the `oracle`
extra and the Makefile's `ORACLE_NO_DEPS`.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
sys.path.insert(0, TESTS)

import skimage.data  # noqa: E402
import test_converters as tc  # noqa: E402
import test_open_clip  # noqa: E402
import test_siglip_weights as ts  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax_testing import jit_apply  # noqa: E402

from xmodal_jax import pretrained, provenance  # noqa: E402
from xmodal_jax.transfer import checkpoint_io, convert, open_clip_configs  # noqa: E402

ORACLES = ("torch", "transformers", "timm", "open-clip-torch", "efficientnet-lite-pytorch")
# format, output, (max relative error, max absolute error), bound, test file
Row = tuple[str, str, tuple[float, float], str, str]
REL4 = "1e-4 relative"
TEST_CONVERTERS = "test_converters.py"


def rel_err(ours: Any, ref: Any) -> tuple[float, float]:
    """(max |ours - ref| / max |ref|, max |ours - ref|), in float64."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float(np.abs(ours - ref).max())
    return diff / float(np.abs(ref).max()), diff


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _photos() -> list[np.ndarray]:
    return [skimage.data.chelsea(), skimage.data.coffee()]


def mobilenet_v2() -> Iterator[Row]:
    """torchvision's ImageNet MobileNetV2 (the asset) against a plain-torch forward."""
    from test_pretrained import _torch_mobilenet_v2

    vision = pretrained.load("mobilenet-v2-imagenet")
    sd = torch.load(pretrained.asset_path("mobilenet-v2-imagenet"), weights_only=True)
    x = np.concatenate([vision.preprocess(img[None]) for img in _photos()])
    with torch.no_grad():
        ref = _torch_mobilenet_v2(sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    ours = jit_apply(vision.module, vision.variables, x)["logits"]
    yield ("torchvision MobileNetV2 (ImageNet asset, 2 photos)", "logits",
           rel_err(ours, ref), "1e-4 absolute", "test_pretrained.py")  # fmt: skip


def efficientnet_lite() -> Iterator[Row]:
    """EfficientNet-Lite0 (the asset) against `efficientnet_lite_pytorch`."""
    from test_efficientnet import _oracle

    vision, oracle = pretrained.load("efficientnet-lite0-imagenet"), _oracle("lite0")
    x = np.concatenate([vision.preprocess(img[None]) for img in _photos()])
    with torch.no_grad():
        ref = oracle(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    ours = jit_apply(vision.module, vision.variables, x)["logits"]
    yield ("EfficientNet-Lite0 (ImageNet asset, 2 photos)", "logits", rel_err(ours, ref),
           REL4, "test_efficientnet.py")  # fmt: skip


def minilm() -> Iterator[Row]:
    """all-MiniLM-L6-v2 (the asset): `encode` against `BertModel` + mean pooling."""
    from test_pretrained import SENTENCES, minilm_reference

    text = pretrained.load("minilm-l6")
    ref = minilm_reference(text.tokenize(SENTENCES))
    yield ("HF BERT: sentence-transformers all-MiniLM-L6-v2 (asset)", "encode (normalised)",
           rel_err(text.encode(SENTENCES), ref), "1e-5 absolute", "test_pretrained.py")  # fmt: skip


def hf_bert(tmp: str) -> Iterator[Row]:
    model = tc._randomize(transformers.BertModel(tc._bert_config()))
    model.save_pretrained(tmp)
    ids, types = tc._ids(), tc.RNG.randint(0, 2, size=(3, 12))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                    attention_mask=torch.from_numpy((ids != 0).astype(np.int64)))  # fmt: skip
    variables, meta = convert.load_foreign(tmp)
    out = tc._forward(meta, variables, ids.astype(np.int32), types.astype(np.int32))
    for name, ours, theirs in (("token features", out["features"], ref.last_hidden_state),
                               ("pooled", out["pooled"], ref.pooler_output)):  # fmt: skip
        yield "HF BERT (random, small)", name, rel_err(ours, theirs), REL4, "test_converters.py"


def hf_clip(tmp: str) -> Iterator[Row]:
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, eos_token_id=50)  # fmt: skip
    vision = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    model = tc._randomize(transformers.CLIPModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    model.save_pretrained(tmp)
    ids = tc.RNG.randint(3, 99, size=(3, 10)).astype(np.int64)
    ids[ids == 50] = 51
    ids[:, 0] = 1
    for row, pos in enumerate((9, 5, 7)):
        ids[row, pos], ids[row, pos + 1 :] = 50, 0
    images = tc._images(2)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), pixel_values=tc._nchw(images),
                    attention_mask=torch.from_numpy((ids != 0).astype(np.int64)))  # fmt: skip
    dst = os.path.join(tmp, "clip.safetensors")
    convert.convert(tmp, dst)
    variables, meta = checkpoint_io.load(dst)
    zi = _unit(tc._forward(meta["image"], variables["image"], images)["pooled"])
    zt = _unit(tc._forward(meta["text"], variables["text"], ids.astype(np.int32))["pooled"])
    logits = np.exp(meta["logit_scale"]) * zi @ zt.T
    for name, ours, theirs in (("image embeddings", zi, ref.image_embeds),
                               ("text embeddings", zt, ref.text_embeds),
                               ("logits", logits, ref.logits_per_image)):  # fmt: skip
        yield "HF CLIPModel (random, small)", name, rel_err(ours, theirs), REL4, TEST_CONVERTERS


def hf_vit(tmp: str) -> Iterator[Row]:
    cfg = tc._vit_config(num_labels=5)
    model = tc._randomize(transformers.ViTForImageClassification(cfg))
    model.save_pretrained(tmp)
    images = tc._images(2)
    with torch.no_grad():
        logits = model(tc._nchw(images)).logits
        tokens = model.vit(tc._nchw(images)).last_hidden_state
    variables, meta = convert.load_foreign(tmp)
    out = tc._forward(meta, variables, images)
    fmt = "HF ViT (random, small; 8-wide heads)"
    for name, ours, theirs in (("token features", out["features"], tokens),
                               ("logits", out["logits"], logits)):  # fmt: skip
        yield fmt, name, rel_err(ours, theirs), REL4, "test_converters.py"


def big_vision_vit(tmp: str) -> Iterator[Row]:
    sd, images, tokens = tc._vit_reference(
        pathlib.Path(tmp), hidden_act="gelu_new", layer_norm_eps=1e-6
    )
    np.savez(os.path.join(tmp, "vit.npz"), **tc._big_vision_npz(sd, "big_vision"))
    variables, meta = convert.load_foreign(os.path.join(tmp, "vit.npz"))
    ours = tc._forward(meta, variables, images)["features"]
    yield ("big_vision ViT `.npz` (written from a random HF ViT)", "token features",
           rel_err(ours, tokens), REL4, "test_converters.py")  # fmt: skip


def resnet(tmp: str) -> Iterator[Row]:
    model = tc._randomize(transformers.ResNetModel(tc._resnet_config("bottleneck")))
    model.save_pretrained(os.path.join(tmp, "hf"))
    images = tc._images(2)
    with torch.no_grad():
        ref = model(tc._nchw(images))
    pooled = ref.pooler_output.numpy()[:, :, 0, 0]
    variables, meta = convert.load_foreign(os.path.join(tmp, "hf"))
    out = tc._forward(meta, variables, images)
    features = ref.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    fmt = "HF ResNet (random, small, bottleneck)"
    yield fmt, "features", rel_err(out["features"], features), REL4, "test_converters.py"
    yield fmt, "pooled", rel_err(out["pooled"], pooled), REL4, "test_converters.py"
    tv = tc._torchvision_names(model.state_dict(), "bottleneck")
    torch.save(tv, os.path.join(tmp, "tv.pth"))
    variables, meta = convert.load_foreign(os.path.join(tmp, "tv.pth"))
    yield ("torchvision ResNet `.pth` (the same weights, torchvision's names)", "pooled",
           rel_err(tc._forward(meta, variables, images)["pooled"], pooled), REL4,
           "test_converters.py")  # fmt: skip


def hf_siglip(tmp: str) -> Iterator[Row]:
    model = ts._siglip(tmp)
    ids, images = ts._inputs()
    ref = ts._reference(model, ids, images)
    dst = os.path.join(tmp, "siglip.safetensors")
    convert.convert(tmp, dst)
    variables, meta = checkpoint_io.load(dst)
    zi = ts._forward(meta["image"], variables["image"], (images - 0.5) / 0.5)["pooled"]
    zt = ts._forward(meta["text"], variables["text"], ids.astype(np.int32))["pooled"]
    logits = pretrained.load(dst).logits_ids(images, ids)
    for name, ours, theirs in (("image embeddings", _unit(zi), ref.image_embeds),
                               ("text embeddings", _unit(zt), ref.text_embeds),
                               ("logits", logits, ref.logits_per_image)):  # fmt: skip
        fmt = "HF SigLIP (random, small; 8-wide heads)"
        yield fmt, name, rel_err(ours, theirs), "1e-5 relative", "test_siglip_weights.py"


def timm_vit(tmp: str) -> Iterator[Row]:
    """The oracle's cases, converted with `xmodal convert` and loaded with `pretrained.load`."""
    from xmodal_jax import main as cli

    subprocess.run([sys.executable, os.path.join(TESTS, "timm_oracle.py"), tmp], check=True)
    with open(os.path.join(tmp, "oracle.json")) as f:
        cases = json.load(f)["cases"]
    arch = {"bare_pth": ["--arch", "vit_b16"]}
    for name, case in cases.items():
        ref = dict(np.load(os.path.join(tmp, f"{name}.npz")))
        dst = os.path.join(tmp, f"{name}.safetensors")
        assert cli.main(["convert", os.path.join(tmp, case["src"]), dst, *arch.get(name, [])]) == 0
        vision = pretrained.load(dst)
        out = jit_apply(vision.module, vision.variables, ref["images"])
        head = case["width"] // case["heads"]
        how = "state dict + `--arch`" if name in arch else "hub folder"
        fmt = f"timm ViT, {how} (random; {case['heads']} heads of {head})"
        for key in ("pooled", "logits"):
            yield fmt, key, rel_err(out[key], ref[key]), REL4, "test_timm_oracle.py"


def open_clip(tmp: str) -> Iterator[Row]:
    subprocess.run([sys.executable, os.path.join(TESTS, "open_clip_oracle.py"), tmp], check=True)
    open_clip_configs.MODEL_CONFIGS["Tiny-RN"] = test_open_clip.TINY_RN
    srcs = {"vit_cls": ("vit_cls", None), "vit_avg": ("vit_avg", None),
            "rn": (os.path.join("rn", "rn.bin"), "Tiny-RN")}  # fmt: skip
    labels = {"vit_cls": "ViT, cls pooling, hub folder", "vit_avg": "ViT, mean pooling, hub "
              "folder", "rn": "ModifiedResNet, state dict + model name"}  # fmt: skip
    for name, (src, arch) in srcs.items():
        ref = dict(np.load(os.path.join(tmp, f"{name}.npz")))
        variables, meta = convert.load_foreign(os.path.join(tmp, src), arch)
        tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        image = tc.zoo.build(meta["image"]["arch"], **tuples(meta["image"]["overrides"]))
        text = tc.zoo.build(meta["text"]["arch"], **tuples(meta["text"]["overrides"]))
        zi = jit_apply(image, variables["image"], ref["images"].transpose(0, 2, 3, 1))["pooled"]
        zt = jit_apply(text, variables["text"], ref["ids"].astype(np.int32))["pooled"]
        logits = np.exp(meta["logit_scale"]) * _unit(zi) @ _unit(zt).T
        for key, ours, theirs in (("image features", zi, ref["image_features"]),
                                  ("text features", zt, ref["text_features"]),
                                  ("logits", logits, ref["logits"])):  # fmt: skip
            yield (f"open_clip ({labels[name]}; random, small)", key, rel_err(ours, theirs),
                   REL4, "test_open_clip.py")  # fmt: skip


SOURCES: tuple[Callable[..., Iterator[Row]], ...] = (
    mobilenet_v2, resnet, efficientnet_lite, minilm, hf_bert, hf_vit, timm_vit, big_vision_vit,
    hf_clip, open_clip, hf_siglip,
)  # fmt: skip


def main(path: str) -> None:
    rows = []
    for source in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            args = () if source in (mobilenet_v2, efficientnet_lite, minilm) else (tmp,)
            for fmt, output, (rel, diff), bound, test in source(*args):
                rows.append(dict(format=fmt, output=output, max_rel_err=rel, max_abs_err=diff,
                                 bound=bound, test=test))  # fmt: skip
                print(f"{fmt} | {output} | {rel:.1e} ({diff:.1e} absolute; bound {bound})")
    record = {
        "kind": "parity",
        "command": f"python benchmarks/parity.py {os.path.relpath(path, ROOT)}",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "git": provenance.git_state(ROOT),
        "versions": provenance.versions(ORACLES),
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    print(f"{len(rows)} outputs -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
