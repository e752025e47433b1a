"""`models/residuals.py`: the identity whose value and gradient XLA:CPU computes once per residual
point.

Its value must be its input and its backward the cotangent handed in, bit for bit (NaN where
the input is not finite); a transformer stack's and a ResNet's gradients must equal the plain
identity's to float32 rounding; and the compiled step must hold fewer fused instructions than
the plain one, by a margin that grows faster than the depth (the duplication it removes grows
with the square of the depth).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax.bench import measure
from xmodal_jax.errors import UserError
from xmodal_jax.models import residuals, transformer, zoo


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def test_value_and_gradient_pass_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    g = (rng.normal(size=x.shape) * 10.0 ** rng.integers(-30, 30, x.shape)).astype(np.float32)
    g[0, 0, :3] = [0.0, -0.0, np.inf]
    x[0, 1, :2] = [0.0, -0.0]
    y, vjp = jax.vjp(residuals.stored, jnp.asarray(x))
    np.testing.assert_array_equal(_bits(y), _bits(x))
    np.testing.assert_array_equal(_bits(jax.jit(vjp)(g)[0]), _bits(g))
    # Where the input is not finite (the step is not either), value and gradient are NaN there.
    x[1, 2, 3] = np.inf
    y, vjp = jax.vjp(residuals.stored, jnp.asarray(x))
    back = np.array(jax.jit(vjp)(g)[0])
    assert np.isnan(y[1, 2, 3]) and np.isnan(back[1, 2, 3])
    back[1, 2, 3] = g[1, 2, 3]
    np.testing.assert_array_equal(_bits(back), _bits(g))


def test_fused_is_the_plain_identity(monkeypatch):
    monkeypatch.setenv(residuals.CPU_RESIDUALS_ENV, "fused")
    x = jnp.ones((2, 3))
    assert residuals.stored(x) is x


def test_an_unknown_setting_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(residuals.CPU_RESIDUALS_ENV, "barrier")
    with pytest.raises(UserError, match=r"XMODAL_CPU_RESIDUALS='barrier'.*'stored'"):
        residuals.stored(jnp.ones(2))


def _stack_grad(depth: int, norm_first: bool = True, scan: bool = False):
    """A jitted loss gradient of a small transformer stack (width 16, 2 heads): unrolled, or
    scanned with remat (`dots`)."""
    block = dict(num_heads=2, mlp_dim=32, norm_first=norm_first)
    remat = "dots" if scan else "none"
    stack = transformer.LayerStack(transformer.TransformerBlock, block, depth, scan, remat)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    params = stack.init(jax.random.key(1), x)
    loss = lambda p: jnp.sum(jnp.sin(stack.apply(p, x)))
    return jax.jit(jax.grad(loss)), params


def _resnet_grad(stages: tuple[int, ...]):
    """A jitted loss gradient of a small ResNet (basic blocks, 8 channels, batch statistics)."""
    model = zoo.build("resnet18", stage_sizes=stages, width=0.125, num_classes=3)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(1), x, train=False)

    def loss(p):
        out, _ = model.apply({**variables, "params": p}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(out["logits"]))

    return jax.jit(jax.grad(loss)), variables["params"]


def _assert_close_trees(a, b) -> None:
    plain = jax.tree.leaves(b)
    scale = max(float(np.max(np.abs(leaf))) for leaf in plain)  # leaves near 0 differ by rounding
    for x, y in zip(jax.tree.leaves(a), plain, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize(
    "build",
    [
        lambda: _stack_grad(4, True),
        lambda: _stack_grad(4, False),
        lambda: _stack_grad(4, True, scan=True),
        lambda: _resnet_grad((2, 2)),
    ],
    ids=["pre_ln", "post_ln", "scan_remat", "resnet"],
)
def test_gradients_equal_the_plain_identitys(monkeypatch, build):
    grads = {}
    for setting in residuals.CPU_RESIDUALS:
        monkeypatch.setenv(residuals.CPU_RESIDUALS_ENV, setting)
        fn, params = build()
        grads[setting] = jax.device_get(fn(params))
    _assert_close_trees(grads["stored"], grads["fused"])


@pytest.mark.optimized  # the fusion pass under XLA's optimisations, as programs run
def test_the_step_stops_duplicating_the_residual_chain(monkeypatch):
    fused = {}
    for setting in residuals.CPU_RESIDUALS:
        monkeypatch.setenv(residuals.CPU_RESIDUALS_ENV, setting)
        for depth in (3, 6):
            fn, params = _stack_grad(depth)
            text = fn.lower(params).compile().as_text()
            fused[setting, depth] = measure.fused_instructions(text)
    saved = {d: fused["fused", d] - fused["stored", d] for d in (3, 6)}
    assert saved[3] > 0
    # The plain program's excess grows faster than the depth: duplication of the chain.
    assert saved[6] > 2 * saved[3], fused
