"""`models/cotangent.py`: the identity whose gradient XLA:CPU computes once per residual point.

Its backward must be the cotangent itself, bit for bit (the reference: the cotangent handed in),
a transformer stack's gradients must equal the plain identity's to float32 rounding, and the
compiled backward must hold fewer fused instructions than the plain one, by a margin that grows
with the depth (the duplication it removes grows with the square of the depth).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax.bench import measure
from xmodal_jax.errors import UserError
from xmodal_jax.models import cotangent, transformer


def test_the_backward_is_the_cotangent_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)).astype(np.float32)
    g = (rng.normal(size=x.shape) * 10.0 ** rng.integers(-30, 30, x.shape)).astype(np.float32)
    g[0, 0, :3] = [0.0, -0.0, np.inf]
    _, vjp = jax.vjp(cotangent.materialized_cotangent, x)
    (back,) = jax.jit(vjp)(g)
    np.testing.assert_array_equal(np.asarray(back).view(np.uint32), g.view(np.uint32))
    np.testing.assert_array_equal(jax.jit(cotangent.materialized_cotangent)(x), x)
    # Where the input is not finite (the forward is not either), the gradient is NaN there.
    x[1, 2, 3] = np.inf
    (back,) = jax.jit(jax.vjp(cotangent.materialized_cotangent, jnp.asarray(x))[1])(g)
    back = np.array(back)
    assert np.isnan(back[1, 2, 3])
    back[1, 2, 3] = g[1, 2, 3]
    np.testing.assert_array_equal(back.view(np.uint32), g.view(np.uint32))


def test_fused_is_the_plain_identity(monkeypatch):
    monkeypatch.setenv(cotangent.CPU_COTANGENT_ENV, "fused")
    x = jnp.ones((2, 3))
    assert cotangent.materialized_cotangent(x) is x


def test_an_unknown_setting_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(cotangent.CPU_COTANGENT_ENV, "barrier")
    with pytest.raises(UserError, match=r"XMODAL_CPU_COTANGENT='barrier'.*'materialized'"):
        cotangent.materialized_cotangent(jnp.ones(2))


def _stack_grad(depth: int, norm_first: bool = True):
    """A jitted loss gradient of a small transformer stack (width 16, 2 heads), unrolled."""
    block = dict(num_heads=2, mlp_dim=32, norm_first=norm_first)
    stack = transformer.LayerStack(transformer.TransformerBlock, block, depth)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    params = stack.init(jax.random.key(1), x)
    loss = lambda p: jnp.sum(jnp.sin(stack.apply(p, x)))
    return jax.jit(jax.grad(loss)), params


@pytest.mark.parametrize("norm_first", [True, False], ids=["pre_ln", "post_ln"])
def test_stack_gradients_equal_the_plain_identitys(monkeypatch, norm_first):
    grads = {}
    for setting in cotangent.CPU_COTANGENT:
        monkeypatch.setenv(cotangent.CPU_COTANGENT_ENV, setting)
        fn, params = _stack_grad(4, norm_first)
        grads[setting] = jax.device_get(fn(params))
    plain = jax.tree.leaves(grads["fused"])
    scale = max(float(np.max(np.abs(b))) for b in plain)  # leaves near 0 differ by rounding
    for a, b in zip(jax.tree.leaves(grads["materialized"]), plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.optimized  # the fusion pass under XLA's optimisations, as programs run
def test_the_backward_stops_duplicating_the_residual_chain(monkeypatch):
    fused = {}
    for setting in cotangent.CPU_COTANGENT:
        monkeypatch.setenv(cotangent.CPU_COTANGENT_ENV, setting)
        for depth in (3, 6):
            fn, params = _stack_grad(depth)
            text = fn.lower(params).compile().as_text()
            fused[setting, depth] = measure.fused_instructions(text)
    saved = {d: fused["fused", d] - fused["materialized", d] for d in (3, 6)}
    assert saved[3] > 0
    # The plain program's excess grows faster than the depth: duplication of the chain.
    assert saved[6] > 2 * saved[3], fused
