"""Sharding rules: the same training on one device and on meshes of 8 (data, FSDP, tensor
parallel), and parameters that are really split over `fsdp`."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xmodal_jax import tasks
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.parallel import sharding
from xmodal_jax.train import optim
from xmodal_jax.train import step as step_lib

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8

MODELS = {
    "vit_ti": {
        "name": "vit_ti16",
        "num_classes": 5,
        "image_size": 32,
        "depth": 2,
        "scan_layers": True,
        "head_zeroinit": False,
    },
    "resnet18": {"name": "resnet18", "num_classes": 5, "stem": "small", "width": 0.25},
}
MESHES = {
    "one": None,
    "8x1x1": {"data": 8, "fsdp": 1, "model": 1},
    "2x4x1": {"data": 2, "fsdp": 4, "model": 1},
    "2x2x2": {"data": 2, "fsdp": 2, "model": 2},
}
MIN_SIZE = 1024
STEPS = 5


def _config(model, mesh):
    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.batch_size, c.lr, c.wd = 0, STEPS, 16, 0.002, 1e-4
    c.optimizer = {"name": "sgd", "momentum": 0.9}
    c.model, c.data, c.mesh = dict(model), {"name": "unused"}, dict(mesh or {"data": 1})
    c.fsdp_min_size = MIN_SIZE
    return c


def _batches():
    """STEPS - 1 random batches, then the first again (its loss must have dropped)."""
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
            "label": rng.integers(0, 5, 16).astype(np.int32),
        }
        for _ in range(STEPS - 1)
    ]
    return batches + batches[:1]


_RUNS, _INITIAL = {}, {}


def _mesh(name):
    shape = MESHES[name]
    if shape is None:
        return mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    return mesh_lib.make_mesh(shape)


def _train(model_name, mesh_name):
    """Losses of STEPS steps and the final state (cached: the tests share runs).

    The initial state is computed once, on one device, and placed on each mesh with the
    shardings the trainer derives for it (initialising on every mesh would only repeat it)."""
    key = (model_name, mesh_name)
    if key not in _RUNS:
        mesh = _mesh(mesh_name)
        config = _config(MODELS[model_name], MESHES[mesh_name])
        task = tasks.build(config)
        tx, lr_fn = optim.build(config)
        batches = [mesh_lib.global_batch(b, mesh) for b in _batches()]
        init_fn, abstract = step_lib.init_state(config, task, tx, mesh, batches[0])
        if model_name not in _INITIAL:
            with jax.threefry_partitionable(False):  # same kind of values, compiles 4x faster
                _INITIAL[model_name] = jax.device_get(init_fn(batches[0]))
        state = jax.device_put(_INITIAL[model_name], jax.tree.map(lambda x: x.sharding, abstract))
        step = step_lib.compile_train_step(config, task, tx, lr_fn, abstract, mesh, batches[0])
        losses = []
        for b in batches:
            state, m = step(state, b)
            losses.append(float(m["train/loss"]))
        _RUNS[key] = (losses, state)
    return _RUNS[key]


@pytest.mark.parametrize("model_name", list(MODELS))
def test_meshes_give_the_losses_of_one_device(model_name):
    assert jax.device_count() == 8
    ref, _ = _train(model_name, "one")
    assert ref[-1] < ref[0]  # it trains
    for mesh_name in ("8x1x1", "2x4x1", "2x2x2"):
        losses, _ = _train(model_name, mesh_name)
        # sums run in another order on a mesh (first step: ~1e-7 apart); ResNet's batch-norm
        # training amplifies that about tenfold per step, hence 1e-4 after five steps
        np.testing.assert_allclose(losses, ref, rtol=1e-4, err_msg=mesh_name)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_fsdp_really_shards_every_large_parameter(model_name):
    _, state = _train(model_name, "2x4x1")
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    large = 0
    for path, x in flat:
        name = jax.tree_util.keystr(path)
        used = {a for e in x.sharding.spec if e for a in (e if isinstance(e, tuple) else (e,))}
        shard = x.addressable_shards[0].data.shape
        if math.prod(x.shape) >= MIN_SIZE:
            large += 1
            assert "fsdp" in used, (name, x.shape, x.sharding.spec)
            assert math.prod(shard) * 4 == math.prod(x.shape), (name, x.shape, shard)
        else:
            assert "fsdp" not in used, (name, x.shape, x.sharding.spec)
    assert large >= 5
    # the optimiser's momentum lives where its parameter does
    momentum = [
        x
        for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if "trace" in jax.tree_util.keystr(p)
    ]
    params = jax.tree.leaves(state.params)
    assert len(momentum) == len(params)
    for m, p in zip(momentum, params, strict=True):
        assert m.sharding.spec == p.sharding.spec


def test_tensor_parallel_rules_on_2x2x2():
    _, state = _train("vit_ti", "2x2x2")
    mlp = state.params["encoder"]["layers"]["mlp"]
    # (layers, embed, mlp): mlp hidden units over `model`, the rest split by FSDP
    assert mlp["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "model")
    assert mlp["fc2"]["kernel"].sharding.spec == P(None, "model", "fsdp")
    # ViT-Ti's 3 heads do not split over a model axis of 2: that dimension stays whole
    query = state.params["encoder"]["layers"]["attn"]["query"]["kernel"]  # (layers, embed, H, kv)
    assert query.sharding.spec[2] is None


def test_leaf_spec_rules():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "model": 1})
    # largest divisible free dimension; never the stacked layers axis
    assert sharding.leaf_spec(
        (12, 64, 256), P("layers", "embed", "mlp"), mesh, fsdp_min_size=1
    ) == P(None, None, "fsdp")
    assert sharding.leaf_spec((8, 6), None, mesh, fsdp_min_size=1) == P("fsdp", None)
    assert sharding.leaf_spec((6, 6), None, mesh, fsdp_min_size=1) == P(None, None)
    assert sharding.leaf_spec((64, 64), None, mesh, fsdp_min_size=10**6) == P(None, None)
    # an axis of size 1 splits nothing, so FSDP may take that dimension
    assert sharding.leaf_spec((64, 256), P("embed", "mlp"), mesh, fsdp_min_size=1) == P(
        None, "fsdp"
    )
    # a user rule that already uses fsdp is kept, and FSDP adds nothing
    mesh222 = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    rules = (("embed", "fsdp"),) + sharding.DEFAULT_RULES
    assert sharding.leaf_spec((64, 256), P("embed", "mlp"), mesh222, rules, 1) == P("fsdp", "model")


def test_sharding_rules_errors():
    bad = ml_collections.ConfigDict({"sharding_rules": [("embd", "fsdp")]})
    with pytest.raises(UserError, match="unknown logical axis 'embd'"):
        sharding.rules_from_config(bad)
    bad = ml_collections.ConfigDict({"sharding_rules": [("embed", "tensor")]})
    with pytest.raises(UserError, match="mesh axes \\['tensor'\\]"):
        sharding.rules_from_config(bad)
    ok = ml_collections.ConfigDict({"sharding_rules": [("embed", ["data", "fsdp"])]})
    assert sharding.rules_from_config(ok)[0] == ("embed", ("data", "fsdp"))


def test_flops_are_summed_over_devices():
    """XLA's cost analysis counts one device's share; the trainer reports the whole step."""
    mesh = mesh_lib.make_mesh({"data": 8})
    a = jax.device_put(np.ones((256, 512), np.float32), mesh_lib.batch_sharding(mesh))
    b = np.ones((512, 128), np.float32)
    compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    assert step_lib.flops(compiled) == pytest.approx(2 * 256 * 512 * 128, rel=0.05)
