"""The jitted train step gives the same result on a mesh of 8 devices as on one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal_jax import tasks
from xmodal_jax.config import parse_arg
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import optim
from xmodal_jax.train import step as step_lib

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8


def _config():
    import ml_collections

    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.batch_size, c.lr, c.wd = 0, 10, 32, 0.05, 5e-4
    c.optimizer = {"name": "sgd", "momentum": 0.9, "nesterov": True}
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 32, "dropout": 0.0}
    c.data = {"name": "unused", "split": "train"}
    return c


def _run(mesh, batches):
    config = _config()
    task = tasks.build(config)
    tx, lr_fn = optim.build(config)
    rng = jax.random.key(0)
    variables = nn.unbox(jax.jit(task.init)(rng, mesh_lib.global_batch(batches[0], mesh)))
    params = variables.pop("params")
    key_data = jax.random.key_data(rng)
    state = step_lib.TrainState(jnp.int32(0), params, variables, jax.jit(tx.init)(params), key_data)
    state = jax.device_put(state, mesh_lib.replicated(mesh))
    step = jax.jit(step_lib.make_train_step(task, tx, lr_fn, config.total_steps))
    losses = []
    for b in batches:
        state, m = step(state, mesh_lib.global_batch(b, mesh))
        losses.append(float(m["train/loss"]))
    return losses, jax.device_get(state.params)


@pytest.mark.parametrize("shape", [{"data": 8}, {"data": 2, "fsdp": 4}])
def test_mesh_of_8_equals_one_device(shape):
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.random((32, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 32)}
        for _ in range(3)
    ]
    batches.append(batches[0])  # seen again after three steps: its loss must have dropped
    one = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = mesh_lib.make_mesh(shape)
    losses1, params1 = _run(one, batches)
    losses8, params8 = _run(eight, batches)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert losses1[-1] < losses1[0]  # it trains


def test_mesh_shapes_and_errors():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_lib.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        mesh_lib.mesh_shape({"batch": 8}, 8)


def test_parse_arg_keeps_types():
    args = parse_arg("seed=3,direction=u2m", seed=0, direction="m2u")
    assert args.seed == 3 and args.direction == "u2m"
