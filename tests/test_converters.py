"""Converters: the torch-free unpickler (formats, dtypes, views, refusal of code), and parity of
converted weights with the original implementations (transformers, torch used only as oracles
here) for HF BERT / CLIP / ViT / ResNet, timm ViT, torchvision ResNet and big_vision .npz."""

import json
import os
import pickle
import struct
import zipfile

import jax
import numpy as np
import pytest
import torch
import transformers
from jax_testing import jit_apply
from safetensors.numpy import load_file, save_file
from torch_testing import randomize

from xmodal_jax.data import bpe
from xmodal_jax.models import zoo
from xmodal_jax.transfer import checkpoint_io, convert, torch_layout, torch_pickle

RNG = np.random.RandomState(0)


def _randomize(model, seed=0):
    return randomize(model, seed, scale=0.15)


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= rel, f"relative error {err:.2e}"


def _build(meta):
    return zoo.build(meta["arch"], **meta["overrides"])


def _forward(meta, variables, *inputs):
    """The converted model's outputs in numpy, compiled once per architecture and input shape
    (models are hashable, so equal configs share the program)."""
    return jit_apply(_build(meta), variables, *inputs)


def _images(n=2, size=32):
    return RNG.randn(n, size, size, 3).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------------------------
# torch pickles


def test_torch_pickle_reads_zip_and_legacy_formats(tmp_path):
    base = torch.randn(4, 6)
    tensors = {
        "f32": torch.randn(3, 5),
        "transposed": base.t(),  # non-contiguous strides
        "slice": torch.arange(20, dtype=torch.int64)[3:11:2],  # offset + stride
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f16": torch.randn(4).half(),
        "bool": torch.tensor([True, False, True]),
        "uint8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "shares_base": base,
    }
    for zipped in (True, False):
        path = tmp_path / f"t_{zipped}.pth"
        torch.save(tensors, path, _use_new_zipfile_serialization=zipped)
        assert zipfile.is_zipfile(path) == zipped
        loaded = torch_pickle.load(path)
        for key, t in tensors.items():
            ref = t.detach()
            ref = ref.float().numpy() if ref.dtype == torch.bfloat16 else ref.numpy()
            got = loaded[key]
            assert got.shape == ref.shape, key
            np.testing.assert_array_equal(got.astype(ref.dtype), ref, err_msg=key)
        assert loaded["bf16"].dtype.name == "bfloat16"


def test_read_state_dict_unwraps_nested_and_dataparallel_checkpoints(tmp_path):
    sd = {"module.fc.weight": torch.randn(2, 3), "module.fc.bias": torch.randn(2)}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "ckpt.pth")
    got = checkpoint_io.read_state_dict(tmp_path / "ckpt.pth")
    assert sorted(got) == ["fc.bias", "fc.weight"]
    np.testing.assert_array_equal(got["fc.weight"], sd["module.fc.weight"].numpy())
    np.savez(tmp_path / "w.npz", **{"a/b": np.ones(3)})
    assert list(checkpoint_io.read_state_dict(tmp_path / "w.npz")) == ["a/b"]
    with pytest.raises(ValueError, match="Unrecognised weights file"):
        (tmp_path / "x.txt").write_text("hello")
        checkpoint_io.read_state_dict(tmp_path / "x.txt")


def _legacy_file(path, payload: bytes):
    with open(path, "wb") as f:
        for obj in (
            torch_pickle.LEGACY_MAGIC,
            torch_pickle.LEGACY_PROTOCOL,
            {"little_endian": True},
        ):
            pickle.dump(obj, f, protocol=2)
        f.write(payload)


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    # Hand-written protocol-2 pickle: GLOBAL 'os system', a command, TUPLE1, REDUCE.
    cmd = f"touch {marker}".encode()
    literal = b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(cmd)) + cmd + b"\x85R."
    dumped = pickle.dumps({"weight": _Evil(f"touch {marker}")}, protocol=2)  # posix.system
    for payload, name in ((literal, "os.system"), (dumped, f"{os.system.__module__}.system")):
        _legacy_file(tmp_path / "legacy.pth", payload)
        with zipfile.ZipFile(tmp_path / "zipped.pth", "w") as zf:
            zf.writestr("archive/data.pkl", payload)
        for file in ("legacy.pth", "zipped.pth"):
            with pytest.raises(
                torch_pickle.UnsafePickleError, match=name.replace(".", r"\.")
            ) as err:
                torch_pickle.load(tmp_path / file)
            assert "safetensors" in str(err.value)  # names the way out
    assert not marker.exists()
    pickle.loads(literal)  # the same bytes do run code under plain pickle
    assert marker.exists()


def test_restricted_unpickler_refuses_non_storage_persistent_ids(tmp_path):
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("module", "evil", "source code") if obj == "m" else None

    import io

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"m": "m"})
    _legacy_file(tmp_path / "m.pth", buf.getvalue())
    with pytest.raises(torch_pickle.UnsafePickleError, match="persistent id"):
        torch_pickle.load(tmp_path / "m.pth")


def test_unconverted_tensors_and_unknown_layouts_are_errors(tmp_path):
    model = _randomize(transformers.ResNetModel(_resnet_config("basic")))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["encoder.stages.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, tmp_path / "r.safetensors")
    with pytest.raises(torch_layout.ConversionError, match=r"encoder\.stages\.0\.extra\.weight"):
        convert.load_foreign(str(tmp_path / "r.safetensors"))
    save_file({"foo.weight": np.zeros(2, np.float32)}, tmp_path / "u.safetensors")
    with pytest.raises(ValueError, match="Unrecognised checkpoint layout"):
        convert.load_foreign(str(tmp_path / "u.safetensors"))


# --------------------------------------------------------------------------------------------
# BERT / MiniLM


def _bert_config(**kw):
    return transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=24,
        **kw,
    )


def _ids(n=3, length=12, vocab=99):
    ids = RNG.randint(1, vocab, size=(n, length)).astype(np.int64)
    ids[1, 7:] = 0
    ids[2, 10:] = 0
    return ids


def test_hf_bert_matches_transformers(tmp_path):
    model = _randomize(transformers.BertModel(_bert_config()))
    model.save_pretrained(tmp_path)
    ids, types = _ids(), RNG.randint(0, 2, size=(3, 12))
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy((ids != 0).astype(np.int64)),
            token_type_ids=torch.from_numpy(types),
        )
    variables, meta = convert.load_foreign(str(tmp_path))
    assert meta["source_format"] == "hf_bert" and meta["overrides"]["pool"] == "pooler"
    out = _forward(meta, variables, ids.astype(np.int32), types.astype(np.int32))
    _close(out["features"], ref.last_hidden_state)
    _close(out["pooled"], ref.pooler_output)


def test_hf_bert_with_prefix_and_lm_head_from_bin_file(tmp_path):
    lm = _randomize(transformers.BertForMaskedLM(_bert_config(hidden_act="gelu_new")), seed=1)
    torch.save(lm.state_dict(), tmp_path / "pytorch_model.bin")
    lm.config.to_json_file(tmp_path / "config.json")
    ids = _ids()
    with torch.no_grad():
        ref = lm.bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0))
    variables, meta = convert.load_foreign(str(tmp_path / "pytorch_model.bin"))
    assert meta["overrides"]["act"] == "gelu_tanh" and meta["overrides"]["pool"] == "cls"
    out = _forward(meta, variables, ids.astype(np.int32))
    _close(out["features"], ref.last_hidden_state)


# --------------------------------------------------------------------------------------------
# CLIP (+ its BPE tokenizer)


@pytest.mark.parametrize("eos_token_id", [2, 50])
def test_hf_clip_matches_transformers(tmp_path, eos_token_id):
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    text["eos_token_id"] = eos_token_id
    vision = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    model = _randomize(transformers.CLIPModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(np.log(20.0))
    model.save_pretrained(tmp_path)
    # the end-of-text token: the highest id (legacy eos_token_id=2) or the configured id 50
    end = 99 if eos_token_id == 2 else 50
    ids = RNG.randint(3, 50 if eos_token_id == 2 else 99, size=(3, 10)).astype(np.int64)
    ids[ids == 50] = 51
    ids[:, 0] = 1
    for row, pos in enumerate((9, 5, 7)):
        ids[row, pos] = end
        ids[row, pos + 1 :] = 0
    images = _images(2)
    with torch.no_grad():
        ref = model(
            input_ids=torch.from_numpy(ids),
            pixel_values=_nchw(images),
            attention_mask=torch.from_numpy((ids != 0).astype(np.int64)),
        )
    dst = str(tmp_path / "clip.safetensors")
    convert.convert(str(tmp_path), dst)
    variables, meta = checkpoint_io.load(dst)
    assert meta["arch"] == "clip" and np.isclose(meta["logit_scale"], np.log(20.0))
    zi = _forward(meta["image"], variables["image"], images)["pooled"]
    zt = _forward(meta["text"], variables["text"], ids.astype(np.int32))["pooled"]
    zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
    zt = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
    _close(zi, ref.image_embeds)
    _close(zt, ref.text_embeds)
    _close(np.exp(meta["logit_scale"]) * zi @ zt.T, ref.logits_per_image)
    from xmodal_jax import pretrained

    pair = pretrained.load(dst)
    _close(pair.text.encode_ids(ids), ref.text_embeds)


def test_hf_clip_preprocessing_matches_clip_image_processor(tmp_path):
    """A converted HF CLIP resizes and crops as transformers' CLIPImageProcessor: the shorter
    side to the image size (bicubic), a centre crop of that size, OpenAI mean / std."""
    import skimage.data

    from xmodal_jax import pretrained

    vision = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=16)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    transformers.CLIPModel(cfg).save_pretrained(tmp_path)
    dst = str(tmp_path / "clip.safetensors")
    convert.convert(str(tmp_path), dst)
    ours = pretrained.load(dst).image
    assert (ours.crop_fraction, ours.interpolation) == (1.0, "bicubic")
    proc = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    for name in ("chelsea", "coffee"):  # 300 x 451 and 400 x 600 photos
        img = getattr(skimage.data, name)()
        ref = proc(images=img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        diff = np.abs(ours.preprocess(img)[0] - ref) * np.asarray(ours.std)  # [0, 1] pixels
        # measured: mean 0.001, 99th percentile 0.0023, max 0.004 (a 0.875 crop: max 0.84)
        assert diff.mean() <= 0.002 and np.percentile(diff, 99) <= 0.005, name
        assert diff.max() <= 0.01, name


@pytest.mark.parametrize("projection", [False, True])
def test_hf_clip_towers_alone_match_transformers(tmp_path, projection):
    """`CLIPTextModel` / `CLIPVisionModel` folders (and their `...WithProjection` forms), each
    converted alone: `pooled` is HF's pooled output, or its projected embedding."""
    text = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=20, eos_token_id=50,
        bos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    vision = transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, projection_dim=20,
    )  # fmt: skip
    suffix = "WithProjection" if projection else ""
    text_model = _randomize(getattr(transformers, f"CLIPTextModel{suffix}")(text))
    vision_model = _randomize(getattr(transformers, f"CLIPVisionModel{suffix}")(vision))
    text_model.save_pretrained(tmp_path / "text")
    vision_model.save_pretrained(tmp_path / "vision")
    ids = RNG.randint(3, 99, size=(3, 10)).astype(np.int64)
    ids[ids == 50] = 51
    ids[:, -1] = 50  # the end-of-text token
    images = _images(2)
    with torch.no_grad():
        t_ref = text_model(input_ids=torch.from_numpy(ids))
        v_ref = vision_model(pixel_values=_nchw(images))
    t_ref = t_ref.text_embeds if projection else t_ref.pooler_output
    v_ref = v_ref.image_embeds if projection else v_ref.pooler_output

    variables, meta = convert.load_foreign(str(tmp_path / "text"))
    assert meta["source_format"] == "hf_clip_text"
    assert meta["overrides"]["proj_dim"] == (20 if projection else 0)
    _close(_forward(meta, variables, ids.astype(np.int32))["pooled"], t_ref)
    variables, meta = convert.load_foreign(str(tmp_path / "vision"))
    assert meta["source_format"] == "hf_clip_vision"
    assert meta["preprocess"]["mean"][0] == pytest.approx(0.48145466)  # CLIP's, not ImageNet's
    _close(_forward(meta, variables, images)["pooled"], v_ref)

    os.remove(tmp_path / "text" / "config.json")
    with pytest.raises(torch_layout.ConversionError, match="CLIP text tower needs its config"):
        convert.load_foreign(str(tmp_path / "text"))


def _bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable character table, written from its definition."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _reference_bpe(text, vocab, merges):
    """OpenAI CLIP's algorithm in plain python: clean, split, byte-map, merge by rank."""
    import regex

    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    table = _bytes_to_unicode()
    text = " ".join(text.split()).lower()
    pat = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [vocab["<|startoftext|>"]]
    for word in regex.findall(pat, text):
        chars = [table[b] for b in word.encode("utf-8")]
        parts = chars[:-1] + [chars[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [
                (ranks.get(p, 1e9), i) for i, p in enumerate(zip(parts, parts[1:], strict=False))
            ]
            rank, i = min(pairs)
            if rank == 1e9:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        ids += [vocab[p] for p in parts]
    return ids + [vocab["<|endoftext|>"]]


def test_clip_bpe_tokenizer_matches_reference_algorithm(tmp_path):
    chars = list(_bytes_to_unicode().values())
    merges = ["h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>", "t h", "th e</w>",
              "p h", "o t", "ph ot", "phot o</w>", "' s</w>"]  # fmt: skip
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate([*vocab, "<|startoftext|>", "<|endoftext|>"])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = bpe.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), 24)
    texts = ["Hello cat!", "a photo of the cat", "  The   CAT's 3 toys,  héllo ", "photo"]
    ids = tok.encode(texts)
    assert ids.shape == (4, 24) and ids.dtype == np.int32
    for row, text in zip(ids, texts, strict=True):
        ref = _reference_bpe(text, vocab, merges)
        assert list(row[: len(ref)]) == ref and not row[len(ref) :].any()
    assert tok.encode("the cat " * 20)[-1] == vocab["<|endoftext|>"]  # truncated, end kept


# --------------------------------------------------------------------------------------------
# ViT: HF, timm, big_vision


def _vit_config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                image_size=32, patch_size=8)  # fmt: skip
    return transformers.ViTConfig(**{**base, **kw})


def test_hf_vit_classifier_matches_transformers(tmp_path):
    cfg = _vit_config(num_labels=5, id2label={i: f"class{i}" for i in range(5)})
    model = _randomize(transformers.ViTForImageClassification(cfg))
    # `state_dict()` of transformers >= 5 (in-memory names), saved as a zip torch file
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    cfg.to_json_file(tmp_path / "config.json")
    images = _images(2)
    with torch.no_grad():
        logits = model(_nchw(images)).logits
        tokens = model.vit(_nchw(images)).last_hidden_state
    variables, meta = convert.load_foreign(str(tmp_path))
    assert meta["class_names"] == [f"class{i}" for i in range(5)]
    out = _forward(meta, variables, images)
    _close(out["features"], tokens)
    _close(out["logits"], logits)


def test_hf_vit_without_config_json_asks_for_its_heads(tmp_path):
    """Width 32 with 4 heads: 8-wide heads, which no width-based rule would give."""
    model = _randomize(transformers.ViTModel(_vit_config(), add_pooling_layer=False))
    model.save_pretrained(tmp_path / "hf_vit")
    os.remove(tmp_path / "hf_vit" / "config.json")
    with pytest.raises(torch_layout.ConversionError, match="heads of this ViT.*'vit_b16'"):
        convert.load_foreign(str(tmp_path / "hf_vit"))


def _vit_reference(tmp_path, **cfg):
    """HF ViT outputs and its weights under the hub's names (as `save_pretrained` writes)."""
    model = _randomize(transformers.ViTModel(_vit_config(**cfg), add_pooling_layer=False))
    images = _images(2)
    with torch.no_grad():
        tokens = model(_nchw(images)).last_hidden_state.numpy()
    model.save_pretrained(tmp_path / "hf_vit")
    return load_file(tmp_path / "hf_vit" / "model.safetensors"), images, tokens


def test_timm_vit_layout_matches_transformers(tmp_path):
    # timm's layout built by hand from HF's (a legacy torch pickle), "tiny" size (width 192, 3
    # heads); the head count is not in the tensors, so it comes from the model name in timm's
    # config.json (or arch=...). timm itself is the oracle in test_timm_oracle.py.
    sd, images, tokens = _vit_reference(tmp_path, hidden_size=192, num_attention_heads=3,
                                        intermediate_size=96, layer_norm_eps=1e-6)  # fmt: skip
    timm = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(2):
        h, t = f"encoder.layer.{i}", f"blocks.{i}"
        a = f"{h}.attention.attention"
        for leaf in ("weight", "bias"):
            timm[f"{t}.attn.qkv.{leaf}"] = np.concatenate(
                [sd[f"{a}.{n}.{leaf}"] for n in ("query", "key", "value")]
            )
            timm[f"{t}.attn.proj.{leaf}"] = sd[f"{h}.attention.output.dense.{leaf}"]
            timm[f"{t}.norm1.{leaf}"] = sd[f"{h}.layernorm_before.{leaf}"]
            timm[f"{t}.norm2.{leaf}"] = sd[f"{h}.layernorm_after.{leaf}"]
            timm[f"{t}.mlp.fc1.{leaf}"] = sd[f"{h}.intermediate.dense.{leaf}"]
            timm[f"{t}.mlp.fc2.{leaf}"] = sd[f"{h}.output.dense.{leaf}"]
    folder = tmp_path / "timm_vit"
    folder.mkdir()
    path = folder / "pytorch_model.bin"
    torch.save(
        {k: torch.from_numpy(v) for k, v in timm.items()},
        path,
        _use_new_zipfile_serialization=False,
    )
    # Without a name, never a guess (width // 64 would give 3 here by luck, 20 for ViT-H/14).
    refused = torch_layout.ConversionError
    with pytest.raises(refused, match=r"heads of this timm ViT \(width 192\).*--arch"):
        convert.load_foreign(str(path))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_224"}))
    with pytest.raises(refused, match=r"names 'vit_base_patch16_224' \(width 768\)"):
        convert.load_foreign(str(folder))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224.x"}))
    variables, meta = convert.load_foreign(str(folder))
    assert meta["source_format"] == "timm_vit" and meta["overrides"]["num_heads"] == 3
    _close(_forward(meta, variables, images)["features"], tokens)


def _big_vision_npz(sd, layout, depth=2, heads=4):
    """HF ViT weights written with big_vision (or vision_transformer) names and shapes."""
    d = sd["embeddings.cls_token"].shape[-1]
    pos, cls = sd["embeddings.position_embeddings"], sd["embeddings.cls_token"]
    out = {
        "embedding/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(
            2, 3, 1, 0
        ),
        "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
        "Transformer/encoder_norm/scale": sd["layernorm.weight"],
        "Transformer/encoder_norm/bias": sd["layernorm.bias"],
    }
    if layout == "vision_transformer":  # cls concatenated first, posemb has its row
        out["cls"], out["Transformer/posembed_input/pos_embedding"] = cls, pos
        names = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3")
    else:  # posemb added before the cls token, which gets none
        out["cls"], out["pos_embedding"] = cls + pos[:, :1], pos[:, 1:]
        names = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = []
    for i in range(depth):
        h, a = f"encoder.layer.{i}", f"encoder.layer.{i}.attention"
        ln0, mha, ln1, mlp = names
        b = {
            f"{ln0}/scale": sd[f"{h}.layernorm_before.weight"],
            f"{ln0}/bias": sd[f"{h}.layernorm_before.bias"],
            f"{ln1}/scale": sd[f"{h}.layernorm_after.weight"],
            f"{ln1}/bias": sd[f"{h}.layernorm_after.bias"],
            f"{mlp}/Dense_0/kernel": sd[f"{h}.intermediate.dense.weight"].T,
            f"{mlp}/Dense_0/bias": sd[f"{h}.intermediate.dense.bias"],
            f"{mlp}/Dense_1/kernel": sd[f"{h}.output.dense.weight"].T,
            f"{mlp}/Dense_1/bias": sd[f"{h}.output.dense.bias"],
            f"{mha}/out/kernel": sd[f"{a}.output.dense.weight"].T.reshape(heads, d // heads, d),
            f"{mha}/out/bias": sd[f"{a}.output.dense.bias"],
        }
        for n in ("query", "key", "value"):
            b[f"{mha}/{n}/kernel"] = sd[f"{a}.attention.{n}.weight"].T.reshape(d, heads, d // heads)
            b[f"{mha}/{n}/bias"] = sd[f"{a}.attention.{n}.bias"].reshape(heads, d // heads)
        blocks.append(b)
    if layout == "scanned":
        for key in blocks[0]:
            out[f"Transformer/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in b.items()})
    return out


@pytest.mark.parametrize("layout", ["big_vision", "scanned", "vision_transformer"])
def test_big_vision_npz_matches_transformers(tmp_path, layout):
    # flax nn.gelu is the tanh approximation ('gelu_new' in transformers); LayerNorm eps 1e-6
    sd, images, tokens = _vit_reference(tmp_path, hidden_act="gelu_new", layer_norm_eps=1e-6)
    arrays = _big_vision_npz(sd, layout)
    if layout == "big_vision":
        arrays = {f"params/{k}": v for k, v in arrays.items()}  # saved with the optax state
    np.savez(tmp_path / "vit.npz", **arrays)
    dst = tmp_path / "converted.safetensors"
    convert.convert(str(tmp_path / "vit.npz"), str(dst))
    variables, meta = checkpoint_io.load(dst)
    assert meta["source_format"] == "big_vision_vit" and meta["overrides"]["pool"] == "cls"
    _close(_forward(meta, variables, images)["features"], tokens)


def test_big_vision_map_head_round_trip(tmp_path):
    """A MAP-pooled, class-token-free file: every array lands at its documented place."""
    rng = np.random.RandomState(1)
    d, h, hd, m = 16, 2, 8, 24
    arr = lambda *s: rng.randn(*s).astype(np.float32)
    mha = lambda p: (
        {f"{p}/{n}/kernel": arr(d, h, hd) for n in ("query", "key", "value")}
        | {f"{p}/{n}/bias": arr(h, hd) for n in ("query", "key", "value")}
        | {f"{p}/out/kernel": arr(h, hd, d), f"{p}/out/bias": arr(d)}
    )
    mlp = lambda p: {f"{p}/Dense_0/kernel": arr(d, m), f"{p}/Dense_0/bias": arr(m),
                     f"{p}/Dense_1/kernel": arr(m, d), f"{p}/Dense_1/bias": arr(d)}  # fmt: skip
    ln = lambda p: {f"{p}/scale": arr(d), f"{p}/bias": arr(d)}
    src = {
        "embedding/kernel": arr(8, 8, 3, d),
        "embedding/bias": arr(d),
        "pos_embedding": arr(1, 16, d),
    }
    blk = "Transformer/encoderblock_0"
    src |= ln(f"{blk}/LayerNorm_0") | mha(f"{blk}/MultiHeadDotProductAttention_0")
    src |= ln(f"{blk}/LayerNorm_1") | mlp(f"{blk}/MlpBlock_0") | ln("Transformer/encoder_norm")
    src |= {"MAPHead_0/probe": arr(1, 1, d)} | mha("MAPHead_0/MultiHeadDotProductAttention_0")
    src |= ln("MAPHead_0/LayerNorm_0") | mlp("MAPHead_0/MlpBlock_0")
    src |= {"head/kernel": arr(d, 7), "head/bias": arr(7)}
    np.savez(tmp_path / "map.npz", **src)
    variables, meta = convert.load_foreign(str(tmp_path / "map.npz"))
    assert meta["overrides"]["pool"] == "map" and meta["overrides"]["num_classes"] == 7
    ours = checkpoint_io.flatten(variables)
    rename = [("Transformer/encoder_norm", "norm"),
              ("Transformer/encoderblock_0", "encoder/layer_0"), ("MAPHead_0", "map_head"),
              ("MultiHeadDotProductAttention_0", "attn"),
              ("MlpBlock_0/Dense_0", "mlp/fc1"), ("MlpBlock_0/Dense_1", "mlp/fc2")]  # fmt: skip
    for key, value in src.items():
        mine = key
        for a, b in rename:
            mine = mine.replace(a, b)
        block_norms = ("LayerNorm_0", "norm1") if "layer_0" in mine else ("LayerNorm_0", "norm")
        mine = mine.replace(*block_norms).replace("LayerNorm_1", "norm2")
        np.testing.assert_array_equal(ours[f"params/{mine}"], value, err_msg=key)
    assert len(ours) == len(src)
    out = _forward(meta, variables, _images(1))
    assert out["logits"].shape == (1, 7)


# --------------------------------------------------------------------------------------------
# ResNet: HF and torchvision layouts


def _resnet_config(block):
    hidden = [8, 16, 32, 64] if block == "basic" else [32, 64, 128, 256]
    return transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=hidden, depths=[1, 2, 1, 1], layer_type=block
    )


def _torchvision_names(sd, block):
    out = {}
    for key, value in sd.items():
        k = key.replace("embedder.embedder.convolution", "conv1")
        k = k.replace("embedder.embedder.normalization", "bn1")
        parts = k.split(".")
        if parts[0] == "encoder":  # encoder.stages.i.layers.j.(layer.k|shortcut).(conv|norm)
            i, j = int(parts[2]) + 1, parts[4]
            if parts[5] == "shortcut":
                n = "0" if parts[6] == "convolution" else "1"
                k = f"layer{i}.{j}.downsample.{n}.{'.'.join(parts[7:])}"
            else:
                c = int(parts[6]) + 1
                n = f"conv{c}" if parts[7] == "convolution" else f"bn{c}"
                k = f"layer{i}.{j}.{n}.{'.'.join(parts[8:])}"
        out[k] = value
    return out


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_hf_and_torchvision_resnet_match_transformers(tmp_path, block):
    model = _randomize(transformers.ResNetModel(_resnet_config(block)))
    model.save_pretrained(tmp_path / "hf")
    images = _images(2)
    with torch.no_grad():
        ref = model(_nchw(images))
    variables, meta = convert.load_foreign(str(tmp_path / "hf"))
    assert meta["overrides"]["stage_sizes"] == (1, 2, 1, 1)
    out = _forward(meta, variables, images)
    _close(out["features"], ref.last_hidden_state.numpy().transpose(0, 2, 3, 1))
    _close(out["pooled"], ref.pooler_output.numpy()[:, :, 0, 0])
    # the same weights under torchvision's names, in a legacy (non-zip) torch file
    tv = _torchvision_names(model.state_dict(), block)
    torch.save(tv, tmp_path / "tv.pth", _use_new_zipfile_serialization=False)
    variables_tv, meta_tv = convert.load_foreign(str(tmp_path / "tv.pth"))
    assert meta_tv["source_format"] == "torchvision_resnet"
    out_tv = _forward(meta_tv, variables_tv, images)
    _close(out_tv["pooled"], ref.pooler_output.numpy()[:, :, 0, 0])
    assert jax.tree.structure(variables_tv) == jax.tree.structure(variables)
    # a converted file (custom stage sizes in its JSON metadata) loads as a tower
    from xmodal_jax import pretrained

    convert.convert(str(tmp_path / "hf"), str(tmp_path / "r.safetensors"))
    enc = pretrained.load(str(tmp_path / "r.safetensors"), image_size=32, crop_fraction=1.0)
    uint8 = (RNG.rand(2, 32, 32, 3) * 255).astype(np.uint8)
    ref_pooled = _forward(meta, variables, enc.preprocess(uint8))["pooled"]
    _close(enc.encode(uint8), ref_pooled, rel=1e-5)
