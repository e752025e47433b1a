"""The domain-adaptation task: every registered loss trains through the generic train step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from xmodal_jax import tasks
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import adaptation
from xmodal_jax.objectives.adaptation import coral as coral_lib
from xmodal_jax.objectives.classification import softmax_xent
from xmodal_jax.parallel import mesh as mesh_lib
from xmodal_jax.train import optim
from xmodal_jax.train import step as step_lib


def _config(method, **options):
    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.batch_size, c.lr = 0, 10, 8, 0.01
    c.task = "domain_adaptation"
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 16, "dropout": 0.0}
    c.data = {"source": {"name": "x", "split": "train"}, "target": {"name": "y", "split": "train"}}
    c.adaptation = {"method": method, "hidden": (32,), **options}
    return c


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    dom = lambda: {"image": rng.random((8, 28, 28, 1), np.float32), "label": rng.integers(0, 10, 8)}
    return {"source": dom(), "target": dom()}


@pytest.mark.parametrize("method", sorted(adaptation.SPECS))
def test_every_method_trains(method):
    opts = {} if adaptation.get_spec(method).discriminator_input_dim else {"hidden": None}
    config = _config(method)
    if "hidden" in opts:
        config.adaptation = {"method": method}
    task = tasks.build(config)
    tx, lr_fn = optim.build(config)
    mesh = mesh_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
    batch = mesh_lib.global_batch(_batch(), mesh)
    init_fn, _ = step_lib.init_state(config, task, tx, mesh, batch)
    state = init_fn(batch)
    params = state.params
    assert ("discriminator" in params) == (task.discriminator is not None)
    step = jax.jit(step_lib.make_train_step(task, tx, lr_fn, 10))
    new_state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["train/loss"]))
    assert any(k.startswith("train/adapt/") for k in metrics)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, new_state.params)
    assert all(jax.tree.leaves(changed["model"]))
    if "discriminator" in params:
        assert all(jax.tree.leaves(changed["discriminator"]))


def test_loss_is_source_cross_entropy_plus_weighted_transfer_loss():
    config = _config("coral", weight=0.7)
    config.adaptation = {"method": "coral", "weight": 0.7}
    task = tasks.build(config)
    batch = _batch(3)
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    params = variables.pop("params")
    loss, _ = jax.jit(task.loss)(params, variables, batch, jax.random.key(2), 0.5)
    images = jnp.concatenate([batch["source"]["image"], batch["target"]["image"]])
    out = jax.jit(task.model.apply)({"params": params["model"]}, images)
    want = softmax_xent(out["logits"][:8], batch["source"]["label"]) + 0.7 * coral_lib.coral(
        out["pooled"][:8], out["pooled"][8:]
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)


@pytest.mark.parametrize("warmup,progress", [("none", 0.1), ("sigmoid", 0.1), ("sigmoid", 0.6)])
def test_warmup_ramps_the_transfer_loss_only(warmup, progress):
    config = _config("coral")
    config.adaptation = {"method": "coral", "weight": 0.7, "warmup": warmup}
    task = tasks.build(config)
    batch = _batch(3)
    variables = jax.jit(task.init)(jax.random.key(0), batch)
    params = variables.pop("params")
    loss, _ = jax.jit(task.loss)(params, variables, batch, jax.random.key(2), progress)
    images = jnp.concatenate([batch["source"]["image"], batch["target"]["image"]])
    out = jax.jit(task.model.apply)({"params": params["model"]}, images)
    ramp = 1.0 if warmup == "none" else 2.0 / (1.0 + np.exp(-10.0 * progress)) - 1.0
    xent = softmax_xent(out["logits"][:8], batch["source"]["label"])
    want = xent + ramp * 0.7 * coral_lib.coral(out["pooled"][:8], out["pooled"][8:])
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_warmup_is_refused_where_the_loss_replaces_the_source_loss():
    config = _config("importance")
    config.adaptation = {"method": "importance", "warmup": "sigmoid"}
    with pytest.raises(UserError, match="replaces the source cross-entropy"):
        tasks.build(config)
    config.adaptation = {"method": "coral", "warmup": "linear"}
    with pytest.raises(UserError, match="sigmoid"):
        tasks.build(config)


def test_unknown_method_names_the_choices():
    from xmodal_jax.errors import UserError

    with pytest.raises(UserError, match="dann"):
        tasks.build(_config("danm"))


def test_unknown_task_names_the_closest():
    from xmodal_jax.errors import UserError

    config = _config("dann")
    config.task = "domain_adaptaton"
    with pytest.raises(UserError, match=r"closest: \['domain_adaptation'[],].*; the tasks: \["):
        tasks.build(config)
    assert sorted(tasks.TASKS) == [
        "classification",
        "domain_adaptation",
        "finetune",
        "source_free",
        "two_tower",
        "zeroshot_adaptation",
    ]


def test_pretrained_weights_start_the_model_and_the_head_is_new(tmp_path):
    """`config.pretrained` merges a checkpoint into the adapted model at initialisation: every
    backbone parameter and BatchNorm statistic is the checkpoint's, the head (another class
    count) is fresh, and the discriminator is added beside them."""
    import flax.linen as nn

    from xmodal_jax.models import zoo
    from xmodal_jax.transfer import checkpoint_io

    tiny = {"width": 0.125, "stage_sizes": (1, 1, 1, 1)}
    source = zoo.build("resnet18", num_classes=5, **tiny)
    x = np.zeros((1, 32, 32, 3), np.float32)
    saved = nn.unbox(jax.jit(source.init)(jax.random.key(3), x))
    perturb = lambda v: v + 0.1 * jax.random.normal(jax.random.key(4), v.shape)
    saved = jax.jit(lambda tree: jax.tree.map(perturb, tree))(saved)
    path = str(tmp_path / "tiny_resnet.safetensors")
    checkpoint_io.save(path, saved, {"arch": "resnet18", "overrides": {"num_classes": 5, **tiny}})

    config = _config("dann")
    config.model = {"name": "resnet18", "num_classes": 10, **tiny}
    config.pretrained = {"name": path}
    task = tasks.build(config)
    rng = np.random.default_rng(0)
    dom = lambda: {"image": rng.random((4, 32, 32, 3), np.float32), "label": np.arange(4)}
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), {"source": dom(), "target": dom()}))
    got = checkpoint_io.flatten({**variables, "params": variables["params"]["model"]})
    want = checkpoint_io.flatten(saved)
    backbone = [p for p in want if "/head/" not in p]
    assert any(p.startswith("batch_stats/") for p in backbone) and len(backbone) > 20
    for p in backbone:
        np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]), err_msg=p)
    assert got["params/head/kernel"].shape == (want["params/head/kernel"].shape[0], 10)
    assert "discriminator" in variables["params"]


def test_pretrained_config_with_unknown_keys_is_one_error():
    config = _config("dann")
    config.pretrained = {"name": None, "layers": 3}
    with pytest.raises(UserError, match=r"config.pretrained has unknown keys \['layers'\]"):
        tasks.build(config)


def test_adabn_of_an_adapted_model_re_estimates_the_model_statistics_only():
    """The task's `adapt_batch_norm` (what an `adabn_classification` evaluator is handed) runs
    AdaBN on the classifier inside the adapted variables: its statistics are those AdaBN gives
    the bare classifier, the parameters (the discriminator's too) are untouched."""
    import flax.linen as nn

    from xmodal_jax.objectives.adaptation import adabn

    config = _config("dann")
    config.model = {"name": "resnet18", "num_classes": 10, "width": 0.125, "stage_sizes": (1,) * 4}
    task = tasks.build(config)
    rng = np.random.default_rng(0)
    dom = lambda: {"image": rng.random((4, 32, 32, 3), np.float32), "label": np.arange(4)}
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), {"source": dom(), "target": dom()}))
    images = [rng.random((4, 32, 32, 3), np.float32) + 2.0 for _ in range(2)]
    adapted = task.predict_fns()["adapt_batch_norm"](variables, images)
    bare = {**variables, "params": variables["params"]["model"]}
    want = adabn.adapt_batch_norm(task.model, bare, images, train=False)["batch_stats"]
    assert adapted["params"] is variables["params"]
    jax.tree.map(np.testing.assert_array_equal, adapted["batch_stats"], want)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), want, variables["batch_stats"])
    assert all(jax.tree.leaves(moved))


def test_evaluators_adapting_one_model_on_one_split_estimate_statistics_once(monkeypatch):
    """A digits AdaBN run's `target` and `a_distance_adabn` evaluators adapt the same variables
    on the same split: the statistics are estimated once per evaluation, again for new
    variables or another split, and every time for mutable (numpy) variables."""
    from xmodal_jax.evaluators import adaptation as adaptation_evals

    rng = np.random.default_rng(0)
    batches = [rng.random((4, 3), np.float32) for _ in range(2)]
    monkeypatch.setattr(
        adaptation_evals.classification,
        "local_batches",
        lambda cfg, batch_size: ({"image": b, "_mask": np.ones(4, bool)} for b in batches),
    )
    calls = []

    def adapt_batch_norm(variables, images):
        stacked = np.concatenate(list(images))
        calls.append(len(stacked))
        return {**variables, "batch_stats": {"mean": stacked.mean(0) + variables["params"]["w"]}}

    fns = {"adapt_batch_norm": adapt_batch_norm}
    split, other = {"name": "t", "split": "train"}, {"name": "t", "split": "test"}
    variables = {"params": {"w": jnp.ones(3)}, "batch_stats": {"mean": jnp.zeros(3)}}
    first = adaptation_evals._adapted(fns, split, variables, 8)
    again = adaptation_evals._adapted(fns, split, variables, 8)
    assert calls == [8]
    assert again["batch_stats"] is first["batch_stats"] and again["params"] is variables["params"]
    np.testing.assert_allclose(first["batch_stats"]["mean"], np.concatenate(batches).mean(0) + 1)
    adaptation_evals._adapted(fns, other, variables, 8)
    assert calls == [8, 8]
    moved = {**variables, "params": {"w": jnp.full(3, 2.0)}}
    got = adaptation_evals._adapted(fns, other, moved, 8)
    assert calls == [8, 8, 8]
    np.testing.assert_allclose(got["batch_stats"]["mean"], np.concatenate(batches).mean(0) + 2)
    host = jax.device_get(moved)
    adaptation_evals._adapted(fns, other, host, 8)
    adaptation_evals._adapted(fns, other, host, 8)
    assert calls == [8, 8, 8, 8, 8]
