"""Domain-adaptation losses against float64 numpy implementations written from the formulas."""

import itertools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from xmodal_jax.analysis import a_distance, tsne
from xmodal_jax.models import discriminator
from xmodal_jax.objectives import _util
from xmodal_jax.objectives.adaptation import (
    SPECS,
    AdaptationInputs,
    adabn,
    bnm,
    cdan,
    coral,
    dann,
    entropy,
    get_loss,
    get_spec,
    grl,
    importance,
    jmmd,
    mcc,
    mmd,
)

RTOL, ATOL = 1e-4, 1e-6
FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)


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


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_entropy(z):
    lp = np_log_softmax(z)
    return -(np.exp(lp) * lp).sum(-1)


def np_bce(z, y):
    """Binary cross-entropy of logits z against label y, -[y log s(z) + (1-y) log(1-s(z))]."""
    z = np.asarray(z, np.float64)
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - z * y


def np_mlp(params, h):
    """The DomainDiscriminator forward pass from its Flax params, in float64."""
    h = np.asarray(h, np.float64)
    i = 0
    while f"hidden_{i}" in params:
        p = params[f"hidden_{i}"]
        h = np.maximum(h @ np.float64(p["kernel"]) + np.float64(p["bias"]), 0.0)
        i += 1
    return (h @ np.float64(params["out"]["kernel"]) + np.float64(params["out"]["bias"]))[:, 0]


def make_disc(in_dim, seed=0, hidden=(8, 8)):
    disc = discriminator.DomainDiscriminator(hidden=hidden)
    params = disc.init(jax.random.key(seed), jnp.zeros((1, in_dim)))["params"]
    return disc, jax.tree.map(np.asarray, params)


# ---------------------------------------------------------------------------------------------
# Gradient reversal and schedule
# ---------------------------------------------------------------------------------------------


def test_grl_forward_identity_backward_negated():
    rng = np.random.default_rng(0)
    x, g = f32(rng, 4, 3), f32(rng, 4, 3)
    for lam in (0.0, 0.37, 1.0, 2.5):
        out, vjp = jax.vjp(lambda x, lam=lam: grl.gradient_reversal(x, lam), jnp.asarray(x))
        np.testing.assert_array_equal(out, x)
        np.testing.assert_allclose(vjp(jnp.asarray(g))[0], -lam * g, rtol=1e-6)
    # Pytrees, and a traced coefficient that itself receives no gradient.
    tree = {"a": jnp.asarray(x), "b": jnp.asarray(g)}
    gx, gc = jax.jit(
        jax.grad(
            lambda t, c: jnp.sum(grl.gradient_reversal(t, c)["a"] * 2.0) + jnp.sum(t["b"]),
            argnums=(0, 1),
        )
    )(tree, jnp.float32(0.5))
    np.testing.assert_allclose(gx["a"], -0.5 * 2.0 * np.ones_like(x))
    np.testing.assert_allclose(gx["b"], np.ones_like(g))
    assert float(gc) == 0.0


def test_dann_coefficient_schedule():
    p = np.linspace(0.0, 1.0, 11)
    for gamma, lo, hi in [(10.0, 0.0, 1.0), (5.0, 0.1, 0.8)]:
        want = lo + (hi - lo) * (2.0 / (1.0 + np.exp(-gamma * p)) - 1.0)
        got = jax.jit(lambda p, g=gamma, lo=lo, hi=hi: grl.dann_coefficient(p, g, lo, hi))(p)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert float(grl.dann_coefficient(0.0)) == 0.0
    assert abs(float(grl.dann_coefficient(1.0)) - (2 / (1 + math.exp(-10)) - 1)) < 1e-7
    assert np.all(np.diff(np.asarray(grl.dann_coefficient(p))) > 0)


# ---------------------------------------------------------------------------------------------
# DANN
# ---------------------------------------------------------------------------------------------


def np_dann(params, fs, ft):
    ds, dt = np_mlp(params, fs), np_mlp(params, ft)
    return 0.5 * (np_bce(ds, 1).mean() + np_bce(dt, 0).mean())


def test_dann_loss_value_accuracy_and_gradients():
    rng = np.random.default_rng(1)
    fs, ft = f32(rng, 6, 5), f32(rng, 4, 5) + 0.5  # unequal batch sizes
    disc, params = make_disc(5)
    lam = 0.7

    def jloss(params, fs, ft):
        return dann.dann_loss(lambda h: disc.apply({"params": params}, h), fs, ft, lam)

    value, acc = jloss(params, fs, ft)
    g_params, g_fs, g_ft = jax.jit(jax.grad(lambda *a: jloss(*a)[0], argnums=(0, 1, 2)))(
        params, fs, ft
    )
    np.testing.assert_allclose(value, np_dann(params, fs, ft), rtol=RTOL)
    want_acc = 0.5 * ((np_mlp(params, fs) > 0).mean() + (np_mlp(params, ft) < 0).mean())
    np.testing.assert_allclose(acc, want_acc, rtol=1e-6)
    # Features: the reversed gradient of the discriminator loss.
    np.testing.assert_allclose(
        g_fs, -lam * fd_grad(lambda x: np_dann(params, x, ft), fs), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        g_ft, -lam * fd_grad(lambda x: np_dann(params, fs, x), ft), rtol=RTOL, atol=ATOL
    )
    # Discriminator parameters: the plain gradient.
    for layer in ("out", "hidden_0"):

        def f(k, layer=layer):
            p = jax.tree.map(np.float64, params)
            p[layer] = {**p[layer], "kernel": k}
            return np_dann(p, fs, ft)

        want = fd_grad(f, params[layer]["kernel"])
        np.testing.assert_allclose(g_params[layer]["kernel"], want, rtol=RTOL, atol=ATOL)


def test_dann_train_step_entry():
    rng = np.random.default_rng(2)
    fs, ft = f32(rng, 4, 3), f32(rng, 4, 3)
    disc, params = make_disc(3)
    cfg = {"name": "dann", "weight": 2.0, "gamma": 10.0}

    @jax.jit
    def step(params, fs, ft, p):
        inputs = AdaptationInputs(
            features_s=fs,
            features_t=ft,
            progress=p,
            discriminator=lambda h: disc.apply({"params": params}, h),
        )
        return get_loss("dann")(inputs, cfg)

    value, aux = step(params, fs, ft, 0.3)
    np.testing.assert_allclose(value, 2.0 * np_dann(params, fs, ft), rtol=RTOL)
    np.testing.assert_allclose(aux["loss"], np_dann(params, fs, ft), rtol=RTOL)
    np.testing.assert_allclose(aux["grl_coeff"], 2 / (1 + np.exp(-3.0)) - 1, rtol=1e-6)
    assert get_spec("dann").discriminator_input_dim(3, 7) == 3


# ---------------------------------------------------------------------------------------------
# MK-MMD and JMMD
# ---------------------------------------------------------------------------------------------


def np_base(z):
    """Mean squared distance over distinct pairs, by explicit enumeration."""
    n = len(z)
    return np.mean([np.sum((z[i] - z[j]) ** 2) for i in range(n) for j in range(n) if i != j])


def np_kernel(a, b, sigma2s):
    return sum(np.exp(-np.sum((a - b) ** 2) / (2 * s2)) for s2 in sigma2s)


def np_mmd_joint(layers_s, layers_t, sigma2s, estimator):
    """MMD^2 with the product-over-layers kernel, from the estimator definitions."""

    def k(i_dom, i, j_dom, j):
        out = 1.0
        for ls, lt, s2 in zip(layers_s, layers_t, sigma2s, strict=True):
            a = (ls if i_dom == "s" else lt)[i]
            b = (ls if j_dom == "s" else lt)[j]
            out *= np_kernel(a, b, s2)
        return out

    ns, nt = len(layers_s[0]), len(layers_t[0])
    if estimator == "quadratic":
        kss = sum(k("s", i, "s", j) for i in range(ns) for j in range(ns) if i != j)
        ktt = sum(k("t", i, "t", j) for i in range(nt) for j in range(nt) if i != j)
        kst = sum(k("s", i, "t", j) for i in range(ns) for j in range(nt))
        return kss / (ns * (ns - 1)) + ktt / (nt * (nt - 1)) - 2 * kst / (ns * nt)
    m = ns // 2
    h = [
        k("s", 2 * i, "s", 2 * i + 1)
        + k("t", 2 * i, "t", 2 * i + 1)
        - k("s", 2 * i, "t", 2 * i + 1)
        - k("s", 2 * i + 1, "t", 2 * i)
        for i in range(m)
    ]
    return np.mean(h)


def np_mk_mmd(zs, zt, estimator, base=None):
    zs, zt = np.float64(zs), np.float64(zt)
    base = np_base(np.concatenate([zs, zt])) if base is None else base
    return np_mmd_joint([zs], [zt], [[f * base for f in FACTORS]], estimator)


@pytest.mark.parametrize("estimator", ["linear", "quadratic"])
def test_mk_mmd_value_and_gradients(estimator):
    rng = np.random.default_rng(3)
    n_t = 6 if estimator == "linear" else 5
    zs, zt = f32(rng, 6, 4), f32(rng, n_t, 4) + 0.3
    value = mmd.mk_mmd(zs, zt, estimator=estimator)
    np.testing.assert_allclose(value, np_mk_mmd(zs, zt, estimator), rtol=RTOL, atol=ATOL)
    # Detached bandwidth: the reference holds the bandwidth at its value for the given inputs.
    base = np_base(np.float64(np.concatenate([zs, zt])))
    gs, gt = jax.jit(jax.grad(lambda a, b: mmd.mk_mmd(a, b, estimator=estimator), argnums=(0, 1)))(
        zs, zt
    )
    np.testing.assert_allclose(
        gs, fd_grad(lambda x: np_mk_mmd(x, zt, estimator, base), zs), rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        gt, fd_grad(lambda x: np_mk_mmd(zs, x, estimator, base), zt), rtol=RTOL, atol=ATOL
    )
    # Bandwidth differentiated too.
    gs = jax.jit(
        jax.grad(lambda a: mmd.mk_mmd(a, zt, estimator=estimator, detach_bandwidth=False))
    )(zs)
    np.testing.assert_allclose(
        gs, fd_grad(lambda x: np_mk_mmd(x, zt, estimator), zs), rtol=RTOL, atol=ATOL
    )


def test_mk_mmd_near_zero_for_same_distribution_and_large_for_shift():
    rng = np.random.default_rng(4)
    n, d = 256, 4
    a, b = f32(rng, n, d), f32(rng, n, d)
    shifted = f32(rng, n, d) + 1.5
    for est in ("linear", "quadratic"):
        same = float(mmd.mk_mmd(a, b, estimator=est))
        shift = float(mmd.mk_mmd(a, shifted, estimator=est))
        # Kernel values lie in [0, 5]; the shifted pair is far apart relative to its spread.
        assert shift > 0.5, (est, shift)
        assert abs(same) < 0.05 * shift, (est, same, shift)


def test_mk_mmd_rejects_bad_shapes():
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="equal source and target batch sizes"):
        mmd.mk_mmd(z, z[:3], estimator="linear")
    with pytest.raises(ValueError, match="estimator must be one of"):
        mmd.mk_mmd(z, z, estimator="cubic")
    with pytest.raises(ValueError, match="same feature shape"):
        mmd.mk_mmd(z, np.zeros((4, 2), np.float32), estimator="quadratic")


def np_jmmd(fs, ls, ft, lt, estimator, base=None, sigma=0.92):
    fs, ft = np.float64(fs), np.float64(ft)
    ps, pt = np_softmax(ls), np_softmax(lt)
    base = np_base(np.concatenate([fs, ft])) if base is None else base
    return np_mmd_joint([fs, ps], [ft, pt], [[f * base for f in FACTORS], [sigma**2]], estimator)


@pytest.mark.parametrize("estimator", ["linear", "quadratic"])
def test_jmmd_value_and_gradients(estimator):
    rng = np.random.default_rng(5)
    fs, ft = f32(rng, 6, 4), f32(rng, 6, 4) + 0.4
    ls, lt = f32(rng, 6, 3, scale=2.0), f32(rng, 6, 3, scale=2.0)
    inputs = AdaptationInputs(features_s=fs, features_t=ft, logits_s=ls, logits_t=lt)
    cfg = {"estimator": estimator, "weight": 0.5}
    value, aux = jmmd.loss(inputs, cfg)
    want = np_jmmd(fs, ls, ft, lt, estimator)
    np.testing.assert_allclose(aux["loss"], want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(value, 0.5 * want, rtol=RTOL, atol=ATOL)
    base = np_base(np.float64(np.concatenate([fs, ft])))

    def jfn(fs, ls, ft, lt):
        x = AdaptationInputs(features_s=fs, features_t=ft, logits_s=ls, logits_t=lt)
        return jmmd.loss(x, {"estimator": estimator})[0]

    grads = jax.jit(jax.grad(jfn, argnums=(0, 1, 2, 3)))(fs, ls, ft, lt)
    args = [fs, ls, ft, lt]
    for i, g in enumerate(grads):

        def f(x, i=i):
            a = list(args)
            a[i] = x
            return np_jmmd(a[0], a[1], a[2], a[3], estimator, base)

        np.testing.assert_allclose(g, fd_grad(f, args[i]), rtol=RTOL, atol=ATOL)
    # The bandwidth rule on every layer when the softmax sigma is not fixed.
    got = jmmd.jmmd([fs, jax.nn.softmax(ls)], [ft, jax.nn.softmax(lt)], estimator=estimator)
    ps, pt = np_softmax(ls), np_softmax(lt)
    pbase = np_base(np.concatenate([ps, pt]))
    want = np_mmd_joint(
        [np.float64(fs), ps],
        [np.float64(ft), pt],
        [[f * base for f in FACTORS], [f * pbase for f in FACTORS]],
        estimator,
    )
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# CORAL
# ---------------------------------------------------------------------------------------------


def np_coral(fs, ft):
    fs, ft = np.float64(fs), np.float64(ft)
    cs, ct = np.cov(fs, rowvar=False, ddof=1), np.cov(ft, rowvar=False, ddof=1)
    d = fs.shape[1]
    return np.sum((cs - ct) ** 2) / (4 * d * d)


def test_coral_value_gradient_and_zero_for_equal_covariance():
    rng = np.random.default_rng(6)
    fs, ft = f32(rng, 7, 4), f32(rng, 5, 4, scale=1.7)
    np.testing.assert_allclose(coral.coral(fs, ft), np_coral(fs, ft), rtol=RTOL)
    gs, gt = jax.jit(jax.grad(coral.coral, argnums=(0, 1)))(fs, ft)
    np.testing.assert_allclose(gs, fd_grad(lambda x: np_coral(x, ft), fs), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gt, fd_grad(lambda x: np_coral(fs, x), ft), rtol=RTOL, atol=ATOL)
    # Same rows permuted and shifted: identical covariance, so the loss vanishes.
    same = fs[rng.permutation(7)] + np.float32(3.0)
    assert float(coral.coral(fs, same)) < 1e-10
    assert float(coral.coral(fs, ft)) > 1e-3
    with pytest.raises(ValueError, match="same width"):
        coral.coral(fs, ft[:, :3])


# ---------------------------------------------------------------------------------------------
# CDAN / CDAN+E
# ---------------------------------------------------------------------------------------------


def np_cdan(params, fs, ft, ls, lt, entropy_cond, rmats=None):
    fs, ft = np.float64(fs), np.float64(ft)
    gs, gt = np_softmax(ls), np_softmax(lt)

    def cond(f, g):
        if rmats is None:
            return np.einsum("bc,bk->bck", g, f).reshape(len(f), -1)
        rf, rg = (np.float64(r) for r in rmats)
        return (f @ rf) * (g @ rg) / np.sqrt(rf.shape[1])

    ds, dt = np_mlp(params, cond(fs, gs)), np_mlp(params, cond(ft, gt))
    bs, bt = np_bce(ds, 1), np_bce(dt, 0)
    if entropy_cond:
        ws, wt = 1 + np.exp(-np_entropy(ls)), 1 + np.exp(-np_entropy(lt))
        # Per-domain normalisation: each domain's weights sum to its batch size.
        bs, bt = bs * ws * len(ws) / ws.sum(), bt * wt * len(wt) / wt.sum()
    return 0.5 * (bs.mean() + bt.mean())


@pytest.mark.parametrize(
    "entropy_cond,randomized", list(itertools.product([False, True], [False, True]))
)
def test_cdan_value_and_gradients(entropy_cond, randomized):
    rng = np.random.default_rng(7)
    n_s, n_t, feat, classes = 5, 4, 4, 3
    fs, ft = f32(rng, n_s, feat), f32(rng, n_t, feat)
    ls, lt = f32(rng, n_s, classes, scale=2.0), f32(rng, n_t, classes, scale=2.0)
    # max_multilinear_dim below F * C = 12 switches to the randomised map automatically.
    cfg = {
        "entropy_conditioning": entropy_cond,
        "max_multilinear_dim": 8 if randomized else 4096,
        "randomized_dim": 6,
        "random_seed": 3,
    }
    in_dim = cdan.discriminator_input_dim(feat, classes, cfg)
    assert in_dim == (6 if randomized else 12)
    disc, params = make_disc(in_dim, seed=1)
    rmats = cdan.random_matrices(feat, classes, 6, 3) if randomized else None
    lam = 0.4

    def jfn(params, fs, ft, ls, lt):
        return cdan.cdan_loss(
            lambda h: disc.apply({"params": params}, h),
            fs,
            ft,
            ls,
            lt,
            lam,
            entropy_conditioning=entropy_cond,
            max_multilinear_dim=cfg["max_multilinear_dim"],
            randomized_dim=6,
            random_seed=3,
        )[0]

    want = np_cdan(params, fs, ft, ls, lt, entropy_cond, rmats)
    np.testing.assert_allclose(jfn(params, fs, ft, ls, lt), want, rtol=RTOL)
    g = jax.jit(jax.grad(jfn, argnums=(0, 1, 2, 3, 4)))(params, fs, ft, ls, lt)
    ref = lambda x: np_cdan(params, x, ft, ls, lt, entropy_cond, rmats)
    np.testing.assert_allclose(g[1], -lam * fd_grad(ref, fs), rtol=RTOL, atol=ATOL)
    ref = lambda x: np_cdan(params, fs, x, ls, lt, entropy_cond, rmats)
    np.testing.assert_allclose(g[2], -lam * fd_grad(ref, ft), rtol=RTOL, atol=ATOL)
    # Predictions condition the discriminator but receive no gradient.
    np.testing.assert_array_equal(g[3], 0.0)
    np.testing.assert_array_equal(g[4], 0.0)

    def f(k):
        p = jax.tree.map(np.float64, params)
        p["out"] = {**p["out"], "kernel": k}
        return np_cdan(p, fs, ft, ls, lt, entropy_cond, rmats)

    want = fd_grad(f, params["out"]["kernel"])
    np.testing.assert_allclose(g[0]["out"]["kernel"], want, rtol=RTOL, atol=ATOL)


def test_cdan_e_entry_and_random_matrices():
    rng = np.random.default_rng(8)
    fs, ft = f32(rng, 4, 3), f32(rng, 4, 3)
    ls, lt = f32(rng, 4, 2), f32(rng, 4, 2)
    disc, params = make_disc(6)
    inputs = AdaptationInputs(
        features_s=fs,
        features_t=ft,
        logits_s=ls,
        logits_t=lt,
        progress=1.0,
        discriminator=lambda h: disc.apply({"params": params}, h),
    )
    value, aux = get_loss("cdan_e")(inputs, {"weight": 1.0})
    np.testing.assert_allclose(value, np_cdan(params, fs, ft, ls, lt, True), rtol=RTOL)
    value, _ = get_loss("cdan")(inputs, None)
    np.testing.assert_allclose(value, np_cdan(params, fs, ft, ls, lt, False), rtol=RTOL)
    # Fixed, seeded, unit-variance random matrices.
    r1, r2 = cdan.random_matrices(64, 32, 256, seed=0), cdan.random_matrices(64, 32, 256, seed=0)
    np.testing.assert_array_equal(r1[0], r2[0])
    assert abs(float(jnp.std(r1[0])) - 1.0) < 0.02 and abs(float(jnp.mean(r1[1]))) < 0.02


# ---------------------------------------------------------------------------------------------
# Entropy minimisation, MCC and BNM
# ---------------------------------------------------------------------------------------------


def test_entropy_loss_value_and_gradient():
    rng = np.random.default_rng(9)
    logits = f32(rng, 6, 5, scale=3.0)
    np_fn = lambda z: np_entropy(z).mean()
    np.testing.assert_allclose(entropy.entropy_loss(logits), np_fn(logits), rtol=RTOL)
    g = jax.jit(jax.grad(entropy.entropy_loss))(logits)
    np.testing.assert_allclose(g, fd_grad(np_fn, logits), rtol=RTOL, atol=ATOL)
    value, aux = entropy.loss(AdaptationInputs(logits_t=logits), {"weight": 0.1})
    np.testing.assert_allclose(value, 0.1 * np_fn(logits), rtol=RTOL)
    # Uniform predictions have entropy log C; one-hot-like ones about 0.
    np.testing.assert_allclose(entropy.entropy_loss(np.zeros((2, 5))), np.log(5), rtol=1e-6)
    assert float(entropy.entropy_loss(np.array([[50.0, 0, 0]]))) < 1e-12


def np_mcc(logits, t=2.5, weights=None):
    z = np.float64(logits) / t
    p = np_softmax(z)
    if weights is None:
        w = 1 + np.exp(-np_entropy(z))
        weights = len(z) * w / w.sum()
    c = (p * weights[:, None]).T @ p
    c = c / c.sum(axis=1, keepdims=True)
    return (c.sum() - np.trace(c)) / c.shape[0]


def test_mcc_value_and_gradient():
    rng = np.random.default_rng(10)
    logits = f32(rng, 8, 4, scale=3.0)
    np.testing.assert_allclose(mcc.mcc(logits), np_mcc(logits), rtol=RTOL)
    np.testing.assert_allclose(mcc.mcc(logits, 1.0), np_mcc(logits, 1.0), rtol=RTOL)
    # The example weights are constants for the gradient.
    z = np.float64(logits) / 2.5
    w = 1 + np.exp(-np_entropy(z))
    w = len(z) * w / w.sum()
    g = jax.jit(jax.grad(mcc.mcc))(logits)
    want = fd_grad(lambda x: np_mcc(x, 2.5, w), logits)
    np.testing.assert_allclose(g, want, rtol=RTOL, atol=ATOL)
    # Confident, class-separated predictions have almost no confusion.
    sharp = 30.0 * np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
    assert float(mcc.mcc(sharp)) < 1e-3 < float(mcc.mcc(logits))


def np_bnm(logits):
    """-||softmax(logits)||_* / B in float64, the nuclear norm from numpy's SVD."""
    p = np_softmax(logits)
    return -np.linalg.svd(p, compute_uv=False).sum() / len(p)


def test_bnm_value_and_gradient():
    rng = np.random.default_rng(12)
    for shape in ((3, 6), (8, 4)):  # fewer rows than classes, and more
        logits = f32(rng, *shape, scale=2.0)
        np.testing.assert_allclose(bnm.bnm(logits), np_bnm(logits), rtol=RTOL)
        g = jax.jit(jax.grad(bnm.bnm))(logits)
        np.testing.assert_allclose(g, fd_grad(np_bnm, logits), rtol=RTOL, atol=ATOL)
    # logits, g: the [8, 4] case from here on.
    # With respect to the probabilities the gradient is -U V^T / B (thin SVD of P): the loss
    # falls along it, so a small step against the gradient raises the nuclear norm.
    p64 = np_softmax(logits)
    u, _, vt = np.linalg.svd(p64, full_matrices=False)
    nuc = lambda p: -jnp.sum(jnp.linalg.svd(p, compute_uv=False)) / p.shape[0]
    gp = jax.jit(jax.grad(nuc))(p64.astype(np.float32))
    np.testing.assert_allclose(gp, -u @ vt / len(p64), rtol=1e-3, atol=1e-5)
    step = logits - 0.1 * np.asarray(g)
    assert np_bnm(step) < np_bnm(logits)
    value, aux = bnm.loss(AdaptationInputs(logits_t=logits), {"weight": 0.3})
    np.testing.assert_allclose(value, 0.3 * np_bnm(logits), rtol=RTOL)
    np.testing.assert_allclose(aux["loss"], np_bnm(logits), rtol=RTOL)
    # Closed forms: confident predictions spread evenly over C classes (B/C rows each) give
    # ||P||_* = C sqrt(B/C); all on one class, sqrt(B); uniform predictions (rank one), sqrt(B/C).
    b, c = 8, 4
    diverse = 40.0 * np.eye(c, dtype=np.float32)[np.arange(b) % c]
    collapsed = 40.0 * np.eye(c, dtype=np.float32)[np.zeros(b, int)]
    uniform = np.zeros((b, c), np.float32)
    np.testing.assert_allclose(bnm.bnm(diverse), -c * np.sqrt(b / c) / b, rtol=1e-5)
    np.testing.assert_allclose(bnm.bnm(collapsed), -np.sqrt(b) / b, rtol=1e-5)
    np.testing.assert_allclose(bnm.bnm(uniform), -np.sqrt(b / c) / b, rtol=1e-5)
    # Diversity counts: entropy ranks the collapsed batch as good as the diverse one, BNM not.
    np.testing.assert_allclose(np_entropy(diverse).mean(), np_entropy(collapsed).mean())
    assert float(bnm.bnm(diverse)) < float(bnm.bnm(collapsed)) < float(bnm.bnm(uniform))
    with pytest.raises(ValueError, match=r"\[B, C\] logits"):
        bnm.bnm(np.zeros((2, 3, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# AdaBN
# ---------------------------------------------------------------------------------------------


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        x = nn.Dense(3)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(x)


class _ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True)(nn.Conv(3, (2, 2))(x))


def _np_bn(x, scale, bias, eps):
    mu, var = x.mean(0), x.var(0)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def test_adabn_replaces_only_batch_stats_with_target_moments():
    rng = np.random.default_rng(11)
    model = _BNNet()
    variables = model.init(jax.random.key(0), jnp.zeros((2, 5)))
    batches = [f32(rng, 7, 5, scale=2.0) + 1.0, f32(rng, 7, 5) - 0.5, f32(rng, 5, 5)]
    new = adabn.adapt_batch_norm(model, variables, batches, train=False)
    assert new["params"] is variables["params"]
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    p = jax.tree.map(np.float64, variables["params"])
    # First BN: moments of Dense_0's output over all target examples.
    h1 = [np.float64(b) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"] for b in batches]
    all1 = np.concatenate(h1)
    bs = new["batch_stats"]
    np.testing.assert_allclose(bs["bn1"]["mean"], all1.mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bs["bn1"]["var"], all1.var(0), rtol=RTOL, atol=ATOL)
    # Second BN: its input when bn1 normalises each batch with that batch's statistics.
    h2 = [
        np.maximum(_np_bn(h, p["bn1"]["scale"], p["bn1"]["bias"], 1e-5), 0) @ p["Dense_1"]["kernel"]
        + p["Dense_1"]["bias"]
        for h in h1
    ]
    all2 = np.concatenate(h2)
    np.testing.assert_allclose(bs["bn2"]["mean"], all2.mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(bs["bn2"]["var"], all2.var(0), rtol=RTOL, atol=ATOL)
    # The statistics differ from the initial ones (zeros / ones), so something was replaced.
    assert np.abs(np.asarray(bs["bn1"]["mean"])).max() > 0.1


def test_adabn_conv_reduces_over_batch_and_space():
    rng = np.random.default_rng(12)
    model = _ConvBN()
    variables = model.init(jax.random.key(1), jnp.zeros((1, 4, 4, 2)))
    batches = [f32(rng, 3, 4, 4, 2) + 2.0, f32(rng, 2, 4, 4, 2)]
    new = adabn.adapt_batch_norm(model, variables, batches)
    k = np.float64(variables["params"]["Conv_0"]["kernel"])
    b = np.float64(variables["params"]["Conv_0"]["bias"])
    conv = lambda x: np.asarray(
        jax.lax.conv_general_dilated(
            jnp.asarray(x, jnp.float32),
            jnp.asarray(k, jnp.float32),
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ),
        np.float64,
    )
    h = np.concatenate([conv(x) + b for x in batches]).reshape(-1, 3)
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(stats["var"], h.var(0), rtol=RTOL, atol=ATOL)


def test_adabn_errors():
    model = _ConvBN()
    variables = model.init(jax.random.key(1), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="no target batches"):
        adabn.adapt_batch_norm(model, variables, [])
    with pytest.raises(ValueError, match="no 'batch_stats'"):
        adabn.adapt_batch_norm(model, {"params": variables["params"]}, [np.zeros((1, 4, 4, 2))])


# ---------------------------------------------------------------------------------------------
# Importance weighting
# ---------------------------------------------------------------------------------------------


def capped_mean_one(w, cap):
    """min(cap, a w) with mean 1, a found by bisection in float64."""
    lo, hi = 0.0, 1.0
    while np.mean(np.minimum(cap, hi * w)) < 1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(np.minimum(cap, mid * w)) < 1 else (lo, mid)
    return np.minimum(cap, hi * w)


def test_importance_weights_formula_clip_and_normalisation():
    rng = np.random.default_rng(13)
    d = f32(rng, 9, scale=3.0)
    want = (30 / 10) * np.exp(-np.float64(d))
    got = importance.importance_weights(d, n_source=30, n_target=10)
    np.testing.assert_allclose(got, want, rtol=RTOL)
    got = importance.importance_weights(d, n_source=30, n_target=10, clip_max=5.0)
    np.testing.assert_allclose(got, np.minimum(want, 5.0), rtol=RTOL)
    got = importance.importance_weights(d, self_normalize=True)
    w = np.exp(-np.float64(d))
    np.testing.assert_allclose(got, w / w.mean(), rtol=RTOL)
    for cap in (1.0, 1.5, 3.0, 100.0):
        got = importance.importance_weights(d, clip_max=cap, self_normalize=True)
        np.testing.assert_allclose(got, capped_mean_one(w, cap), rtol=RTOL, atol=1e-6)
    # Nearly separable domains: every raw weight is tiny and one dominates; the cap still holds
    # (normalising alone would give that example 1/(1 + 8 e^-20) of the batch's weight).
    d = np.array([20.0] * 8 + [0.0], np.float32)
    got = np.asarray(importance.importance_weights(d, clip_max=3.0, self_normalize=True))
    np.testing.assert_allclose(got, capped_mean_one(np.exp(-np.float64(d)), 3.0), rtol=RTOL)
    np.testing.assert_allclose([got.max(), got.mean()], [3.0, 1.0], rtol=RTOL)
    # Extreme logits do not overflow.
    assert np.all(
        np.isfinite(importance.importance_weights(np.array([-500.0, 0.0]), self_normalize=True))
    )


def test_importance_weights_recover_known_density_ratio():
    # Source N(0, 1), target N(1, 1): p_t(x) / p_s(x) = exp(x - 1/2). Imbalanced domain sizes
    # exercise the n_s / n_t prior correction. A logistic classifier on x is well specified
    # here (the true log-odds are linear in x), so with 30k examples its fitted ratio should be
    # within a few percent of the truth where the source has mass.
    rng = np.random.default_rng(14)
    n_s, n_t = 20000, 10000
    xs, xt = rng.normal(0.0, 1.0, n_s), rng.normal(1.0, 1.0, n_t)
    x = np.concatenate([xs, xt])[:, None]
    y = np.concatenate([np.ones(n_s), np.zeros(n_t)])  # source = 1, the package's convention
    clf = LogisticRegression(C=1e6, max_iter=1000).fit(x, y)
    grid = np.linspace(-2.0, 2.5, 46)
    logits = clf.decision_function(grid[:, None]).astype(np.float32)  # log p(s|x) / p(t|x)
    w = np.asarray(importance.importance_weights(logits, n_source=n_s, n_target=n_t))
    true = np.exp(grid - 0.5)
    rel = np.abs(w / true - 1)
    # Tolerance: the slope's standard error is about 1 / sqrt(n p (1 - p) var(x)) ~ 0.012 here,
    # so exp(error * |x - 0.5|) at the ends of the grid (|x - 0.5| <= 2.5) stays within ~8% at
    # 2.5 sigma; the median grid point is much closer to the truth.
    assert np.median(rel) < 0.05, np.median(rel)
    assert rel.max() < 0.10, rel.max()
    assert np.corrcoef(np.log(w), np.log(true))[0, 1] > 0.999


def test_weighted_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(15)
    logits, labels = f32(rng, 6, 4), rng.integers(0, 4, 6)
    w = np.abs(f32(rng, 6)) + 0.1

    def np_fn(z):
        return np.mean(w * -np_log_softmax(z)[np.arange(6), labels])

    got = importance.weighted_cross_entropy(logits, labels, w)
    np.testing.assert_allclose(got, np_fn(logits), rtol=RTOL)
    g = jax.jit(jax.grad(importance.weighted_cross_entropy))(logits, labels, w)
    np.testing.assert_allclose(g, fd_grad(np_fn, logits), rtol=RTOL, atol=ATOL)


def test_importance_entry_trains_classifier_not_features():
    rng = np.random.default_rng(16)
    fs, ft = f32(rng, 4, 3), f32(rng, 4, 3)
    ls, labels = f32(rng, 4, 2), np.array([0, 1, 1, 0])
    disc, params = make_disc(3)

    def fn(params, fs, ls):
        inputs = AdaptationInputs(
            features_s=fs,
            features_t=ft,
            logits_s=ls,
            labels_s=labels,
            discriminator=lambda h: disc.apply({"params": params}, h),
        )
        return get_loss("importance")(inputs, {"clip_max": None, "self_normalize": False})

    (value, aux), g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))(
        params, fs, ls
    )
    ds, dt = np_mlp(params, fs), np_mlp(params, ft)
    w = np.exp(-ds)
    ce = np.mean(w * -np_log_softmax(ls)[np.arange(4), labels])
    bce = 0.5 * (np_bce(ds, 1).mean() + np_bce(dt, 0).mean())
    np.testing.assert_allclose(value, ce + bce, rtol=RTOL)
    np.testing.assert_array_equal(g[1], 0.0)  # features only pass through stop-gradient
    assert get_spec("importance").replaces_source_loss


# ---------------------------------------------------------------------------------------------
# Diagnostics: proxy A-distance and t-SNE
# ---------------------------------------------------------------------------------------------


def test_proxy_a_distance_extremes_and_determinism():
    rng = np.random.default_rng(17)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    far = rng.normal(size=(200, 8)) + 10.0
    sep = a_distance.proxy_a_distance(a, far, seed=0)
    assert sep["error"] == 0.0 and sep["a_distance"] == 2.0
    same = a_distance.proxy_a_distance(a, b, seed=0)
    # Held-out error of a chance-level classifier on 200 points has std ~0.035 (A std ~0.14).
    assert abs(same["a_distance"]) < 0.5, same
    assert a_distance.proxy_a_distance(a, b, seed=0) == same
    mlp = a_distance.proxy_a_distance(a, far, classifier="mlp", seed=0, max_iter=200)
    assert mlp["a_distance"] > 1.9
    with pytest.raises(ValueError, match="classifier must be one of"):
        a_distance.proxy_a_distance(a, b, classifier="svm")


def test_tsne_writes_png(tmp_path):
    rng = np.random.default_rng(18)
    path = tmp_path / "plots" / "tsne.png"
    emb = tsne.plot_tsne(rng.normal(size=(30, 6)), rng.normal(size=(25, 6)) + 3, str(path))
    assert emb.shape == (55, 2) and np.all(np.isfinite(emb))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_the_tsne_and_the_a_distance_run_on_one_thread_and_leave_the_process_as_it_was(
    monkeypatch,
):
    """Scoped thread limits (idle threads spin against busy cores): one OpenMP thread inside the
    t-SNE, one BLAS thread inside the domain classifier's fit, the process's own counts after."""
    from sklearn.linear_model import LogisticRegression as LR
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_info, threadpool_limits

    def counts() -> dict[str, int]:
        return {i["user_api"]: i["num_threads"] for i in threadpool_info()}

    seen = {}

    def recording(name: str, method):
        """`method`, noting the thread counts in force when it is called."""

        def wrapped(self, *args):
            seen[name] = counts()
            return method(self, *args)

        return wrapped

    monkeypatch.setattr(TSNE, "fit_transform", recording("tsne", TSNE.fit_transform))
    monkeypatch.setattr(LR, "fit", recording("fit", LR.fit))
    rng = np.random.default_rng(3)
    with threadpool_limits(2):  # the process's counts (whatever the machine's default)
        before = counts()
        tsne.tsne_embedding(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 2)
        a_distance.proxy_a_distance(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 2)
        after = counts()
    assert before["openmp"] == before["blas"] == 2
    assert seen["tsne"]["openmp"] == 1 and seen["fit"]["blas"] == 1
    assert after == before


def test_a_distance_evaluator_tsne_points(tmp_path):
    from xmodal_jax import evaluators
    from xmodal_jax.errors import UserError

    data = {"dataset": "digits_uci", "split": "test"}
    make = lambda n: evaluators.get("a_distance")(
        "a_distance", {"source": data, "target": data, "tsne_points": n}, {"predict": None}, None, 8
    )
    with pytest.raises(UserError, match="tsne_points=-1.*0 writes no t-SNE plot"):
        make(-1)
    rng = np.random.default_rng(0)
    features = (rng.normal(size=(40, 6)), rng.normal(size=(30, 6)) + 3)
    for n, files in ((0, []), (20, ["tsne_a_distance.png"])):
        ev = make(n)
        ev._last = features  # what `run` keeps of the last evaluation
        out = tmp_path / str(n)
        out.mkdir()
        assert [os.path.basename(p) for p in ev.plot(str(out))] == files
        assert sorted(os.listdir(out)) == files


def test_a_distance_evaluator_with_adapt_reads_the_target_through_adabn(monkeypatch):
    """`adapt`: the target's features come from the model whose BatchNorm statistics AdaBN
    re-estimated on the `adapt` images (real rows only), the source's from the model as given;
    the value is the proxy A-distance of exactly those features."""
    from xmodal_jax import evaluators
    from xmodal_jax.errors import UserError
    from xmodal_jax.evaluators import classification
    from xmodal_jax.parallel import mesh as mesh_lib

    rng = np.random.default_rng(0)
    images = {  # (dataset, split) -> one padded batch: the last 2 rows are padding
        ("digits_mnist", "test"): rng.normal(0.0, 1.0, (12, 2, 2, 1)).astype(np.float32),
        ("digits_uci", "test"): rng.normal(3.0, 1.0, (12, 2, 2, 1)).astype(np.float32),
        ("digits_uci", "train"): rng.normal(3.0, 1.0, (12, 2, 2, 1)).astype(np.float32),
    }
    mask = np.arange(12) < 10
    images[("digits_uci", "train")][~mask] = 1e6  # would show if padding entered the statistics
    monkeypatch.setattr(
        classification,
        "local_batches",
        lambda cfg, bs: [{"image": images[cfg["name"], cfg["split"]], "_mask": mask}],
    )
    seen = []

    def adapt_batch_norm(variables, batches):  # AdaBN's statistic here: the mean image
        batches = list(batches)
        seen.extend(len(b) for b in batches)
        return {**variables, "batch_stats": {"mean": np.concatenate(batches).mean(0)}}

    fns = {
        "predict": lambda v, b: {"pooled": (b["image"] - v["batch_stats"]["mean"]).reshape(12, -1)},
        "adapt_batch_norm": adapt_batch_norm,
    }
    cfg = {"source": {"dataset": "digits_mnist"}, "target": {"dataset": "digits_uci"}}
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "model": 1}, jax.devices()[:1])
    variables = {"batch_stats": {"mean": np.zeros((2, 2, 1), np.float32)}}
    adapt = {"dataset": "digits_uci", "split": "train"}
    got = evaluators.get("a_distance")("a", {**cfg, "adapt": adapt}, fns, mesh, 12).run(variables)
    plain = evaluators.get("a_distance")("a", cfg, fns, mesh, 12).run(variables)

    flat = lambda x: x[mask].reshape(10, -1).astype(np.float64)
    source = flat(images["digits_mnist", "test"])
    target_mean = images["digits_uci", "train"][mask].astype(np.float64).mean(0)
    target = flat(images["digits_uci", "test"] - target_mean)
    want = a_distance.proxy_a_distance(source, target, seed=0)
    assert seen == [10]
    np.testing.assert_allclose(got["value"], want["a_distance"], atol=1e-6)
    unadapted = a_distance.proxy_a_distance(source, flat(images["digits_uci", "test"]), seed=0)
    np.testing.assert_allclose(plain["value"], unadapted["a_distance"], atol=1e-6)
    assert got["value"] < plain["value"]  # AdaBN moved the target onto the source here
    with pytest.raises(UserError, match=r"config.evals.a.adapt re-estimates BatchNorm"):
        evaluators.get("a_distance")("a", {**cfg, "adapt": adapt}, {"predict": None}, mesh, 12)


# ---------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------


def test_registry_and_clear_errors():
    assert get_spec("dan") is get_spec("mmd") and get_spec("jan") is get_spec("jmmd")
    with pytest.raises(ValueError, match="unknown domain-adaptation loss 'dnn'"):
        get_loss("dnn")
    z = np.zeros((4, 3), np.float32)
    with pytest.raises(
        ValueError, match=r"coral has unknown keys \['trade_of'\]; valid keys: \['weight'\]"
    ):
        get_loss("coral")(AdaptationInputs(features_s=z, features_t=z), {"trade_of": 1.0})
    with pytest.raises(ValueError, match=r"needs inputs \['discriminator'\]"):
        get_loss("dann")(AdaptationInputs(features_s=z, features_t=z), None)
    with pytest.raises(ValueError, match="must map"):
        dann.dann_loss(lambda h: h, z, z, 1.0)
    assert _util.resolve_config(None, {"a": 1}, "x") == {"a": 1}
    block = ml_collections.ConfigDict({"name": "coral", "weight": 2.0})
    assert _util.resolve_config(block, coral.DEFAULTS, "coral") == {"weight": 2.0}
    with pytest.raises(ValueError, match=r"\['wieght'\] \(did you mean 'weight'\?\)"):
        _util.resolve_config({"wieght": 2.0}, coral.DEFAULTS, "coral")


def test_every_registered_loss_runs_under_jit():
    rng = np.random.default_rng(19)
    fs, ft = f32(rng, 4, 3), f32(rng, 4, 3)
    ls, lt = f32(rng, 4, 2), f32(rng, 4, 2)
    for name, spec in sorted(SPECS.items()):
        disc = params = None
        if spec.discriminator_input_dim is not None:
            disc, params = make_disc(spec.discriminator_input_dim(3, 2, None))

        @jax.jit
        def run(fs, ft, ls, lt, params, spec=spec, disc=disc):
            bound = None if disc is None else (lambda h: disc.apply({"params": params}, h))
            inputs = AdaptationInputs(
                features_s=fs,
                features_t=ft,
                logits_s=ls,
                logits_t=lt,
                labels_s=jnp.array([0, 1, 0, 1]),
                progress=0.5,
                discriminator=bound,
            )
            return spec.fn(inputs, {"weight": 3.0})

        value, aux = run(fs, ft, ls, lt, params)
        assert value.shape == () and np.isfinite(value), name
        if name != "importance":
            np.testing.assert_allclose(value, 3.0 * aux["loss"], rtol=1e-6, err_msg=name)
