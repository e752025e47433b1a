"""open_clip checkpoints: tiny random open_clip models (a ViT with cls-token pooling and
quick-GELU, a ViT pooled by the patch tokens' mean with GELU, a ModifiedResNet), saved as users
download them, converted, and compared with open_clip itself. open_clip runs only in the
oracle subprocess (`open_clip_oracle.py`, which explains why); it is an oracle, never imported
by the package.

Tolerances: features and logits within 1e-4 of open_clip's, relative to the largest value
(float32 rounding; seen: below 1e-6). Token ids exactly equal. Preprocessing against the
transform open_clip documents (PIL bicubic resize of the shorter side, centre crop, ToTensor,
Normalize), written here with PIL because torchvision cannot be installed beside this CPU torch:
mean absolute difference <= 0.002 and 99th percentile <= 0.005 in [0, 1] pixel units (PIL
rounds to 8 bits after each of its two resize passes; we resize in float32), max <= 0.06.
"""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from jax_testing import jit_apply
from PIL import Image

from xmodal_jax import main as cli
from xmodal_jax import pretrained
from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.transfer import (
    checkpoint_io,
    convert,
    from_open_clip,
    open_clip_configs,
    open_clip_tokenizer,
)
from xmodal_jax.transfer.torch_layout import ConversionError

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_RN = dict(  # the oracle's "rn" model config, as an open_clip model name would give it
    embed_dim=40,
    vision_cfg=dict(layers=[1, 2, 1, 1], width=16, head_width=16, image_size=64),
    text_cfg=dict(context_length=16, vocab_size=100, width=48, heads=4, layers=2),
)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    out = tmp_path_factory.mktemp("open_clip")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "open_clip_oracle.py"), str(out)], check=True
    )
    with open(out / "oracle.json") as f:
        record = json.load(f)
    record["dir"] = out
    record["cases"] = {n: dict(np.load(out / f"{n}.npz")) for n in ("vit_cls", "vit_avg", "rn")}
    return record


@pytest.fixture
def tiny_rn_name(monkeypatch):
    monkeypatch.setitem(open_clip_configs.MODEL_CONFIGS, "Tiny-RN", copy.deepcopy(TINY_RN))
    return "Tiny-RN"


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"relative error {err:.2e}"


def _check_against(variables, meta, ref):
    """Image / text features and logits of converted weights against open_clip's."""
    tuples = lambda d: {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}  # JSON
    image = zoo.build(meta["image"]["arch"], **tuples(meta["image"]["overrides"]))
    text = zoo.build(meta["text"]["arch"], **tuples(meta["text"]["overrides"]))
    zi = jit_apply(image, variables["image"], ref["images"].transpose(0, 2, 3, 1))["pooled"]
    zt = jit_apply(text, variables["text"], ref["ids"].astype(np.int32))["pooled"]
    _close(zi, ref["image_features"])
    _close(zt, ref["text_features"])
    zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
    zt = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
    _close(np.exp(meta["logit_scale"]) * zi @ zt.T, ref["logits"])


@pytest.mark.parametrize("case", ["vit_cls", "vit_avg"])
def test_hub_folders_match_open_clip(tmp_path, oracle, case):
    folder = oracle["dir"] / case
    dst = tmp_path / "clip.safetensors"
    convert.convert(str(folder), str(dst))
    variables, meta = checkpoint_io.load(dst)
    assert meta["source_format"] == "open_clip" and meta["arch"] == "clip"
    assert meta["text"]["overrides"]["act"] == ("quick_gelu" if case == "vit_cls" else "gelu")
    image = meta["image"]["overrides"]
    assert image["pool"] == ("cls" if case == "vit_cls" else "gap") and image["cls_token"]
    _check_against(variables, meta, oracle["cases"][case])
    # the .bin beside open_clip_config.json converts to the same variables
    bin_variables, _ = convert.load_foreign(str(folder / "open_clip_pytorch_model.bin"))
    st_variables, _ = convert.load_foreign(str(folder))
    flat, flat_bin = checkpoint_io.flatten(st_variables), checkpoint_io.flatten(bin_variables)
    assert flat.keys() == flat_bin.keys()
    assert all(np.array_equal(flat[k], flat_bin[k]) for k in flat)


def test_modified_resnet_bare_state_dict_with_model_name(tmp_path, oracle, tiny_rn_name):
    dst = tmp_path / "rn.safetensors"
    # through the CLI, as `xmodal convert SRC DST --arch NAME`
    src = str(oracle["dir"] / "rn" / "rn.bin")
    assert cli.main(["convert", src, str(dst), "--arch", tiny_rn_name]) == 0
    variables, meta = checkpoint_io.load(dst)
    assert meta["image"]["arch"].startswith("modified_resnet")
    assert meta["image"]["overrides"]["num_heads"] == 32  # 32 * width / head_width
    assert "batch_stats" in variables["image"]
    _check_against(variables, meta, oracle["cases"]["rn"])
    # OpenAI preprocessing by default; this vocabulary is not CLIP's BPE, so no tokenizer
    pair = pretrained.load(str(dst))
    assert pair.image.mean == tuple(from_open_clip.OPENAI_MEAN) and pair.image.image_size == 64
    with pytest.raises(UserError, match="has 100 tokens.*encode_ids"):
        pair.text.tokenize("a photo")


def test_pretrained_load_logits_equal_open_clip(tmp_path, oracle):
    dst = tmp_path / "clip.safetensors"
    convert.convert(str(oracle["dir"] / "vit_cls"), str(dst))
    pair = pretrained.load(str(dst))
    ref = oracle["cases"]["vit_cls"]
    # uint8 images at the model's size (open_clip's transform is then ToTensor + Normalize),
    # texts through our tokenizer: logit_scale.exp() * normalised image @ normalised text
    _close(pair.logits(ref["uint8_images"], oracle["texts"]), ref["uint8_logits"])
    assert pair.image.mean == (0.5, 0.4, 0.3) and pair.image.std == (0.2, 0.25, 0.3)
    assert pair.image.crop_fraction == 1.0 and pair.image.interpolation == "bicubic"


def test_tokenizer_equals_open_clip(tmp_path, oracle):
    dst = tmp_path / "clip.safetensors"
    convert.convert(str(oracle["dir"] / "vit_cls"), str(dst))
    tok = pretrained.load(str(dst)).text.tokenizer
    assert tok.vocab_size == 49408
    ids = tok.encode(oracle["texts"])
    ref = np.asarray(oracle["token_ids"])
    assert ids.shape == ref.shape == (len(oracle["texts"]), 77)
    np.testing.assert_array_equal(ids, ref)
    assert (ids[:, 0] == 49406).all() and ids[-1, 76] == 49407  # sot; eot kept on truncation
    assert (ids[2, :3] == [49406, 49407, 0]).all()  # the empty string
    # whitespace runs and case are cleaned as open_clip cleans them
    np.testing.assert_array_equal(
        tok.encode("a photo of a cat"), tok.encode("  A  PHOTO of a\tcat ")
    )


def test_without_a_vocabulary_load_says_how_to_supply_one(tmp_path, oracle, monkeypatch):
    vocab, merges = open_clip_tokenizer.bpe_from_merges(_package_bpe())
    monkeypatch.setattr(open_clip_configs, "package_file", lambda *parts: None)
    dst = tmp_path / "clip.safetensors"
    convert.convert(str(oracle["dir"] / "vit_cls"), str(dst))
    text = pretrained.load(str(dst)).text
    assert text.tokenizer is None
    with pytest.raises(UserError, match=r"no tokenizer.*pip install --no-deps open-clip-torch"):
        text.tokenize(["a photo of a cat"])
    # a hub folder's vocab.json + merges.txt are taken instead of the package's file
    folder = tmp_path / "hub"
    folder.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        os.symlink(oracle["dir"] / "vit_cls" / name, folder / name)
    (folder / "vocab.json").write_text(vocab, encoding="utf-8")
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    convert.convert(str(folder), str(dst))
    ids = pretrained.load(str(dst)).text.tokenize(oracle["texts"])
    np.testing.assert_array_equal(ids, np.asarray(oracle["token_ids"]))


def _package_bpe() -> str:
    import gzip

    with gzip.open(open_clip_configs.package_file("bpe_simple_vocab_16e6.txt.gz"), "rt") as f:
        return f.read()


def _documented_transform(img, size, mean, std):
    """open_clip's eval transform on a PIL image: Resize(size, bicubic) of the shorter side (the
    longer one truncated), CenterCrop(size) (offsets rounded), ToTensor, Normalize; NHWC here."""
    h, w = img.shape[:2]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    resized = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    x = np.asarray(resized.crop((left, top, left + size, top + size)), np.float32) / 255
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def test_preprocessing_matches_open_clips_transform(tmp_path, oracle):
    dst = tmp_path / "clip.safetensors"
    convert.convert(str(oracle["dir"] / "vit_cls"), str(dst))
    loaded = pretrained.load(str(dst)).image
    for size in (32, 224):
        vision = dataclasses.replace(loaded, image_size=size)
        for name in ("chelsea", "coffee"):  # 300 x 451 and 400 x 600 photos
            img = getattr(skimage.data, name)()
            ours = vision.preprocess(img)[0]
            ref = _documented_transform(img, size, vision.mean, vision.std)
            diff = np.abs(ours - ref) * np.asarray(vision.std)  # in [0, 1] pixel units
            assert ours.shape == (size, size, 3)
            assert diff.mean() <= 0.002 and np.percentile(diff, 99) <= 0.005, (name, size)
            assert diff.max() <= 0.06, (name, size)


def test_missing_or_wrong_information_is_one_clear_error(tmp_path, oracle, tiny_rn_name):
    bare = str(oracle["dir"] / "rn" / "rn.bin")
    dst = str(tmp_path / "out.safetensors")
    with pytest.raises(
        ConversionError, match=r"open_clip_config\.json beside the weights, or pass"
    ):
        convert.convert(bare, dst)
    with pytest.raises(
        ConversionError, match="describes a ViT image tower, the tensors hold a Mod"
    ):
        convert.convert(bare, dst, "ViT-B-32")
    with pytest.raises(ConversionError, match="Unknown open_clip model name 'RN51'"):
        convert.convert(bare, dst, "RN51")
    with pytest.raises(ConversionError, match=r"text_cfg\.width = 64, the tensors have 48"):
        open_clip_configs.MODEL_CONFIGS[tiny_rn_name]["text_cfg"]["width"] = 64
        convert.convert(bare, dst, tiny_rn_name)
    # an option our towers do not have
    folder = tmp_path / "attn_pool"
    folder.mkdir()
    os.symlink(oracle["dir"] / "vit_avg" / "open_clip_pytorch_model.bin", folder / "w.bin")
    with open(oracle["dir"] / "vit_avg" / "open_clip_config.json") as f:
        cfg = json.load(f)
    cfg["model_cfg"]["vision_cfg"]["attentional_pool"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="sets attentional_pool=True, which this converter"):
        convert.convert(str(folder), dst)
    # the CLI prints it as one line
    assert cli.main(["convert", bare, dst]) == cli.EXIT_USER_ERROR


def test_named_configs_are_open_clips(oracle):
    """The model configs known without open_clip are open_clip's own (`-quickgelu` too)."""
    drop_none = lambda d: {k: v for k, v in d.items() if v is not None}
    configs = oracle["model_configs"]
    assert set(open_clip_configs.MODEL_CONFIGS) <= set(configs)
    for name in open_clip_configs.MODEL_CONFIGS:
        for variant in (name, f"{name}-quickgelu") if f"{name}-quickgelu" in configs else (name,):
            ours, ref = open_clip_configs.named_config(variant), configs[variant]
            assert bool(ours.pop("quick_gelu")) == bool(ref.pop("quick_gelu", False)), variant
            assert ours.keys() == ref.keys(), variant
            for key in ours:
                a, b = ours[key], ref[key]
                assert (drop_none(a) if isinstance(a, dict) else a) == (
                    drop_none(b) if isinstance(b, dict) else b
                ), (variant, key)
