"""Transfer regularisers against float64 numpy implementations written from the formulas."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax import tree_paths
from xmodal_jax.errors import UserError
from xmodal_jax.objectives.regularizers import (
    REGULARIZERS,
    RegularizerInputs,
    bss,
    delta,
    get_regularizer,
    l1_l2,
    l2_sp,
)

RTOL, ATOL = 1e-4, 1e-6


def f32(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def fd_grad(f, x, eps=1e-6):
    """Central finite differences of a float64 numpy function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def make_params(rng):
    return {
        "backbone": {
            "conv": {"kernel": f32(rng, 2, 2, 3, 4), "bias": f32(rng, 4)},
            "norm": {"scale": f32(rng, 4), "bias": f32(rng, 4)},
        },
        "head": {"kernel": f32(rng, 4, 5), "bias": f32(rng, 5)},
    }


# ---------------------------------------------------------------------------------------------
# Path helpers
# ---------------------------------------------------------------------------------------------


def test_paths_are_slash_joined():
    tree = {"a": {"b": [np.zeros(1), np.ones(2)]}, "c": np.zeros(3)}
    assert list(tree_paths.flatten_with_paths(tree)) == ["a/b/0", "a/b/1", "c"]
    mask = tree_paths.regex_mask(tree, r"^a/")
    assert mask == {"a": {"b": [True, True]}, "c": False}


# ---------------------------------------------------------------------------------------------
# L1 / L2
# ---------------------------------------------------------------------------------------------


def test_l1_l2_values_and_gradients_on_selected_leaves():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    kernels = [params["backbone"]["conv"]["kernel"], params["head"]["kernel"]]
    want_l1 = sum(np.abs(np.float64(k)).sum() for k in kernels)
    want_l2 = 0.5 * sum((np.float64(k) ** 2).sum() for k in kernels)
    np.testing.assert_allclose(l1_l2.l1_penalty(params), want_l1, rtol=RTOL)
    np.testing.assert_allclose(l1_l2.l2_penalty(params), want_l2, rtol=RTOL)
    value, aux = l1_l2.loss(RegularizerInputs(params=params), {"l1": 0.3, "l2": 0.2})
    np.testing.assert_allclose(value, 0.3 * want_l1 + 0.2 * want_l2, rtol=RTOL)
    # Gradients: sign(w) and w on kernels, zero on everything else.
    g1 = jax.jit(jax.grad(l1_l2.l1_penalty))(params)
    g2 = jax.jit(jax.grad(l1_l2.l2_penalty))(params)
    for path, leaf in tree_paths.flatten_with_paths(params).items():
        on = path.endswith("kernel")
        np.testing.assert_array_equal(
            tree_paths.flatten_with_paths(g1)[path], np.sign(leaf) if on else 0.0
        )
        np.testing.assert_allclose(
            tree_paths.flatten_with_paths(g2)[path], leaf if on else 0.0, rtol=1e-6
        )


def test_l1_l2_regex_mask_and_errors():
    rng = np.random.default_rng(1)
    params = make_params(rng)
    got = l1_l2.l2_penalty(params, include=r"^backbone/", exclude=r"bias$")
    want = 0.5 * sum(
        (np.float64(x) ** 2).sum()
        for x in (params["backbone"]["conv"]["kernel"], params["backbone"]["norm"]["scale"])
    )
    np.testing.assert_allclose(got, want, rtol=RTOL)
    mask = tree_paths.regex_mask(params, r"head/bias")
    want = np.abs(np.float64(params["head"]["bias"])).sum()
    np.testing.assert_allclose(l1_l2.l1_penalty(params, mask=mask), want, rtol=RTOL)
    with pytest.raises(ValueError, match="no parameter selected"):
        l1_l2.l1_penalty(params, include="nothing_matches")
    with pytest.raises(ValueError, match=r"l1_l2 has unknown keys \['l3'\]; valid keys"):
        l1_l2.loss(RegularizerInputs(params=params), {"l3": 1.0})


# ---------------------------------------------------------------------------------------------
# L2-SP
# ---------------------------------------------------------------------------------------------


def test_l2_sp_value_zero_at_start_and_gradient():
    rng = np.random.default_rng(2)
    w0 = make_params(rng)
    pretrained = {"backbone": w0["backbone"]}  # the head is new
    alpha, beta = 0.3, 0.05
    # At the starting point with a zero-initialised head the penalty vanishes.
    start = {**w0, "head": jax.tree.map(np.zeros_like, w0["head"])}
    value, aux = l2_sp.l2_sp(start, pretrained, alpha=alpha, beta=beta)
    assert float(value) == 0.0 and float(aux["sp"]) == 0.0
    g = jax.jit(jax.grad(lambda p: l2_sp.l2_sp(p, pretrained, alpha=alpha, beta=beta)[0]))(start)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g))
    # Away from it: alpha/2 ||w - w0||^2 on the backbone, beta/2 ||w||^2 on the head.
    params = jax.tree.map(lambda x: x + f32(rng, *x.shape, scale=0.1), w0)
    flat, flat0 = tree_paths.flatten_with_paths(params), tree_paths.flatten_with_paths(w0)
    sp = 0.5 * sum(
        ((np.float64(flat[p]) - np.float64(flat0[p])) ** 2).sum()
        for p in flat
        if p.startswith("backbone/")
    )
    hl2 = 0.5 * sum((np.float64(flat[p]) ** 2).sum() for p in flat if p.startswith("head/"))
    value, aux = l2_sp.l2_sp(params, pretrained, alpha=alpha, beta=beta)
    np.testing.assert_allclose(value, alpha * sp + beta * hl2, rtol=RTOL)
    np.testing.assert_allclose(aux["sp"], sp, rtol=RTOL)
    g = jax.jit(jax.grad(lambda p: l2_sp.l2_sp(p, pretrained, alpha=alpha, beta=beta)[0]))(params)
    g = tree_paths.flatten_with_paths(g)
    for p in flat:
        want = (
            alpha * (np.float64(flat[p]) - np.float64(flat0[p]))
            if p.startswith("backbone/")
            else beta * np.float64(flat[p])
        )
        np.testing.assert_allclose(g[p], want, rtol=RTOL, atol=ATOL)
    # The pretrained weights get no gradient.
    g0 = jax.jit(jax.grad(lambda q: l2_sp.l2_sp(params, q, alpha=alpha, beta=beta)[0]))(pretrained)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0))


def test_l2_sp_regex_selection_and_errors():
    rng = np.random.default_rng(3)
    w0 = make_params(rng)
    params = jax.tree.map(lambda x: x + 1.0, w0)
    # Backbone restricted to the conv; the norm leaves are then unpenalised.
    value, aux = l2_sp.l2_sp(
        params, w0, alpha=2.0, beta=0.0, backbone=r"^backbone/conv/", head=r"^head/"
    )
    n_conv = w0["backbone"]["conv"]["kernel"].size + w0["backbone"]["conv"]["bias"].size
    np.testing.assert_allclose(value, 2.0 * 0.5 * n_conv, rtol=RTOL)
    assert int(aux["num_unpenalised"]) == 2
    with pytest.raises(ValueError, match="has no pretrained value"):
        l2_sp.l2_sp(params, {"backbone": w0["backbone"]}, backbone=r"kernel$")
    with pytest.raises(ValueError, match="match both"):
        l2_sp.l2_sp(params, w0, backbone=r"^backbone/", head=r"conv")
    bad = {**w0, "head": {"kernel": np.zeros((3, 5), np.float32), "bias": w0["head"]["bias"]}}
    with pytest.raises(ValueError, match="has shape"):
        l2_sp.l2_sp(params, bad, backbone=r".")
    with pytest.raises(ValueError, match=r"needs inputs \['pretrained_params'\]"):
        l2_sp.loss(RegularizerInputs(params=params), None)


# ---------------------------------------------------------------------------------------------
# DELTA
# ---------------------------------------------------------------------------------------------


def np_delta(fms, fm0s, att=None):
    total = 0.0
    for name in fms:
        d = np.float64(fms[name]) - np.float64(fm0s[name])
        c = d.shape[-1]
        per = (d**2).reshape(d.shape[0], -1, c).mean(axis=1)  # [B, C]
        a = np.ones(c) if att is None else c * np.float64(att[name])
        total += (per * a).sum(axis=1).mean()
    return 0.5 * total


def test_delta_value_and_gradient_with_and_without_attention():
    rng = np.random.default_rng(4)
    fms = {"layer1": f32(rng, 3, 4, 4, 5), "pooled": f32(rng, 3, 6)}
    fm0s = {k: v + f32(rng, *v.shape, scale=0.5) for k, v in fms.items()}
    att = {"layer1": np.float32(rng.dirichlet(np.ones(5))), "pooled": np.full(6, 1 / 6, np.float32)}
    for a in (None, att):
        got = delta.feature_map_distance(fms, fm0s, a)
        np.testing.assert_allclose(got, np_delta(fms, fm0s, a), rtol=RTOL)
        g, g0 = jax.jit(jax.grad(delta.feature_map_distance, argnums=(0, 1)))(fms, fm0s, a)
        for name in fms:

            def f(x, name=name, a=a):
                return np_delta({**fms, name: x}, fm0s, a)

            np.testing.assert_allclose(g[name], fd_grad(f, fms[name]), rtol=RTOL, atol=ATOL)
            np.testing.assert_array_equal(g0[name], 0.0)
    # Uniform attention equals the plain distance.
    uniform = {k: np.full(v.shape[-1], 1 / v.shape[-1], np.float32) for k, v in fms.items()}
    np.testing.assert_allclose(
        delta.feature_map_distance(fms, fm0s, uniform),
        delta.feature_map_distance(fms, fm0s),
        rtol=1e-6,
    )
    inputs = RegularizerInputs(
        feature_maps=fms, pretrained_feature_maps=fm0s, channel_attention=att
    )
    value, aux = delta.loss(inputs, {"weight": 0.2, "use_attention": True})
    np.testing.assert_allclose(value, 0.2 * np_delta(fms, fm0s, att), rtol=RTOL)
    with pytest.raises(ValueError, match="different layers"):
        delta.feature_map_distance(fms, {"layer1": fm0s["layer1"]})


def test_delta_channel_attention_from_filter_ablation():
    rng = np.random.default_rng(5)

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(4, name="feat")(x))
            return nn.Dense(3, name="cls")(h)

    model = Tiny()
    x, y = f32(rng, 8, 5), rng.integers(0, 3, 8)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p):
        logits = model.apply({"params": p}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

    got = delta.channel_loss_increase(loss_fn, params, "feat/kernel")
    p = jax.tree.map(np.float64, params)

    def np_loss(k):
        h = np.maximum(np.float64(x) @ k + p["feat"]["bias"], 0)
        z = h @ p["cls"]["kernel"] + p["cls"]["bias"]
        z = z - z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return -lp[np.arange(8), y].mean()

    base = np_loss(p["feat"]["kernel"])
    want = []
    for j in range(4):
        k = p["feat"]["kernel"].copy()
        k[:, j] = 0.0
        want.append(np_loss(k) - base)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    att = delta.channel_attention(got, temperature=5.0)
    z = (np.array(want) - np.mean(want)) / np.std(want)
    ref = np.exp(z / 5.0) / np.exp(z / 5.0).sum()
    np.testing.assert_allclose(att, ref, rtol=1e-4)
    with pytest.raises(ValueError, match="no parameter 'feat/weight'"):
        delta.channel_loss_increase(loss_fn, params, "feat/weight")


# ---------------------------------------------------------------------------------------------
# BSS
# ---------------------------------------------------------------------------------------------


def test_bss_value_and_gradient():
    rng = np.random.default_rng(6)
    f = f32(rng, 6, 4)
    u, s, vt = np.linalg.svd(np.float64(f), full_matrices=False)
    for k in (1, 2):
        np.testing.assert_allclose(
            bss.batch_spectral_shrinkage(f, k), (s[-k:] ** 2).sum(), rtol=RTOL
        )
        g = jax.jit(jax.grad(bss.batch_spectral_shrinkage), static_argnums=1)(f, k)
        # d(sigma_i^2)/dF = 2 sigma_i u_i v_i^T for distinct singular values.
        want = sum(2 * s[i] * np.outer(u[:, i], vt[i]) for i in range(4 - k, 4))
        np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)
    value, aux = bss.loss(RegularizerInputs(features=f), {"eta": 0.01, "k": 1})
    np.testing.assert_allclose(value, 0.01 * s[-1] ** 2, rtol=RTOL)
    with pytest.raises(ValueError, match="k must be in"):
        bss.batch_spectral_shrinkage(f, 5)


def test_registry_names_what_each_regularizer_reads():
    """One registry, by the names configs use; each entry declares its inputs, and its `fn`
    gives the module's loss with the config's weight (here BSS: eta = weight)."""
    assert sorted(REGULARIZERS) == ["bss", "delta", "l1", "l2", "l2sp", "none"]
    assert get_regularizer("l2sp").needs == ("params", "pretrained_params")
    assert get_regularizer("bss").needs == ("features",) and get_regularizer("none").needs == ()
    f = jnp.asarray(np.random.default_rng(0).standard_normal((6, 4)), jnp.float32)
    got = get_regularizer("bss").fn(RegularizerInputs(features=f), {"weight": 0.5, "k": 2})
    want = bss.loss(RegularizerInputs(features=f), {"eta": 0.5, "k": 2})
    np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(UserError, match=r"'l2_sp' is unknown; use one of \['bss', 'delta'"):
        get_regularizer("l2_sp")
