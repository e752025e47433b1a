"""`tiled_max_pool` and `max_pool`: values and gradients equal to `nn.max_pool`'s bit for bit,
and the gradient equal to a float64 numpy reference (the first maximum of each window takes the
window's gradient; overlapping windows' shares add up)."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax.models.lenet import LeNet
from xmodal_jax.models.pooling import max_pool, tiled_max_pool
from xmodal_jax.models.resnet import ResNet


def _inputs(shape, seed, grid=True):
    """Values on a coarse `grid` (most windows hold ties) or continuous, and a blank band (all
    zeros: the ties of blank image borders)."""
    x = np.random.RandomState(seed).rand(*shape)
    x = np.round(x * 3) - 1.5 if grid else x
    x[:, : shape[1] // 3] = 0.0
    return jnp.asarray(x, jnp.float32)


def _reference_grad(x, g, window, strides, padding=((0, 0), (0, 0))) -> np.ndarray:
    """float64 loops: each window's gradient to its first maximum, added up where windows
    overlap (padded positions are -inf)."""
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
    dxp = np.zeros(xp.shape, np.float64)
    n, oh, ow, c = g.shape
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                for ch in range(c):
                    win = xp[b, i * sh : i * sh + kh, j * sw : j * sw + kw, ch]
                    r, s = np.unravel_index(np.argmax(win), win.shape)  # first maximum
                    dxp[b, i * sh + r, j * sw + s, ch] += g[b, i, j, ch]
    return dxp[:, top : top + x.shape[1], left : left + x.shape[2]]


@pytest.mark.parametrize(
    "shape,window", [((2, 8, 8, 3), (2, 2)), ((3, 9, 7, 2), (2, 2)), ((2, 9, 8, 4), (3, 2))]
)
def test_equals_max_pool_and_reference(shape, window):
    x = _inputs(shape, seed=sum(shape))
    theirs = nn.max_pool(x, window, strides=window)
    ours = tiled_max_pool(x, window)
    assert ours.shape == theirs.shape
    assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes()

    g = jnp.asarray(np.random.RandomState(1).randn(*ours.shape), jnp.float32)
    grad_ours = jax.vjp(lambda x: tiled_max_pool(x, window), x)[1](g)[0]
    grad_theirs = jax.vjp(lambda x: nn.max_pool(x, window, strides=window), x)[1](g)[0]
    assert np.asarray(grad_ours).tobytes() == np.asarray(grad_theirs).tobytes()
    ref = _reference_grad(np.asarray(x, np.float64), np.asarray(g, np.float64), window, window)
    np.testing.assert_array_equal(np.asarray(grad_ours, np.float64), ref)


@pytest.mark.parametrize(
    "shape,window,strides,padding",
    [
        ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd size
        ((2, 10, 12, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # and even
        ((2, 7, 6, 2), (2, 2), (1, 1), ((0, 0), (0, 0))),  # four windows share a position
        ((1, 9, 8, 2), (3, 2), (2, 3), ((0, 1), (1, 0))),  # uneven
        ((2, 11, 11, 2), (2, 2), (3, 3), ((0, 0), (0, 0))),  # gaps between windows
    ],
)
def test_strided_equals_max_pool_and_reference(shape, window, strides, padding):
    theirs_fn = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)  # noqa: E731
    ours_fn = lambda x: max_pool(x, window, strides, padding)  # noqa: E731
    grad_ours = jax.jit(lambda x, g: jax.vjp(ours_fn, x)[1](g)[0])
    grad_theirs = jax.jit(lambda x, g: jax.vjp(theirs_fn, x)[1](g)[0])
    for grid in (True, False):
        x = _inputs(shape, seed=sum(shape), grid=grid)
        theirs, ours = theirs_fn(x), ours_fn(x)
        assert ours.shape == theirs.shape
        assert np.asarray(ours).tobytes() == np.asarray(theirs).tobytes()

        g = jnp.asarray(np.random.RandomState(2).randn(*ours.shape), jnp.float32)
        dx = np.asarray(grad_ours(x, g))
        assert dx.tobytes() == np.asarray(grad_theirs(x, g)).tobytes()
        args = (np.asarray(x, np.float64), np.asarray(g, np.float64), window, strides, padding)
        ref = _reference_grad(*args)  # up to 4 float32 shares a position: rounding
        np.testing.assert_allclose(dx.astype(np.float64), ref, rtol=1e-6, atol=1e-6)
        if grid:  # ties are common here: rounding alone would not tell a wrong winner
            assert ((dx != 0) == (ref != 0)).all()


def test_resnet_train_gradient_unchanged_by_the_pool():
    """ResNet's loss and gradient with its stem pool as `max_pool` and as `nn.max_pool` (the
    default): equal bit for bit, or within float32 rounding where XLA sums BatchNorm's
    statistics in another order in the two programs (as for LeNet above)."""
    x = _inputs((4, 32, 32, 3), seed=3, grid=False)
    kw = {"stage_sizes": (1, 1), "width": 0.25, "num_classes": 5}
    variables = ResNet(**kw).init(jax.random.PRNGKey(0), x[:2])

    def grads(pool):
        def loss(params):
            out, _ = ResNet(**kw, pool=pool).apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(out["logits"] ** 2)

        value, grad = jax.jit(jax.value_and_grad(loss))(variables["params"])
        return [value, *jax.tree_util.tree_leaves(grad)]

    ours, theirs = grads("strided"), grads("reduce_window")
    scale = max(float(np.abs(leaf).max()) for leaf in theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    with pytest.raises(ValueError, match="pool 'tiled'"):
        ResNet(**kw, pool="tiled").init(jax.random.PRNGKey(0), x[:2])


def test_nan_window_sends_no_gradient():
    x = jnp.array([[[[np.nan], [1.0]], [[2.0], [3.0]]]], jnp.float32)  # one 2x2 window
    grad = jax.grad(lambda x: tiled_max_pool(x, (2, 2)).sum())(x)
    assert np.isnan(tiled_max_pool(x, (2, 2))).all()
    np.testing.assert_array_equal(grad, np.zeros_like(x))


@pytest.mark.parametrize("norm,channels", [(None, 1), (None, 3), ("batch", 1)])
def test_lenet_train_gradient_unchanged(norm, channels):
    """The digits tables' records rest on LeNet's values: its loss and gradient are the same as
    with `nn.max_pool` (`pool="reduce_window"`), bit for bit without BatchNorm; with it, XLA sums
    the statistics in another order in the two programs (float32 rounding, ~3e-7 of the largest
    value). Pixels are continuous: windows of different pixels then tie only if their sums round
    alike, and which one wins could flip with any change of summation order, pooling or not."""
    x = _inputs((16, 28, 28, channels), seed=channels, grid=False)
    variables = LeNet(norm=norm).init(jax.random.PRNGKey(0), x[:2])

    def grads(pool):
        model = LeNet(norm=norm, pool=pool)

        def loss(params):
            out, _ = model.apply(
                {**variables, "params": params},
                x,
                train=True,
                rngs={"dropout": jax.random.PRNGKey(1)},
                mutable=["batch_stats"],
            )
            return jnp.mean(out["logits"] ** 2)

        value, grad = jax.jit(jax.value_and_grad(loss))(variables["params"])
        leaves = jax.tree_util.tree_leaves_with_path(grad)
        # A bias followed by BatchNorm has no gradient; its float32 figure is cancellation noise.
        return [value] + [
            g
            for p, g in leaves
            if not (
                norm and "Conv" in jax.tree_util.keystr(p) and "bias" in jax.tree_util.keystr(p)
            )
        ]

    ours, theirs = grads("tiled"), grads("reduce_window")
    for a, b in zip(ours, theirs, strict=True):
        if norm is None:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        else:
            scale = max(float(np.abs(leaf).max()) for leaf in theirs)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


def test_an_inference_convolution_before_the_pool_stays_xlas():
    """In a fresh process (the project's XLA:CPU default set before JAX starts): a convolution,
    ReLU and the pool compile without a YNNPACK fusion (a max-reduce there, the pool's earlier
    reshape-and-max form, pulled the convolution into one, several times slower for LeNet)."""
    code = (
        "import xmodal_jax, jax, jax.numpy as jnp\n"
        "from xmodal_jax.models.pooling import tiled_max_pool\n"
        "dims = ('NHWC', 'HWIO', 'NHWC')\n"
        "conv = lambda x, w: jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID', "
        "dimension_numbers=dims))\n"
        "x, w = jnp.ones((8, 28, 28, 3)), jnp.ones((5, 5, 3, 20))\n"
        "f = jax.jit(lambda x, w: tiled_max_pool(conv(x, w), (2, 2)))\n"
        "print('ynn' in f.lower(x, w).compile().as_text())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False"], done.stdout
