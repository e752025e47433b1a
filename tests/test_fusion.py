"""Fusion heads and the ITM objective: shapes, gradients, float64 numpy forwards, masking."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xmodal_jax.models import fusion
from xmodal_jax.models.fusion import itm_head
from xmodal_jax.objectives import itm

B, DI, DT, NI, NT, OUT = 4, 6, 5, 3, 4, 3
LOGICAL = {"embed", "mlp", "heads", "kv", "classes", "norm", None}

CONFIGS = {
    "concat_mlp": dict(hidden_dim=8, num_hidden_layers=2, dropout_rate=0.1),
    "late_fusion": dict(weights=(0.3, 0.7)),
    "gated": dict(),
    "film": dict(hidden_dim=8, num_blocks=2),
    "bilinear": dict(rank=8, dropout_rate=0.1),
    "cross_attention": dict(width=8, num_layers=2, num_heads=2, mlp_dim=16, dropout_rate=0.1),
}


@pytest.fixture(scope="module")
def inputs():
    r = np.random.default_rng(0)
    mask = np.ones((B, NT), bool)
    mask[0, 2:] = False
    mask[3, 1:] = False
    return dict(
        image_feats=r.normal(size=(B, DI)).astype(np.float32),
        text_feats=r.normal(size=(B, DT)).astype(np.float32),
        image_tokens=r.normal(size=(B, NI, DI)).astype(np.float32),
        text_tokens=r.normal(size=(B, NT, DT)).astype(np.float32),
        text_mask=mask,
    )


# The heads are hashable modules, so they are static arguments: one compile per head config,
# input structure and mode, shared by the tests that build the same head.
@functools.partial(jax.jit, static_argnums=0, static_argnames="train")
def _call(head, params, x, *, train=False, rngs=None):
    x = dict(x)
    args = (x.pop("image_feats"), x.pop("text_feats"))
    return head.apply({"params": params}, *args, **x, train=train, rngs=rngs)


@functools.partial(jax.jit, static_argnums=0)
def _init(head, x):
    x = dict(x)
    args = (x.pop("image_feats"), x.pop("text_feats"))
    return head.init(jax.random.key(0), *args, **x)["params"]


def test_registry_covers_all_heads():
    assert set(fusion.HEADS) == set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_head_builds_shapes_logical_axes_and_finite_grads(name, inputs):
    head = fusion.build(name, out_dim=OUT, **CONFIGS[name])
    boxed = _init(head, inputs)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), name
        assert leaf.value.ndim == len(leaf.names) and set(leaf.names) <= LOGICAL
    params = nn.unbox(boxed)

    no_tokens = {k: inputs[k] for k in ("image_feats", "text_feats")}
    for x in (inputs, no_tokens):
        out = _call(head, params, x)
        assert out["fused"].shape == (B, OUT)
        assert np.all(np.isfinite(out["fused"]))

    def loss(params, image_feats, text_tokens):
        x = dict(inputs, image_feats=image_feats, text_tokens=text_tokens)
        out = _call(head, params, x, train=True, rngs={"dropout": jax.random.key(1)})
        return jnp.sum(jnp.square(out["fused"]))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        params, inputs["image_feats"], inputs["text_tokens"]
    )
    grads = jax.device_get(grads)  # checked in numpy: no eager op per gradient shape
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads[0]))


# ---- float64 numpy forwards with the same params -------------------------------------------


def _np(params):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def _lin(p, x):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _f64(inputs, *keys):
    return [np.asarray(inputs[k], np.float64) for k in keys]


def test_concat_mlp_matches_numpy(inputs):
    head = fusion.build("concat_mlp", out_dim=OUT, hidden_dim=8, num_hidden_layers=2)
    params = nn.unbox(_init(head, inputs))
    p = _np(params)
    xi, xt = _f64(inputs, "image_feats", "text_feats")
    h = np.maximum(_lin(p["hidden_0"], np.concatenate([xi, xt], -1)), 0)
    h = np.maximum(_lin(p["hidden_1"], h), 0)
    np.testing.assert_allclose(
        _call(head, params, inputs)["fused"], _lin(p["out"], h), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("combine", ["logits", "log_probs"])
def test_late_fusion_matches_numpy(inputs, combine):
    head = fusion.build("late_fusion", out_dim=OUT, weights=(1.0, 3.0), combine=combine)
    params = nn.unbox(_init(head, inputs))
    p = _np(params)
    xi, xt = _f64(inputs, "image_feats", "text_feats")
    si, st = _lin(p["image_classifier"], xi), _lin(p["text_classifier"], xt)
    if combine == "log_probs":
        si = si - np.log(np.exp(si).sum(-1, keepdims=True))
        st = st - np.log(np.exp(st).sum(-1, keepdims=True))
    ref = 0.25 * si + 0.75 * st
    np.testing.assert_allclose(_call(head, params, inputs)["fused"], ref, rtol=1e-5, atol=1e-6)


def test_gated_matches_numpy(inputs):
    head = fusion.build("gated", out_dim=OUT)
    params = nn.unbox(_init(head, inputs))
    p = _np(params)
    assert "bias" not in p["gate"]
    xi, xt = _f64(inputs, "image_feats", "text_feats")
    hv, ht = np.tanh(xi @ p["image_proj"]["kernel"]), np.tanh(xt @ p["text_proj"]["kernel"])
    z = _sigmoid(np.concatenate([xi, xt], -1) @ p["gate"]["kernel"])
    out = _call(head, params, inputs)
    np.testing.assert_allclose(out["fused"], z * hv + (1 - z) * ht, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["gate"], z, rtol=1e-5, atol=1e-6)


def test_film_matches_numpy(inputs):
    nb, h = 2, 8
    head = fusion.build("film", out_dim=OUT, hidden_dim=h, num_blocks=nb)
    params = nn.unbox(_init(head, inputs))
    # Non-zero biases so the shift beta and the residual are exercised.
    shift = lambda x: x + 0.1 * jnp.sin(jnp.arange(x.size).reshape(x.shape))
    params = jax.jit(lambda params: jax.tree.map(shift, params))(params)
    p = _np(params)
    xi, xt, tok = _f64(inputs, "image_feats", "text_feats", "image_tokens")
    film = _lin(p["film_generator"], xt)  # [B, nb*2*h] laid out as (block, gamma/beta, channel)
    for x, expect_tokens in ((tok, True), (xi[:, None, :], False)):
        a = np.maximum(_lin(p["image_in"], x), 0)
        for i in range(nb):
            gamma = 1.0 + film[:, (2 * i) * h : (2 * i + 1) * h][:, None, :]
            beta = film[:, (2 * i + 1) * h : (2 * i + 2) * h][:, None, :]
            y = _lin(p[f"block_{i}"], a)
            y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
            a = a + np.maximum(gamma * y + beta, 0)
        ref = _lin(p["out"], a.mean(1))
        x_in = (
            dict(inputs) if expect_tokens else {k: inputs[k] for k in ("image_feats", "text_feats")}
        )
        got = _call(head, params, x_in)["fused"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_bilinear_matches_numpy(inputs):
    head = fusion.build("bilinear", out_dim=OUT, rank=8)
    params = nn.unbox(_init(head, inputs))
    params = jax.jit(lambda params: jax.tree.map(lambda x: x + 0.05, params))(params)
    p = _np(params)
    xi, xt = _f64(inputs, "image_feats", "text_feats")
    ref = _lin(p["out"], np.tanh(_lin(p["image_proj"], xi)) * np.tanh(_lin(p["text_proj"], xt)))
    np.testing.assert_allclose(_call(head, params, inputs)["fused"], ref, rtol=1e-5, atol=1e-6)


# ---- cross-attention masking ------------------------------------------------------------------


@pytest.mark.parametrize("pool,self_attention", [("mean", True), ("first", True), ("mean", False)])
def test_cross_attention_ignores_masked_text_tokens(inputs, pool, self_attention):
    cfg = dict(CONFIGS["cross_attention"], pool=pool, self_attention=self_attention)
    head = fusion.build("cross_attention", out_dim=OUT, **cfg)
    params = nn.unbox(_init(head, inputs))
    fused = lambda x: jax.device_get(_call(head, params, x)["fused"])  # compared in numpy
    base = fused(inputs)

    mask = inputs["text_mask"]
    noise = np.random.default_rng(1).normal(size=inputs["text_tokens"].shape) * 5
    changed = np.where(mask[..., None], inputs["text_tokens"], noise).astype(np.float32)
    out = fused(dict(inputs, text_tokens=changed))
    np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-6)

    # An unmasked token does matter (row 0 keeps tokens 0 and 1): token 1 reaches the output
    # through the mean pool or, with "first" pooling, through self-attention.
    visible = inputs["text_tokens"].copy()
    visible[0, 1] += 1.0
    out = fused(dict(inputs, text_tokens=visible))
    assert np.abs(out[0] - base[0]).max() > 1e-4
    np.testing.assert_allclose(out[1:], base[1:], rtol=1e-5, atol=1e-6)

    # Changing the image tokens changes the output: text does attend to the image.
    out = fused(dict(inputs, image_tokens=inputs["image_tokens"] + 1.0))
    assert np.abs(out - base).max() > 1e-4


def test_cross_attention_all_ones_mask_equals_no_mask(inputs):
    head = fusion.build("cross_attention", out_dim=OUT, **CONFIGS["cross_attention"])
    params = nn.unbox(_init(head, inputs))
    ones = dict(inputs, text_mask=np.ones((B, NT), bool))
    none = {k: v for k, v in inputs.items() if k != "text_mask"}
    np.testing.assert_allclose(
        _call(head, params, ones)["fused"], _call(head, params, none)["fused"], rtol=1e-6
    )


# ---- registry and input errors ------------------------------------------------------------


def test_registry_errors():
    with pytest.raises(ValueError, match=r"did you mean \['concat_mlp'\]"):
        fusion.build("concat_mlpp", out_dim=2)
    with pytest.raises(ValueError, match="valid names"):
        fusion.build("zzz", out_dim=2)
    with pytest.raises(ValueError, match=r"no config keys \['hidden'\]"):
        fusion.build("film", out_dim=2, hidden=3)
    keys = fusion.config_keys("cross_attention")
    assert keys["out_dim"] is None and keys["num_layers"] == 2


def test_bad_inputs_raise(inputs):
    head = fusion.build("gated", out_dim=OUT)
    params = nn.unbox(_init(head, inputs))
    with pytest.raises(ValueError, match="pooled"):
        _call(head, params, dict(inputs, image_feats=inputs["image_tokens"]))
    with pytest.raises(ValueError, match="text_mask must be"):
        _call(head, params, dict(inputs, text_mask=inputs["text_mask"][:, :2]))
    bad = fusion.build("late_fusion", out_dim=OUT, weights=(-1.0, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        _init(bad, inputs)


# ---- ITM --------------------------------------------------------------------------------------


def _np_hardest(sim, excluded):
    s = np.where(excluded, -np.inf, sim)
    return s.argmax(1), s.argmax(0)


def test_hard_negatives_pick_off_diagonal_argmax():
    r = np.random.default_rng(2)
    sim = r.normal(size=(6, 6)).astype(np.float32)
    sim[np.arange(6), np.arange(6)] += 10.0  # positives are the most similar; must be skipped
    hard_negatives = jax.jit(itm.hard_negatives)
    t4i, i4t = hard_negatives(jnp.asarray(sim))
    ref_t, ref_i = _np_hardest(sim, np.eye(6, dtype=bool))
    np.testing.assert_array_equal(t4i, ref_t)
    np.testing.assert_array_equal(i4t, ref_i)
    assert np.all(np.asarray(t4i) != np.arange(6)) and np.all(np.asarray(i4t) != np.arange(6))

    # Other captions of the same image (positive_mask) are excluded too.
    pos = np.eye(6, dtype=bool)
    pos[0, ref_t[0]] = pos[ref_i[0], 0] = True
    t4i, i4t = hard_negatives(jnp.asarray(sim), positive_mask=jnp.asarray(pos))
    ref_t, ref_i = _np_hardest(sim, pos)
    np.testing.assert_array_equal(t4i, ref_t)
    np.testing.assert_array_equal(i4t, ref_i)


def test_softmax_sampling_follows_the_off_diagonal_softmax():
    sim = jnp.asarray(np.random.default_rng(3).normal(size=(4, 4)), jnp.float32)
    sample = lambda k: itm.hard_negatives(sim, sampling="softmax", rng=k, temperature=0.5)
    draws = jax.jit(jax.vmap(sample))(jax.random.split(jax.random.key(0), 20000))
    s = np.where(np.eye(4, dtype=bool), -np.inf, np.asarray(sim, np.float64) / 0.5)
    p_rows = np.exp(s - s.max(1, keepdims=True))
    p_rows /= p_rows.sum(1, keepdims=True)
    p_cols = np.exp(s - s.max(0, keepdims=True))
    p_cols /= p_cols.sum(0, keepdims=True)
    t4i, i4t = np.asarray(draws[0]), np.asarray(draws[1])
    for i in range(4):
        freq = np.bincount(t4i[:, i], minlength=4) / len(t4i)
        np.testing.assert_allclose(freq, p_rows[i], atol=0.015)
        freq = np.bincount(i4t[:, i], minlength=4) / len(i4t)
        np.testing.assert_allclose(freq, p_cols[:, i], atol=0.015)
    with pytest.raises(ValueError, match="pass rng"):
        itm.hard_negatives(sim, sampling="softmax")


def test_itm_loss_matches_numpy_bce():
    r = np.random.default_rng(4)
    img, txt = r.normal(size=(5, 3)), r.normal(size=(5, 3))
    sim = img @ txt.T
    score_fn = lambda i, t, **_: jnp.sum(i * t, axis=-1) - 0.5
    loss, metrics = jax.jit(functools.partial(itm.itm_loss, score_fn))(
        jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), jnp.asarray(sim)
    )
    nt, ni = _np_hardest(sim, np.eye(5, dtype=bool))
    logits = (
        np.concatenate(
            [
                (img * txt).sum(1),
                (img * txt[nt]).sum(1),
                (img[ni] * txt).sum(1),
            ]
        )
        - 0.5
    )
    y = np.concatenate([np.ones(5), np.zeros(10)])
    ref = np.mean(np.log1p(np.exp(-logits)) * y + np.log1p(np.exp(logits)) * (1 - y))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean((logits > 0) == (y > 0)), rtol=1e-6)


def test_itm_head_end_to_end_with_tokens(inputs):
    head = itm_head.ITMHead(
        fusion.build("cross_attention", out_dim=OUT, **CONFIGS["cross_attention"])
    )
    params = nn.unbox(_init(head, inputs))
    sim = jnp.asarray(np.random.default_rng(5).normal(size=(B, B)), jnp.float32)

    def loss_fn(params):
        score_fn = lambda *a, **k: head.apply({"params": params}, *a, **k)["score"]
        return itm.itm_loss(
            score_fn,
            inputs["image_feats"],
            inputs["text_feats"],
            sim,
            sampling="softmax",
            rng=jax.random.key(0),
            image_tokens=inputs["image_tokens"],
            text_tokens=inputs["text_tokens"],
            text_mask=inputs["text_mask"],
        )

    # The loss is BCE on the head's own scores of the pairs it builds.
    def reference(params):
        t4i, i4t = itm.hard_negatives(sim, sampling="softmax", rng=jax.random.key(0))
        pairs, labels = itm.itm_pairs(
            inputs["image_feats"],
            inputs["text_feats"],
            t4i,
            i4t,
            image_tokens=inputs["image_tokens"],
            text_tokens=inputs["text_tokens"],
            text_mask=inputs["text_mask"],
        )
        scores = _call(head, params, pairs)["score"]
        return optax.sigmoid_binary_cross_entropy(scores, labels).mean()

    @jax.jit
    def run(params):
        return jax.value_and_grad(loss_fn, has_aux=True)(params), reference(params)

    ((loss, metrics), grads), ref = jax.device_get(run(params))
    assert np.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(grads["itm_score"]["kernel"] != 0)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
