"""Optax transfer rules: freezing without optimiser state, multipliers, layer-wise decay (also
over `nn.scan` stacks), gradual unfreezing, presets, clipping, accumulation and bf16 compute.

References are float64 numpy implementations of the update formulas written here."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from xmodal_jax import models, tasks, tree_paths
from xmodal_jax.errors import UserError
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import optim
from xmodal_jax.train import step as step_lib
from xmodal_jax.transfer import rule_plans, rules


def _config(**kw):
    c = ml_collections.ConfigDict({"lr": 0.1, "total_steps": 10, "optimizer": {"name": "sgd"}})
    c.update(kw)
    return c


def _flat(tree):
    return {
        tree_paths.path_str(p): np.asarray(x, np.float64)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _random_tree(shapes, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in shapes.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return out


SHAPES = {
    "backbone/conv/kernel": (3, 4),
    "backbone/conv/bias": (4,),
    "backbone/norm/scale": (4,),
    "head/kernel": (4, 2),
    "head/bias": (2,),
}


def _opt_state_paths(state):
    return [tree_paths.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


# ------------------------------------------------------------------ rule matching


def test_schedule_rules_first_match_and_errors():
    params, grads = _random_tree(SHAPES, 0), _random_tree(SHAPES, 1)
    schedule = [("head/.*", "base"), ("backbone/conv/.*", None), (".*", 0.01)]
    c = _config(optimizer={"name": "sgd", "momentum": 0.9}, schedule=schedule)
    tx, _ = optim.build(c)
    state = jax.jit(tx.init)(params)
    traced = sorted(p.split("/trace/")[1] for p in _opt_state_paths(state) if "/trace/" in p)
    assert traced == ["backbone/norm/scale", "head/bias", "head/kernel"]  # none when frozen
    updates, _ = jax.jit(tx.update)(grads, state, params)
    g = _flat(grads)
    for path, u in _flat(updates).items():  # first match wins: head base, conv frozen, rest 0.01
        lr = 0.1 if path.startswith("head/") else 0.0 if "/conv/" in path else 0.01
        np.testing.assert_allclose(u, -lr * g[path], rtol=1e-6)

    uncovered = _config(schedule=[("head/.*", "base")])
    with pytest.raises(UserError, match="backbone/conv/bias.*backbone/conv/kernel"):
        optim.build(uncovered)[0].init(params)
    dead = _config(schedule=[(".*", "base"), ("head/.*", None)])
    with pytest.raises(UserError, match=r"\['head/\.\*'\] match no parameter"):
        optim.build(dead)[0].init(params)
    with pytest.raises(UserError, match="starts with '/'"):
        optim.build(_config(schedule=[("/head/.*", "base"), (".*", None)]))
    with pytest.raises(UserError, match="is not a schedule"):
        optim.build(_config(schedule=[(".*", "fast")]))
    with pytest.raises(UserError, match="both set"):
        optim.build(_config(schedule=[(".*", "base")], transfer="finetune"))
    with pytest.raises(UserError, match="lr_mults entry.*matches no parameter"):
        optim.build(_config(lr_mults=[("neck/.*", 2.0)]))[0].init(params)


def test_mults_schedules_and_coupled_wd_match_numpy():
    """One SGD step: w' = w - lr_rule(t) * lr_mult * (g + wd * wd_mult * w)."""
    params, grads = _random_tree(SHAPES, 0), _random_tree(SHAPES, 1)
    total, warm = 10, 2
    c = _config(
        lr=0.1,
        total_steps=total,
        lr_schedule={"name": "cosine", "warmup_steps": warm},
        wd=0.01,
        schedule=[("head/.*", {"name": "linear", "lr": 0.5, "end": 0.2}), (".*", "base")],
        lr_mults=[(".*/bias", 3.0)],
        wd_mults=[(".*norm.*", 0.0), ("head/.*", 2.0)],
    )
    tx, base = optim.build(c)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    for t in range(4):
        updates, state = update(grads, state, params)
        if t == 0:
            continue  # step 0 of the cosine warm-up has learning rate 0
        cos = 0.1 * 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
        base_lr = 0.1 * t / warm if t < warm else cos
        head_lr = 0.5 + (0.1 - 0.5) * t / total
        assert float(base(t)) == pytest.approx(base_lr, rel=1e-6)
        p, g = _flat(params), _flat(grads)
        for path, u in _flat(updates).items():
            lr = head_lr if path.startswith("head/") else base_lr
            lr *= 3.0 if path.endswith("/bias") else 1.0
            wd = 0.01 * (0.0 if "norm" in path else 2.0 if path.startswith("head/") else 1.0)
            np.testing.assert_allclose(u, -lr * (g[path] + wd * p[path]), rtol=2e-6, atol=1e-9)


def test_clipping_sees_only_trainable_leaves_and_comes_before_weight_decay():
    params, grads = _random_tree(SHAPES, 0), _random_tree(SHAPES, 1)
    c = _config(lr=1.0, wd=0.1, grad_clip_norm=0.5, schedule=[("head/.*", "base"), (".*", None)])
    tx, _ = optim.build(c)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    g, p = _flat(grads), _flat(params)
    norm = math.sqrt(sum((g[k] ** 2).sum() for k in g if k.startswith("head/")))
    assert norm > 0.5  # so clipping acts
    for path, u in _flat(updates).items():
        if path.startswith("head/"):
            expected = -(g[path] * 0.5 / norm + 0.1 * p[path])
        else:
            expected = np.zeros_like(u)  # frozen
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ freezing in training


def _lenet_config(**kw):
    c = _config(
        seed=0,
        total_steps=3,
        batch_size=16,
        lr=0.05,
        wd=1e-3,
        optimizer={"name": "adam"},
        model={"name": "lenet", "num_classes": 10, "bottleneck": 32, "dropout": 0.0},
        data={"name": "unused"},
        mesh={"data": 1},
    )
    for key, value in kw.items():  # replaces (ConfigDict.update would merge dicts)
        c[key] = value
    return c


def _digit_batches(n, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.random((batch, 28, 28, 1), np.float32),
            "label": rng.integers(0, 10, batch).astype(np.int32),
        }
        for _ in range(n)
    ]


_VARIABLES, _RUNS = {}, {}


def _train(config, batches, accum=1):
    """(initial state, final state, losses) of training `config` on `batches` (cached)."""
    key = (config.to_json(), accum, len(batches))
    if key not in _RUNS:
        _RUNS[key] = _train_uncached(config, batches, accum)
    return _RUNS[key]


def _train_uncached(config, batches, accum):
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    task = tasks.build(config)
    tx, lr_fn = optim.build(config)
    batches = [mesh_lib.global_batch(b, mesh) for b in batches]
    # Initial variables depend only on the model's parameter layout (`dtype` is the compute
    # type; parameters are float32 either way): initialise each layout once.
    layout = json.dumps({k: v for k, v in config.model.items() if k != "dtype"}, sort_keys=True)
    if layout not in _VARIABLES:
        with jax.threefry_partitionable(False):  # same kind of values, compiles 4x faster
            variables = jax.jit(task.init)(jax.random.key(0), batches[0])
        _VARIABLES[layout] = jax.device_get(nn.unbox(variables))
    variables = dict(_VARIABLES[layout])
    params = variables.pop("params")
    first = step_lib.TrainState(
        jnp.int32(0),
        params,
        variables,
        jax.jit(tx.init)(params),
        jax.random.key_data(jax.random.key(1)),
    )
    state = first
    step = jax.jit(step_lib.make_train_step(task, tx, lr_fn, config.total_steps, accum))
    losses = []
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m["train/loss"]))
    return first, jax.device_get(state), losses


def test_frozen_parameters_have_no_state_and_stay_bitwise_equal():
    c = _lenet_config(
        schedule=[("head/.*", "base"), ("bottleneck/.*", "base"), (".*", None)], grad_clip_norm=1.0
    )
    first, last, _ = _train(c, _digit_batches(3))
    frozen = [
        "Conv_0/kernel",
        "Conv_0/bias",
        "Conv_1/kernel",
        "Conv_1/bias",
        "fc/kernel",
        "fc/bias",
    ]
    p0, p1 = _flat(first.params), _flat(last.params)
    raw = lambda tree: {
        tree_paths.path_str(p): np.asarray(x).view(np.uint32)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
    r0, r1 = raw(first.params), raw(last.params)
    for path in frozen:
        assert np.array_equal(r0[path], r1[path]), path
    for path in ("head/kernel", "bottleneck/kernel"):
        assert not np.allclose(p0[path], p1[path]), path
    # Adam moments (mu, nu) exist for the 4 trainable leaves only
    state_paths = _opt_state_paths(last.opt_state)
    trainable = ["bottleneck/bias", "bottleneck/kernel", "head/bias", "head/kernel"]
    for moment in ("mu", "nu"):
        found = sorted(p.split(f"/{moment}/")[1] for p in state_paths if f"/{moment}/" in p)
        assert found == trainable, (moment, found)


def test_presets_linear_probe_and_lit():
    c = _lenet_config(transfer="linear_probe")
    first, last, _ = _train(c, _digit_batches(2))
    changed = {
        k for k, v in _flat(last.params).items() if not np.array_equal(v, _flat(first.params)[k])
    }
    assert changed == {"head/kernel", "head/bias"}

    two_tower = _random_tree(
        {"img/enc/kernel": (3, 3), "txt/enc/kernel": (3, 3), "img_proj/kernel": (3, 2)}, 0
    )
    r, _ = rules.from_config(_config(transfer="lit"))
    plans = rule_plans.plan(r, [(p, x.shape) for p, x in rule_plans.named_leaves(two_tower)])
    frozen = [
        p for (p, _), pl in zip(rule_plans.named_leaves(two_tower), plans, strict=True) if pl.frozen
    ]
    assert frozen == ["img/enc/kernel"]  # `img_proj` is not inside the tower `img/`
    r, _ = rules.from_config(_config(transfer="locked_text", text_tower="txt"))
    plans = rule_plans.plan(r, [(p, x.shape) for p, x in rule_plans.named_leaves(two_tower)])
    assert [pl.frozen for pl in plans] == [False, False, True]
    r, _ = rules.from_config(_config(transfer="lit", image_tower="vision"))
    with pytest.raises(UserError, match=r"\['vision/\.\*'\] match no parameter"):
        rule_plans.plan(r, [(p, x.shape) for p, x in rule_plans.named_leaves(two_tower)])
    with pytest.raises(UserError, match="unknown"):
        rules.from_config(_config(transfer="lit_probe"))


# ------------------------------------------------------------------ layer-wise decay


def _random_params(module, x, seed=0):
    """Random values in the parameter layout of `module` (no initialiser compiled)."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)


def _vit(scan):
    return models.build(
        {
            "name": "vit_ti16",
            "image_size": 8,
            "patch_size": 4,
            "width": 8,
            "depth": 3,
            "num_heads": 2,
            "mlp_dim": 16,
            "num_classes": 3,
            "scan_layers": scan,
        }
    )


def _depth_of(path, depth):
    """Hand-written layer ids of the small ViT: embeddings 0, block i -> i + 1, rest L + 1."""
    if path.split("/")[0] in ("embedding", "cls", "pos_embedding"):
        return 0
    if path.startswith("encoder/layer_"):
        return int(path.split("/")[1].split("_")[1]) + 1
    return depth + 1


def test_llrd_per_layer_and_through_nn_scan():
    decay, lr, depth = 0.5, 0.1, 3
    x = jnp.zeros((1, 8, 8, 3))
    unscanned = _random_params(_vit(False), x)
    grads = jax.tree.map(
        lambda p: jnp.asarray(np.random.default_rng(p.size).normal(size=p.shape), jnp.float32),
        unscanned,
    )
    c = _config(lr=lr, llrd=decay)
    tx, _ = optim.build(c)
    updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(unscanned), unscanned)
    g = _flat(grads)
    for path, u in _flat(updates).items():
        scale = decay ** (depth + 1 - _depth_of(path, depth))
        np.testing.assert_allclose(u, -lr * scale * g[path], rtol=1e-6, err_msg=path)

    # the same model with its layers stacked by nn.scan: one leaf per weight, same updates
    stack = lambda tree: {
        **{k: v for k, v in tree.items() if k != "encoder"},
        "encoder": {
            "layers": jax.tree.map(
                lambda *xs: jnp.stack(xs), *(tree["encoder"][f"layer_{i}"] for i in range(depth))
            )
        },
    }
    scanned_shapes = jax.eval_shape(_vit(True).init, jax.random.key(0), x)["params"]
    assert jax.tree.structure(nn.unbox(scanned_shapes)) == jax.tree.structure(stack(grads))
    params_s, grads_s = stack(unscanned), stack(grads)
    updates_s, _ = jax.jit(tx.update)(grads_s, jax.jit(tx.init)(params_s), params_s)
    np.testing.assert_allclose(
        np.asarray(updates_s["encoder"]["layers"]["mlp"]["fc1"]["kernel"]),
        np.asarray(stack(updates)["encoder"]["layers"]["mlp"]["fc1"]["kernel"]),
        rtol=1e-6,
    )
    for a, b in zip(jax.tree.leaves(updates_s), jax.tree.leaves(stack(updates)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_layer_ids_resnet_and_two_towers():
    paths = [
        "stem_conv/kernel",
        "stage1_block1_conv1/kernel",
        "stage4_block2_norm2/scale",
        "head/kernel",
    ]
    ids, depth = rule_plans.layer_ids(paths)
    assert ids == [("", 0), ("", 1), ("", 4), ("", 5)] and depth == {"": 4}
    paths = [
        "img/embedding/kernel",
        "img/encoder/layer_1/mlp/fc1/kernel",
        "img/head/kernel",
        "txt/token_embedding/embedding",
        "txt/encoder/layer_5/attn/query/kernel",
        "txt/norm/scale",
        "fusion/kernel",
    ]
    ids, depth = rule_plans.layer_ids(paths)
    assert depth == {"img/": 2, "txt/": 6}
    assert ids == [
        ("img/", 0),
        ("img/", 2),
        ("img/", 3),
        ("txt/", 0),
        ("txt/", 6),
        ("txt/", 7),
        None,
    ]
    with pytest.raises(UserError, match="no parameter is in a recognised layer"):
        rule_plans.llrd_scales(["Conv_0/kernel", "head/kernel"], 0.7)


# ------------------------------------------------------------------ gradual unfreezing


def test_unfreeze_per_layer_of_a_scanned_stack():
    """Everything frozen but the head; layer 2 of the scanned encoder unlocks at step 2."""
    x = jnp.zeros((1, 8, 8, 3))
    params = _random_params(_vit(True), x)
    grads = jax.tree.map(jnp.ones_like, params)
    c = _config(
        lr=0.1,
        optimizer={"name": "sgd", "momentum": 0.9},
        wd=0.01,
        schedule=[("head/.*", "base"), (".*", None)],
        unfreeze=[(2, "encoder/layer_2/.*")],
    )
    tx, _ = optim.build(c)
    state = jax.jit(tx.init)(params)
    # the stack carries momentum (one of its layers will train), the embeddings none
    traced = [p for p in _opt_state_paths(state) if "/trace/" in p]
    assert any("encoder/layers/mlp/fc1/kernel" in p for p in traced)
    assert not any("embedding" in p or "pos_embedding" in p for p in traced)
    update = jax.jit(tx.update)
    history = [params]
    for _ in range(4):
        updates, state = update(grads, state, history[-1])
        history.append(optax.apply_updates(history[-1], updates))
    stack = [np.asarray(h["encoder"]["layers"]["mlp"]["fc1"]["kernel"]) for h in history]
    for t in range(4):  # layers 0 and 1 never move, bit for bit
        assert np.array_equal(stack[t + 1][:2].view(np.uint32), stack[0][:2].view(np.uint32))
    assert np.array_equal(stack[2][2], stack[0][2])  # locked during steps 0 and 1
    # from step 2: momentum starts from zero, coupled decay included
    p0 = stack[0][2].astype(np.float64)
    p3 = p0 - 0.1 * (1 + 0.01 * p0)
    p4 = p3 - 0.1 * (0.9 * (1 + 0.01 * p0) + (1 + 0.01 * p3))
    np.testing.assert_allclose(stack[3][2], p3, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stack[4][2], p4, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(history[4]["embedding"]["kernel"], params["embedding"]["kernel"])


# ------------------------------------------------------------------ accumulation and bf16


TINY_VIT = {
    "name": "vit_ti16",
    "image_size": 8,
    "patch_size": 4,
    "width": 16,
    "depth": 1,
    "num_heads": 2,
    "num_classes": 10,
    "head_zeroinit": False,
}


def _vit_batches():
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.random((16, 8, 8, 3), np.float32),
            "label": rng.integers(0, 10, 16).astype(np.int32),
        }
        for _ in range(2)
    ]


def test_gradient_accumulation_matches_the_full_batch():
    c = _lenet_config(model=TINY_VIT, optimizer={"name": "sgd", "momentum": 0.9})
    _, full, losses_full = _train(c, _vit_batches(), accum=1)
    _, micro, losses_micro = _train(c, _vit_batches(), accum=4)
    np.testing.assert_allclose(losses_micro, losses_full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro.params), jax.tree.leaves(full.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_keeps_float32_params_and_optimizer_state():
    c32 = _lenet_config(model=TINY_VIT, optimizer={"name": "sgd", "momentum": 0.9})
    c16 = _lenet_config(model={**TINY_VIT, "dtype": "bfloat16"}, optimizer=c32.optimizer)
    _, _, losses32 = _train(c32, _vit_batches())
    _, bf16, losses16 = _train(c16, _vit_batches())  # from the same float32 parameters
    for tree in (bf16.params, bf16.opt_state):
        assert {x.dtype for x in jax.tree.leaves(tree) if x.ndim} == {np.dtype("float32")}
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2)
    assert losses16 != losses32  # the compute did run in bfloat16
