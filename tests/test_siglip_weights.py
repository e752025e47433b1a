"""SigLIP and LiT weights: HF `SiglipModel` folders (and its towers alone) and big_vision
two-tower `.npz` files convert into towers whose embeddings and pair scores
`exp(t) * cos + b` equal transformers' (torch and transformers are test-only oracles). The
`.npz` files are written here from a random HF model under big_vision's names, so the HF model
is an independent reference for that converter too."""

import json

import numpy as np
import pytest
import torch
import transformers
from jax_testing import jit_apply
from safetensors.numpy import load_file, save_file
from test_converters import _close, _nchw, _randomize

from xmodal_jax import pretrained
from xmodal_jax.errors import UserError
from xmodal_jax.models import zoo
from xmodal_jax.transfer import checkpoint_io, convert, torch_layout

RNG = np.random.RandomState(0)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=24, projection_size=24,
            pad_token_id=1, bos_token_id=None, eos_token_id=1)  # fmt: skip
# 3 heads of width 8: no width-based rule (width // 64, ...) would give it.
VISION = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=3,
              image_size=32, patch_size=8)  # fmt: skip
SCALE, BIAS = np.log(10.0), -3.0


def _siglip(folder):
    cfg = transformers.SiglipConfig(text_config=TEXT, vision_config=VISION)
    model = _randomize(transformers.SiglipModel(cfg))
    with torch.no_grad():
        model.logit_scale.fill_(SCALE)
        model.logit_bias.fill_(BIAS)
    model.save_pretrained(folder)
    return model


def _inputs(n_texts=3):
    """Token ids padded to the full context as SigLIP pads them (`</s>` = 1), and images in
    [0, 1] at the model's size (HF sees them normalised to [-1, 1])."""
    ids = RNG.randint(2, 100, size=(n_texts, 24))
    for row, end in enumerate((4, 11, 7)[:n_texts]):
        ids[row, end:] = 1
    images = RNG.uniform(0, 1, size=(2, 32, 32, 3)).astype(np.float32)
    return ids, images


def _reference(model, ids, images):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), pixel_values=_nchw((images - 0.5) / 0.5))


def _forward(meta, variables, x):
    return jit_apply(zoo.build(meta["arch"], **meta["overrides"]), variables, x)


def _unit(z):
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def test_hf_siglip_matches_transformers(tmp_path):
    model = _siglip(tmp_path / "hf")
    ids, images = _inputs()
    ref = _reference(model, ids, images)
    dst = tmp_path / "siglip.safetensors"
    convert.convert(str(tmp_path / "hf"), str(dst))
    variables, meta = checkpoint_io.load(dst)
    assert meta["arch"] == "siglip" and meta["source_format"] == "hf_siglip"
    assert np.isclose(meta["logit_scale"], SCALE) and np.isclose(meta["logit_bias"], BIAS)
    assert variables["logit_bias"].item() == pytest.approx(BIAS)
    image, text = meta["image"]["overrides"], meta["text"]["overrides"]
    assert image["pool"] == "map" and image["num_heads"] == 3
    assert meta["text"]["arch"] == "siglip_text_b" and text["pool"] == "last"
    zi = _forward(meta["image"], variables["image"], (images - 0.5) / 0.5)["pooled"]
    zt = _forward(meta["text"], variables["text"], ids.astype(np.int32))["pooled"]
    _close(_unit(zi), ref.image_embeds, 1e-5)
    _close(_unit(zt), ref.text_embeds, 1e-5)

    # pretrained.load: SigLIP's preprocessing from the metadata (no crop, mean = std = 0.5)
    pair = pretrained.load(str(dst))
    assert isinstance(pair, pretrained.SigLIPEncoders) and pair.image.crop_fraction == 1.0
    logits = pair.logits_ids(images, ids)
    _close(logits, ref.logits_per_image, 1e-5)
    assert np.abs(logits - ref.logits_per_image.numpy()).max() < 1e-4
    # the last position is pooled, padding included: encode_ids must not trim it (not even
    # all-zero columns, which it drops for the towers that mask their padding)
    _close(pair.text.encode_ids(ids), ref.text_embeds, 1e-5)
    zeros = np.where(ids == 1, 0, ids)
    _close(pair.text.encode_ids(zeros), _reference(model, zeros, images).text_embeds, 1e-5)
    # no tokenizer.json came with the folder: texts need one, and the error says what to add
    with pytest.raises(UserError, match=r"tokenizer\.json.*spiece\.model.*encode_ids"):
        pair.logits(images, ["a photo of a cat"])


def _tokenizer_json(path):
    """A small word-level tokenizer.json in SigLIP's shape: lower-cased words, `</s>` appended
    (id 1, also the padding), `<unk>` for unknown words."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "two", "the"]
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(90)])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.post_processor = eos
    tok.save(str(path))


def test_siglip_tokenizer_json_pads_and_scores_as_transformers(tmp_path):
    model = _siglip(tmp_path / "hf")
    _tokenizer_json(tmp_path / "hf" / "tokenizer.json")
    texts = ["A photo of a cat", "two dogs", " ".join(["the cat"] * 15)]  # the last is truncated
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"), pad_token="</s>"
    )
    ids = hf_tok(texts, padding="max_length", max_length=24, truncation=True)["input_ids"]
    ids = np.asarray(ids)
    assert ids[0, 5:].tolist() == [1] * 19 and ids[2, -1] == 1  # padded; </s> kept on truncation
    _, images = _inputs()
    ref = _reference(model, ids, images)

    pair = pretrained.load(str(tmp_path / "hf"))  # converted in memory
    np.testing.assert_array_equal(pair.text.tokenize(texts), ids)
    _close(pair.logits(images, texts), ref.logits_per_image, 1e-5)
    probs = pair.probabilities(images, texts)
    _close(probs, torch.sigmoid(ref.logits_per_image), 1e-5)


@pytest.mark.parametrize("keys", ["bare", "prefixed"])
def test_hf_siglip_towers_alone_match_transformers(tmp_path, keys):
    """`SiglipTextModel` / `SiglipVisionModel` folders: keys bare (transformers 5) or under
    `text_model.` / `vision_model.` (hub files); `pooled` is transformers' pooler output."""
    text = transformers.SiglipTextModel(transformers.SiglipTextConfig(**TEXT))
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION))
    text, vision = _randomize(text, 1), _randomize(vision, 2)
    ids, images = _inputs()
    for name, model in (("text", text), ("vision", vision)):
        folder = tmp_path / name
        model.save_pretrained(folder)
        if keys == "prefixed":
            tensors = load_file(folder / "model.safetensors")
            save_file({f"{name}_model.{k}": v for k, v in tensors.items()},
                      folder / "model.safetensors")  # fmt: skip
    with torch.no_grad():
        t_ref = text(input_ids=torch.from_numpy(ids)).pooler_output
        v_ref = vision(pixel_values=_nchw(images)).pooler_output
    variables, meta = convert.load_foreign(str(tmp_path / "text"))
    assert meta["source_format"] == "hf_siglip_text" and meta["overrides"]["num_heads"] == 4
    _close(_forward(meta, variables, ids.astype(np.int32))["pooled"], t_ref, 1e-5)
    variables, meta = convert.load_foreign(str(tmp_path / "vision"))
    assert meta["source_format"] == "hf_siglip_vision" and meta["preprocess"]["mean"] == [0.5] * 3
    _close(_forward(meta, variables, images)["pooled"], v_ref, 1e-5)

    # the heads are not in the tensors: without config.json, one error that says what to add
    (tmp_path / "text" / "config.json").unlink()
    with pytest.raises(torch_layout.ConversionError, match="needs its config.json"):
        convert.load_foreign(str(tmp_path / "text"))


# --------------------------------------------------------------------------------------------
# big_vision two towers, written from the HF model under big_vision's names


def _bv_block(sd, src, heads, names):
    """One HF encoder layer (`src`) as a big_vision `Encoder1DBlock`."""
    d = sd[f"{src}.layer_norm1.weight"].shape[0]
    ln0, mha, ln1, mlp = names
    out = {
        f"{ln0}/scale": sd[f"{src}.layer_norm1.weight"],
        f"{ln0}/bias": sd[f"{src}.layer_norm1.bias"],
        f"{ln1}/scale": sd[f"{src}.layer_norm2.weight"],
        f"{ln1}/bias": sd[f"{src}.layer_norm2.bias"],
        f"{mlp}/Dense_0/kernel": sd[f"{src}.mlp.fc1.weight"].T,
        f"{mlp}/Dense_0/bias": sd[f"{src}.mlp.fc1.bias"],
        f"{mlp}/Dense_1/kernel": sd[f"{src}.mlp.fc2.weight"].T,
        f"{mlp}/Dense_1/bias": sd[f"{src}.mlp.fc2.bias"],
        f"{mha}/out/kernel": sd[f"{src}.self_attn.out_proj.weight"].T.reshape(heads, -1, d),
        f"{mha}/out/bias": sd[f"{src}.self_attn.out_proj.bias"],
    }
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{mha}/{ours}/kernel"] = sd[f"{src}.self_attn.{theirs}.weight"].T.reshape(d, heads, -1)
        out[f"{mha}/{ours}/bias"] = sd[f"{src}.self_attn.{theirs}.bias"].reshape(heads, -1)
    return out


def _bv_encoder(sd, src, dst, heads, depth, scanned):
    names = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")
    blocks = [_bv_block(sd, f"{src}.layers.{i}", heads, names) for i in range(depth)]
    if scanned:  # nn.scan: one block with a leading depth axis
        return {f"{dst}/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]}
    return {f"{dst}/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()}


def _big_vision_npz(sd, scanned):
    """big_vision two_towers params (`img/` ViT with MAP head, `txt/` text_transformer, `t`,
    `b`) holding the HF SigLIP weights `sd`."""
    h_img, h_txt = VISION["num_attention_heads"], TEXT["num_attention_heads"]
    v, t = "vision_model", "text_model"
    out = {
        "img/embedding/kernel": sd[f"{v}.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
        "img/embedding/bias": sd[f"{v}.embeddings.patch_embedding.bias"],
        "img/pos_embedding": sd[f"{v}.embeddings.position_embedding.weight"][None],
        "img/Transformer/encoder_norm/scale": sd[f"{v}.post_layernorm.weight"],
        "img/Transformer/encoder_norm/bias": sd[f"{v}.post_layernorm.bias"],
        "img/MAPHead_0/probe": sd[f"{v}.head.probe"],
        "img/MAPHead_0/LayerNorm_0/scale": sd[f"{v}.head.layernorm.weight"],
        "img/MAPHead_0/LayerNorm_0/bias": sd[f"{v}.head.layernorm.bias"],
        "txt/Embed_0/embedding": sd[f"{t}.embeddings.token_embedding.weight"],
        "txt/pos_embedding": sd[f"{t}.embeddings.position_embedding.weight"][None],
        "txt/Encoder_0/encoder_norm/scale": sd[f"{t}.final_layer_norm.weight"],
        "txt/Encoder_0/encoder_norm/bias": sd[f"{t}.final_layer_norm.bias"],
        "txt/head/kernel": sd[f"{t}.head.weight"].T,
        "txt/head/bias": sd[f"{t}.head.bias"],
        "t": sd["logit_scale"].reshape(1),
        "b": sd["logit_bias"].reshape(1),
    }
    out |= _bv_encoder(sd, f"{v}.encoder", "img/Transformer", h_img, 2, scanned)
    out |= _bv_encoder(sd, f"{t}.encoder", "txt/Encoder_0", h_txt, 2, scanned)
    d = VISION["hidden_size"]
    w, b = sd[f"{v}.head.attention.in_proj_weight"], sd[f"{v}.head.attention.in_proj_bias"]
    mha = "img/MAPHead_0/MultiHeadDotProductAttention_0"
    for i, name in enumerate(("query", "key", "value")):
        out[f"{mha}/{name}/kernel"] = w[i * d : (i + 1) * d].T.reshape(d, h_img, -1)
        out[f"{mha}/{name}/bias"] = b[i * d : (i + 1) * d].reshape(h_img, -1)
    wo = sd[f"{v}.head.attention.out_proj.weight"]
    out[f"{mha}/out/kernel"] = wo.T.reshape(h_img, -1, d)
    out[f"{mha}/out/bias"] = sd[f"{v}.head.attention.out_proj.bias"]
    for i in (0, 1):
        out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/kernel"] = sd[f"{v}.head.mlp.fc{i + 1}.weight"].T
        out[f"img/MAPHead_0/MlpBlock_0/Dense_{i}/bias"] = sd[f"{v}.head.mlp.fc{i + 1}.bias"]
    return out


@pytest.mark.parametrize("layout", ["unscanned", "scanned"])
def test_big_vision_siglip_npz_matches_transformers(tmp_path, layout):
    model = _siglip(tmp_path / "hf")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = _big_vision_npz(sd, scanned=layout == "scanned")
    if layout == "scanned":  # as saved with the optimiser state
        arrays = {f"params/{k}": v for k, v in arrays.items()}
    np.savez(tmp_path / "siglip.npz", **arrays)
    ids, images = _inputs()
    ref = _reference(model, ids, images)
    dst = tmp_path / "siglip.safetensors"
    convert.convert(str(tmp_path / "siglip.npz"), str(dst))
    variables, meta = checkpoint_io.load(dst)
    assert meta["arch"] == "siglip" and meta["source_format"] == "big_vision_two_towers"
    assert meta["text"]["overrides"]["num_heads"] == 4
    assert meta["image"]["overrides"]["num_heads"] == 3
    zi = _forward(meta["image"], variables["image"], (images - 0.5) / 0.5)["pooled"]
    zt = _forward(meta["text"], variables["text"], ids.astype(np.int32))["pooled"]
    _close(_unit(zi), ref.image_embeds, 1e-5)
    _close(_unit(zt), ref.text_embeds, 1e-5)
    pair = pretrained.load(str(dst))
    _close(pair.logits_ids(images, ids), ref.logits_per_image, 1e-5)
    with pytest.raises(UserError, match="no tokenizer"):
        pair.text.encode(["a photo"])


def test_big_vision_lit_npz_is_a_clip_style_pair(tmp_path):
    """LiT: no bias `b`, a projection head with bias on the image tower; scored by softmax over
    `exp(t) * cos`, so it loads as `CLIPEncoders`."""
    model = _siglip(tmp_path / "hf")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = _big_vision_npz(sd, scanned=False)
    del arrays["b"]
    kernel, bias = RNG.randn(24, 16).astype(np.float32), RNG.randn(16).astype(np.float32)
    arrays |= {"img/head/kernel": kernel, "img/head/bias": bias}
    arrays["txt/head/kernel"] = RNG.randn(32, 16).astype(np.float32)
    arrays["txt/head/bias"] = RNG.randn(16).astype(np.float32)
    np.savez(tmp_path / "lit.npz", **arrays)
    ids, images = _inputs()
    with torch.no_grad():
        x = _nchw((images - 0.5) / 0.5)
        zi = model.vision_model(pixel_values=x).pooler_output.numpy() @ kernel + bias
        last = model.text_model(input_ids=torch.from_numpy(ids)).last_hidden_state[:, -1]
    zt = last.numpy() @ arrays["txt/head/kernel"] + arrays["txt/head/bias"]
    ref = np.exp(SCALE) * _unit(zi) @ _unit(zt).T

    variables, meta = convert.load_foreign(str(tmp_path / "lit.npz"))
    assert meta["arch"] == "clip" and "logit_bias" not in meta and "logit_bias" not in variables
    assert meta["image"]["overrides"]["proj_bias"] and meta["image"]["overrides"]["proj_dim"] == 16
    pair = pretrained.load(str(tmp_path / "lit.npz"))
    assert type(pair) is pretrained.CLIPEncoders
    zi_ours = pair.image.encode(images)
    _close(_unit(zi_ours) @ pair.text.encode_ids(ids).T * np.exp(pair.logit_scale), ref, 1e-5)


def test_big_vision_two_towers_refuses_what_it_cannot_convert(tmp_path):
    model = _siglip(tmp_path / "hf")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    arrays = _big_vision_npz(sd, scanned=False)
    np.savez(tmp_path / "extra.npz", **arrays, **{"opt/mu": np.zeros(3, np.float32)})
    with pytest.raises(torch_layout.ConversionError, match="outside img/, txt/, t and b.*opt/mu"):
        convert.load_foreign(str(tmp_path / "extra.npz"))
    bert = {k: v for k, v in arrays.items() if not k.startswith("txt/")}
    bert["txt/BertModel_0/embeddings/word_embeddings/embedding"] = np.zeros((5, 4), np.float32)
    np.savez(tmp_path / "bert.npz", **bert)
    with pytest.raises(torch_layout.ConversionError, match="not big_vision's text_transformer"):
        convert.load_foreign(str(tmp_path / "bert.npz"))


def test_siglip_tokenizer_without_padding_says_what_to_add(tmp_path):
    from xmodal_jax.transfer import from_siglip

    _tokenizer_json(tmp_path / "tokenizer.json")
    text = (tmp_path / "tokenizer.json").read_text()
    meta = from_siglip.tokenizer_meta(text, 24, None)
    assert meta["type"] == "unavailable" and '"padding"' in meta["reason"]
    padded = json.loads(text) | {"padding": {"pad_id": 0, "pad_token": "<pad>"}}
    meta = from_siglip.tokenizer_meta(json.dumps(padded), 24, 1)
    assert meta["type"] == "tokenizer_json" and meta["pad_id"] == 0  # the file's own padding
