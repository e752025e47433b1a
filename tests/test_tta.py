"""Test-time and source-free adaptation: TENT (loss, online evaluator, digits config) and SHOT
(information maximisation, pseudo-labels, the `source_free` task, the two-step digits chain)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from xmodal_jax import main, tasks
from xmodal_jax.errors import UserError
from xmodal_jax.evaluators import adaptation as adaptation_evals
from xmodal_jax.objectives.adaptation import shot, tent
from xmodal_jax.parallel import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ float64 references


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _entropy64(z):
    p = _softmax64(z)
    return -(p * np.log(p)).sum(-1)


def _numeric_grad(f, z, h=1e-6):
    g = np.zeros_like(z)
    for idx in np.ndindex(z.shape):
        d = np.zeros_like(z)
        d[idx] = h
        g[idx] = (f(z + d) - f(z - d)) / (2 * h)
    return g


def _logits(seed=0, shape=(7, 5)):
    return np.random.default_rng(seed).normal(size=shape) * 2.0


def test_tent_entropy_loss_and_gradient_match_float64():
    z = _logits()
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool)
    # d H / d z_j = -p_j (log p_j + H) per row; the loss is the mean over the (masked) rows
    p = _softmax64(z)
    row_grad = -p * (np.log(p) + _entropy64(z)[:, None])
    for m in (None, mask):
        w = np.ones(len(z)) if m is None else m.astype(np.float64)
        want = (_entropy64(z) * w).sum() / w.sum()
        want_grad = row_grad * w[:, None] / w.sum()
        mj = None if m is None else jnp.asarray(m)
        got = tent.entropy_loss(jnp.asarray(z, jnp.float32), mj)
        grad = jax.grad(lambda x, mj=mj: tent.entropy_loss(x, mj))(jnp.asarray(z, jnp.float32))
        np.testing.assert_allclose(float(got), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6)
        check = _numeric_grad(lambda x, w=w: (_entropy64(x) * w).sum() / w.sum(), z)
        np.testing.assert_allclose(want_grad, check, atol=1e-8)  # the reference itself


def _im64(z):
    p = _softmax64(z)
    mean = p.mean(0)
    return _entropy64(z).mean() + (mean * np.log(mean)).sum()


def test_information_maximization_and_gradient_match_float64():
    z = _logits(1)
    value, parts = shot.information_maximization(jnp.asarray(z, jnp.float32))
    mean = _softmax64(z).mean(0)
    np.testing.assert_allclose(float(value), _im64(z), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(parts["entropy"]), _entropy64(z).mean(), rtol=1e-6)
    np.testing.assert_allclose(float(parts["diversity"]), -(mean * np.log(mean)).sum(), rtol=1e-6)
    grad = jax.grad(lambda x: shot.information_maximization(x)[0])(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), _numeric_grad(_im64, z), atol=2e-6)
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        shot.information_maximization(jnp.zeros((2, 3, 4)))


def _pseudo_labels64(features, logits):
    """The paper's eq. 4-6 in float64: probability-weighted centroids, nearest by cosine
    distance, then centroids of that labelling (empty classes excluded), nearest again."""
    f = np.asarray(features, np.float64)
    p = _softmax64(logits)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)

    def nearest(weights):
        mass = weights.sum(0)
        keep = mass > 0
        c = weights[:, keep].T @ f / mass[keep][:, None]
        d = 1.0 - unit(f) @ unit(c).T
        return np.flatnonzero(keep)[d.argmin(1)]

    first = nearest(p)
    return first, nearest(np.eye(p.shape[1])[first])


def test_shot_pseudo_labels_match_the_float64_reference():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    truth = rng.integers(0, 4, 64)
    features = np.abs(centres[truth] + rng.normal(size=(64, 16)))
    for logits in (rng.normal(size=(64, 6)), np.eye(6)[truth] * 4 + rng.normal(size=(64, 6))):
        got = np.asarray(shot.pseudo_labels(jnp.asarray(features), jnp.asarray(logits)))
        first, want = _pseudo_labels64(features, logits)
        np.testing.assert_array_equal(got, want)
    # a class no example is nearest to in the first round has no centroid in the second
    empty = set(range(6)) - set(first.tolist())
    assert empty and not empty & set(got.tolist())


# ------------------------------------------------------------------ TENT evaluator


def _lenet_config(norm="batch"):
    c = ml_collections.ConfigDict()
    c.seed, c.total_steps, c.batch_size, c.lr = 0, 4, 8, 0.01
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 16, "norm": norm}
    c.data = {"name": "digits_uci", "split": "train"}
    return c


UCI_TEST = {
    "dataset": "digits_uci",
    "split": "test[:80]",
    "pp": "value_range(0, 1, in_hi=16)|resize(28)|keep('image', 'label')",
}


def _tent(tfds_dir, norm="batch", **opts):
    task = tasks.build(_lenet_config(norm))
    batch = {"image": np.zeros((2, 28, 28, 1), np.float32)}
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    cfg = {"type": "tent_classification", **UCI_TEST, **opts}
    ev = adaptation_evals.TentClassification("target", cfg, task.predict_fns(), mesh, 32)
    return ev, variables


def _batches(ev):
    from xmodal_jax.data import pipeline

    for local in pipeline.eval_batches(ev.data_cfg, batch_size=32):
        yield mesh_lib.global_batch({k: local[k] for k in ("image", "label", "_mask")}, ev.mesh)


def test_tent_adapts_only_batch_norm_affine_parameters_and_leaves_variables_alone(tfds_dir):
    ev, variables = _tent(tfds_dir, lr=0.05)
    before = jax.tree.map(np.array, variables)
    metrics = ev.run(variables)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["adapt/entropy"] > 0
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # given variables untouched

    batch = next(_batches(ev))
    norm, opt_state = ev.initial(variables, batch)
    bn = {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}
    assert set(norm) == bn and all(set(v) == {"scale", "bias"} for v in norm.values())
    adapted, _, _ = ev._adapt(variables, norm, opt_state, batch)
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), adapted, norm)
    assert all(jax.tree.leaves(moved))  # every BN scale and bias took a step
    # the adapted model is `variables` with those leaves replaced, and nothing else
    params = jax.tree.map(np.array, variables["params"])
    for path, leaves in adapted.items():
        params[path] = {**params[path], **jax.tree.map(np.asarray, leaves)}
    out, _ = ev._apply(variables, batch, adapted)
    out2, _ = ev._apply({**variables, "params": params}, batch)
    np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(out2["logits"]))


def test_tent_batch_norm_uses_masked_batch_statistics(tfds_dir):
    """Padding rows do not enter the statistics: a batch's real rows give the same logits
    whatever the padding rows hold, and a row's logits depend on the rest of the batch."""
    ev, variables = _tent(tfds_dir)
    x = np.random.default_rng(0).random((4, 28, 28, 1), np.float32)
    mask = np.array([1, 1, 1, 0], bool)
    a, _ = ev._apply(variables, {"image": x, "_mask": mask})
    b, _ = ev._apply(variables, {"image": np.concatenate([x[:3], x[3:] + 5]), "_mask": mask})
    np.testing.assert_allclose(np.asarray(a["logits"])[:3], np.asarray(b["logits"])[:3], atol=1e-5)
    c, _ = ev._apply(variables, {"image": x[:3]})
    np.testing.assert_allclose(np.asarray(a["logits"])[:3], np.asarray(c["logits"]), atol=1e-5)
    d, _ = ev._apply(variables, {"image": np.concatenate([x[:2], x[3:]])})
    assert not np.allclose(np.asarray(c["logits"])[:2], np.asarray(d["logits"])[:2], atol=1e-4)


def test_tent_episodic_equals_fresh_adaptation_of_every_batch(tfds_dir):
    ev, variables = _tent(tfds_dir, episodic=True, lr=0.05)
    episodic = ev.run(variables)
    totals, entropies, norms = None, [], []
    for batch in _batches(ev):  # each batch adapted alone from the trained parameters
        norm, part_state = ev.initial(variables, batch)
        new_norm, _, part = ev._adapt(variables, norm, part_state, batch)
        norms.append(new_norm)
        entropies.append(float(part.pop("entropy")))
        totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
    fresh = {**ev.metrics(totals), "adapt/entropy": float(np.mean(entropies))}
    assert len(norms) == 3  # 80 examples in batches of 32: the last one padded
    assert episodic == pytest.approx(fresh, abs=1e-6)
    ev.opts["episodic"] = False
    online = ev.run(variables)
    assert online["adapt/entropy"] != pytest.approx(episodic["adapt/entropy"], abs=1e-6)


def test_tent_needs_batch_norm_and_valid_options(tfds_dir):
    ev, variables = _tent(tfds_dir, norm=None)
    with pytest.raises(UserError, match="norm='batch'"):
        ev.run(variables)
    with pytest.raises(UserError, match="optimizer='rmsprop'"):
        _tent(tfds_dir, optimizer="rmsprop")
    with pytest.raises(UserError, match="steps >= 0"):
        _tent(tfds_dir, steps=-1)


def test_tent_with_no_step_predicts_as_episodic_tent_before_its_updates(tfds_dir):
    """`steps=0`: every batch normalised with its own statistics, nothing updated (the TENT
    code's `norm` baseline): online, its predictions and entropies are episodic TENT's, which
    predicts each batch before updating from the trained parameters."""
    norm_only, variables = _tent(tfds_dir, steps=0)
    episodic, _ = _tent(tfds_dir, episodic=True, lr=0.05)
    got, want = norm_only.run(variables), episodic.run(variables)
    assert got == pytest.approx(want, abs=1e-6)
    batch = next(_batches(norm_only))
    norm, opt_state = norm_only.initial(variables, batch)
    kept, _, _ = norm_only._adapt(variables, norm, opt_state, batch)
    jax.tree.map(np.testing.assert_array_equal, kept, norm)


# ------------------------------------------------------------------ configs end to end

SMALL = [
    "--config.total_steps=3",
    "--config.batch_size=16",
    "--config.log_every=1",
    "--config.checkpoint_every=3",
    "--config.evals.a_distance.tsne_points=0",
    *(f"--config.evals.{e}.split=test[:200]" for e in ("source", "target")),
    *(f"--config.evals.a_distance.{d}.split=test[:100]" for d in ("source", "target")),
]


def test_digits_tent_config_reports_target_before_and_after_tent(tmp_path, tfds_dir):
    cfg = "experiments/digits/tent.py:direction=u2m,lr=0.001"
    less = "--config.evals.target_no_adapt.split=test[:200]"
    out = main.run(["train", "--config", cfg, "--workdir", str(tmp_path), *SMALL, less])
    for key in ("eval/source/accuracy", "eval/target/accuracy", "eval/target_no_adapt/accuracy"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["eval/target/adapt/entropy"] > 0
    assert out["eval/target/accuracy"] != out["eval/target_no_adapt/accuracy"]


def _state(workdir, step):
    return ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )


def test_digits_shot_chain_source_only_then_shot_keeps_the_head(tmp_path, tfds_dir):
    src, tgt = str(tmp_path / "source"), str(tmp_path / "shot")
    main.run(["train", "--config", "experiments/digits/source_only.py:direction=u2m",
              "--workdir", src, *SMALL])  # fmt: skip
    cfg = f"experiments/digits/shot.py:direction=u2m,source={src},steps=3"
    out = main.run(["train", "--config", cfg, "--workdir", tgt, *SMALL[1:]])
    assert 0.0 <= out["eval/target/accuracy"] <= 1.0 and "eval/source/accuracy" in out
    before, after = _state(src, 3)["params"], _state(tgt, 3)["params"]
    jax.tree.map(np.testing.assert_array_equal, after["head"], before["head"])  # bit-identical
    for name in ("Conv_0", "fc", "bottleneck"):  # the feature extractor trained
        assert np.any(np.asarray(after[name]["kernel"]) != np.asarray(before[name]["kernel"]))
    rows = [line for line in open(os.path.join(tgt, "metrics.jsonl")) if "train/loss" in line]
    assert rows and "train/adapt/im" in rows[0] and "train/pseudo_label_accuracy" in rows[0]


def test_source_free_task_refuses_bad_configs(tmp_path):
    c = _lenet_config(norm=None)
    c.task = "source_free"
    with pytest.raises(UserError, match="config.source.workdir is not set"):
        tasks.build(c)
    c.source = {"workdir": str(tmp_path)}
    with pytest.raises(UserError, match="does not freeze 'head/kernel'"):
        tasks.build(c)
    c.schedule = [("head/.*", None), (".*", "base")]
    with pytest.raises(UserError, match="has no checkpoint"):
        tasks.build(c)
    c.shot = {"bta": 0.3}
    with pytest.raises(UserError, match="bta"):
        tasks.build(c)


def test_domain_adaptation_task_hands_tent_its_classifier():
    """A domain_adaptation model (params under `model`, beside the discriminator) gives TENT the
    same function of its classifier as a plain classification task would."""
    c = _lenet_config()
    c.task = "domain_adaptation"
    c.data = {"source": {"name": "x", "split": "train"}, "target": {"name": "y", "split": "train"}}
    c.adaptation = {"method": "dann", "hidden": (8,)}
    task = tasks.build(c)
    x = np.random.default_rng(0).random((4, 28, 28, 1), np.float32)
    dom = {"image": x, "label": np.arange(4)}
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), {"source": dom, "target": dom}))
    out, norm = task.predict_fns()["apply_train_bn"](variables, {"image": x})
    bare = {**variables, "params": variables["params"]["model"]}
    want, want_norm = tasks.build(_lenet_config()).apply_train_bn(bare, {"image": x})
    np.testing.assert_array_equal(np.asarray(out["logits"]), np.asarray(want["logits"]))
    assert set(norm) == set(want_norm) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}


def test_evaluators_of_one_model_share_their_jitted_steps(tfds_dir):
    """Evaluators that score one model (a split per corruption, say) share one jitted step per
    kind, so JAX compiles it once; other options or another model get their own. The shared
    step gives what a fresh evaluator gives."""
    from xmodal_jax.evaluators import classification as classification_evals

    task = tasks.build(_lenet_config())
    fns = task.predict_fns()
    batch = {"image": np.zeros((2, 28, 28, 1), np.float32)}
    variables = nn.unbox(jax.jit(task.init)(jax.random.key(0), batch))
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "model": 1})
    other = {**UCI_TEST, "split": "test[80:160]"}

    def build(kind, data, **opts):
        return kind("e", {**data, **opts}, fns, mesh, 32)

    plain = [build(classification_evals.Classification, d) for d in (UCI_TEST, other)]
    assert plain[0]._step is plain[1]._step
    tents = [build(adaptation_evals.TentClassification, d) for d in (UCI_TEST, other)]
    assert tents[0]._adapt is tents[1]._adapt
    assert (
        build(adaptation_evals.TentClassification, UCI_TEST, lr=0.01)._adapt is not tents[0]._adapt
    )
    another = tasks.build(_lenet_config()).predict_fns()
    assert classification_evals.Classification("e", UCI_TEST, another, mesh, 32)._step is not (
        plain[0]._step
    )
    from xmodal_jax.objectives.adaptation import adabn

    images = [np.random.default_rng(0).random((4, 28, 28, 1), np.float32)]
    adapted = [fns["adapt_batch_norm"](variables, images)]
    info = adabn._jitted_moments.cache_info()
    adapted.append(fns["adapt_batch_norm"](variables, images))
    after = adabn._jitted_moments.cache_info()
    assert (after.hits, after.misses) == (info.hits + 1, info.misses)  # nothing new to compile
    jax.tree.map(np.testing.assert_array_equal, adapted[0], adapted[1])
    first = tents[0].run(variables)
    assert tents[1].run(variables) != first  # another split
    assert build(adaptation_evals.TentClassification, UCI_TEST).run(variables) == first
