"""Contrastive losses against float64 numpy references; sharded == unsharded on 8 devices."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from xmodal_jax.objectives import contrastive as C

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8

N, D = 16, 8


def _np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_logsumexp(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.exp(a - m).sum(axis=axis))


def np_clip(img, txt, log_scale):
    """Symmetric InfoNCE, written from the formula in float64."""
    zi, zt = _np_normalize(img), _np_normalize(txt)
    logits = math.exp(log_scale) * zi @ zt.T
    n = len(img)
    ce_i2t = -(np.diag(logits) - _np_logsumexp(logits, 1)).sum() / n
    ce_t2i = -(np.diag(logits) - _np_logsumexp(logits, 0)).sum() / n
    return 0.5 * (ce_i2t + ce_t2i)


def np_siglip(img, txt, log_scale, bias):
    """-(1/N) sum_ij log sigmoid(y_ij (exp(t') zi.zt + b)), y = +1 on the diagonal, -1 off it."""
    zi, zt = _np_normalize(img), _np_normalize(txt)
    logits = math.exp(log_scale) * zi @ zt.T + bias
    y = 2 * np.eye(len(img)) - 1
    return np.log1p(np.exp(-y * logits)).sum() / len(img)


def np_num_grad(f, args, h=1e-6):
    """Central finite differences of a float64 function w.r.t. each argument."""
    grads = []
    for k, a in enumerate(args):
        a = np.asarray(a, np.float64)
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            plus, minus = [list(args) for _ in range(2)]
            ap, am = a.copy(), a.copy()
            ap[idx] += h
            am[idx] -= h
            plus[k], minus[k] = ap, am
            g[idx] = (f(*plus) - f(*minus)) / (2 * h)
        grads.append(g)
    return grads


def _mesh(shape, names=("data", "fsdp")):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    # Unnormalised, with correlated pairs so the positives are not negligible.
    img = rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, size=(N, 1))
    txt = img + 0.8 * rng.normal(size=(N, D))
    return img, txt


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def test_clip_loss_and_grads_match_float64_reference(batch):
    img, txt = batch
    s = 2.3
    loss, grads = jax.jit(jax.value_and_grad(C.clip_loss, argnums=(0, 1, 2)))(*_f32(img, txt, s))
    np.testing.assert_allclose(loss, np_clip(img, txt, s), rtol=1e-5)
    for g, ref in zip(grads, np_num_grad(np_clip, [img, txt, s]), strict=True):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_siglip_loss_and_grads_match_float64_reference(batch):
    img, txt = batch
    s, b = math.log(10.0), -2.0
    fn = jax.value_and_grad(C.siglip_loss, argnums=(0, 1, 2, 3))
    loss, grads = fn(*_f32(img, txt, s, b))
    np.testing.assert_allclose(loss, np_siglip(img, txt, s, b), rtol=1e-5)
    for g, ref in zip(grads, np_num_grad(np_siglip, [img, txt, s, b]), strict=True):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5)


def test_siglip_default_init_matches_reference(batch):
    img, txt = batch
    params = C.SigLIPLogitParams().init(jax.random.key(0))["params"]
    s, b = nn.unbox(params["log_scale"]), nn.unbox(params["bias"])
    np.testing.assert_allclose([s, b], [math.log(10.0), -10.0], rtol=1e-7)
    loss = C.siglip_loss(*_f32(img, txt), s, b)
    np.testing.assert_allclose(loss, np_siglip(img, txt, math.log(10.0), -10.0), rtol=1e-5)


MESHES = [((8, 1), ("data", "fsdp")), ((2, 4), ("data", "fsdp"))]


@pytest.mark.parametrize("shape,names", MESHES)
def test_sharded_clip_equals_unsharded(batch, shape, names):
    mesh = _mesh(shape, names)
    img, txt, s = _f32(*batch, 2.3)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)

    sharded = jax.jit(
        jax.value_and_grad(
            lambda i, t, s: C.clip_loss_sharded(i, t, s, mesh=mesh), argnums=(0, 1, 2)
        )
    )
    loss_s, grads_s = sharded(img_s, txt_s, s)
    loss, grads = jax.jit(jax.value_and_grad(C.clip_loss, argnums=(0, 1, 2)))(img, txt, s)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    np.testing.assert_allclose(loss_s, np_clip(*batch, 2.3), rtol=1e-5)
    for gs, g in zip(grads_s, grads, strict=True):
        np.testing.assert_allclose(gs, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,names", MESHES)
def test_sharded_siglip_equals_unsharded(batch, shape, names):
    mesh = _mesh(shape, names)
    img, txt, s, b = _f32(*batch, math.log(10.0), -2.0)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    img_s, txt_s = jax.device_put(img, sharding), jax.device_put(txt, sharding)

    sharded = jax.jit(
        jax.value_and_grad(
            lambda i, t, s, b: C.siglip_loss_sharded(i, t, s, b, mesh=mesh), argnums=(0, 1, 2, 3)
        )
    )
    loss_s, grads_s = sharded(img_s, txt_s, s, b)
    loss, grads = jax.jit(jax.value_and_grad(C.siglip_loss, argnums=(0, 1, 2, 3)))(img, txt, s, b)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
    np.testing.assert_allclose(loss_s, np_siglip(*batch, math.log(10.0), -2.0), rtol=1e-5)
    for gs, g in zip(grads_s, grads, strict=True):
        np.testing.assert_allclose(gs, g, rtol=1e-5, atol=1e-6)


def test_sharded_losses_with_a_model_axis(batch):
    """A third mesh axis replicates the loss computation; the value is unchanged."""
    mesh = _mesh((2, 2, 2), ("data", "fsdp", "model"))
    img, txt = _f32(*batch)
    clip = C.clip_loss_sharded(img, txt, jnp.float32(2.3), mesh=mesh)
    sig = C.siglip_loss_sharded(img, txt, jnp.float32(1.0), jnp.float32(-3.0), mesh=mesh)
    np.testing.assert_allclose(clip, np_clip(*batch, 2.3), rtol=1e-5)
    np.testing.assert_allclose(sig, np_siglip(*batch, 1.0, -3.0), rtol=1e-5)


def _dot_output_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(eqn.outvars[0].aval.shape)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            shapes += _dot_output_shapes(sub)
    return shapes


def test_chunked_siglip_never_builds_the_full_logit_matrix(batch):
    mesh = _mesh((8, 1))
    img, txt = _f32(*batch)
    fn = jax.grad(
        lambda i, t: C.siglip_loss_sharded(i, t, jnp.float32(1.0), jnp.float32(-1.0), mesh=mesh),
        argnums=(0, 1),
    )
    shapes = _dot_output_shapes(jax.make_jaxpr(fn)(img, txt).jaxpr)
    blocks = [s for s in shapes if len(s) == 2 and s[1] != D]
    assert blocks and all(s == (N // 8, N // 8) for s in blocks), shapes


def test_clamp_logit_scale_boxed_and_plain():
    params = {"head": {"w": jnp.ones(3) * 9.0}, "temp": C.LogitScale().init(jax.random.key(0))}
    boxed = params["temp"]["params"]["log_scale"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ()
    np.testing.assert_allclose(nn.unbox(boxed), math.log(1 / 0.07), rtol=1e-7)

    big = jax.tree.map(lambda x: x + 10.0, nn.unbox(params))
    out = jax.jit(C.clamp_logit_scale)(big)
    np.testing.assert_allclose(out["temp"]["params"]["log_scale"], math.log(100.0), rtol=1e-7)
    np.testing.assert_array_equal(out["head"]["w"], big["head"]["w"])  # untouched

    small = C.clamp_logit_scale(params)  # boxed tree, value below the cap: unchanged
    np.testing.assert_allclose(
        nn.unbox(small["temp"]["params"]["log_scale"]), math.log(1 / 0.07), rtol=1e-7
    )
    with pytest.raises(ValueError, match="no parameter named 'log_scale'"):
        C.clamp_logit_scale({"w": jnp.ones(2)})


def test_bad_inputs_raise_clear_errors(batch):
    img, txt = _f32(*batch)
    with pytest.raises(ValueError, match="equal shape"):
        C.clip_loss(img, txt[:, :4], jnp.float32(1.0))
    mesh = _mesh((8, 1))
    with pytest.raises(ValueError, match="not divisible by the 8 batch shards"):
        C.clip_loss_sharded(img[:12], txt[:12], jnp.float32(1.0), mesh=mesh)
    with pytest.raises(ValueError, match="not in the mesh axes"):
        C.siglip_loss_sharded(
            img, txt, jnp.float32(1.0), jnp.float32(0.0), mesh=mesh, batch_axes=("batch",)
        )
