"""Two-tower task: class-prompt losses against float64 references, the projected temperature
clamp, head construction, training end to end (locked+cached, trained towers with ITM, LiT by an
Optax rule)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from twotower_testing import losses, read_metrics, tiny_config

from xmodal_jax import tasks
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import class_contrastive as cc
from xmodal_jax.tasks import two_tower_losses, two_tower_predict
from xmodal_jax.tasks.two_tower_heads import make_heads
from xmodal_jax.train import trainer

NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------ losses


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_class_clip(img, cls, labels, log_scale, mask):
    logits = np.exp(log_scale) * _unit(img) @ _unit(cls).T
    total, n = 0.0, 0
    for b, y in enumerate(labels):
        if mask[y]:
            row = logits[b, mask]
            total += np.log(np.sum(np.exp(row))) - logits[b, y]
            n += 1
    return total / n


def ref_class_siglip(img, cls, labels, log_scale, bias, mask):
    logits = np.exp(log_scale) * _unit(img) @ _unit(cls).T + bias
    total, n = 0.0, 0
    for b, y in enumerate(labels):
        if mask[y]:
            for c in np.flatnonzero(mask):
                sign = 1.0 if c == y else -1.0
                total += np.log1p(np.exp(-sign * logits[b, c]))
            n += 1
    return total / n


@pytest.fixture
def problem():
    r = np.random.default_rng(0)
    img, cls = r.normal(size=(12, 6)), r.normal(size=(5, 6))
    labels = r.integers(0, 5, 12)
    mask = np.array([True, True, False, True, False])
    return img, cls, labels, mask


def test_class_losses_match_float64_references(problem):
    img, cls, labels, mask = problem
    args = (jnp.float32(img), jnp.float32(cls), jnp.int32(labels))
    got = jax.jit(cc.class_clip_loss)(*args, jnp.float32(1.3), jnp.asarray(mask))
    np.testing.assert_allclose(got, ref_class_clip(img, cls, labels, 1.3, mask), rtol=2e-5)
    got = jax.jit(cc.class_siglip_loss)(
        *args, jnp.float32(2.3), jnp.float32(-4.0), jnp.asarray(mask)
    )
    want = ref_class_siglip(img, cls, labels, 2.3, -4.0, mask)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_class_losses_ignore_masked_images_and_classes(problem):
    img, cls, labels, mask = problem
    for loss in (
        lambda i, c: cc.class_clip_loss(i, c, labels, 1.0, mask),
        lambda i, c: cc.class_siglip_loss(i, c, labels, 1.0, -2.0, mask),
    ):
        g_img, g_cls = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.float32(img), jnp.float32(cls))
        assert np.all(np.isfinite(g_img)) and np.all(np.isfinite(g_cls))
        np.testing.assert_array_equal(g_img[~mask[labels]], 0.0)  # images of other classes
        np.testing.assert_array_equal(g_cls[~mask], 0.0)  # classes the head does not train on
        assert np.abs(g_img[mask[labels]]).sum() > 0


def test_clamp_projected_value_and_gradient():
    f = lambda x, a: a * cc.clamp_projected(x, 1.0)
    grad = jax.jit(jax.grad(f))
    clamp = jax.jit(cc.clamp_projected, static_argnums=1)
    assert float(clamp(jnp.float32(2.5), 1.0)) == 1.0
    assert float(clamp(jnp.float32(0.5), 1.0)) == 0.5
    # In bounds: the plain gradient either way.
    assert float(grad(0.5, 1.0)) == 1.0 and float(grad(0.5, -1.0)) == -1.0
    # Above the bound: a gradient step -g that lowers x passes, one that raises it is dropped.
    assert float(grad(2.0, 1.0)) == 1.0
    assert float(grad(2.0, -1.0)) == 0.0


# ------------------------------------------------------------------ heads


def test_make_heads_splits_controls_and_calibration():
    cfg = {"unseen": [("cat", "dog"), ("bear", "zebra")], "control": True, "seed": 3}
    cfg["calibration_holdout"] = 2
    heads = make_heads(NAMES, cfg)
    assert [h.role for h in heads] == ["main"] * 2 + ["control"] * 2 + ["calibration"] * 2
    main, control, calib = heads[0], heads[2], heads[4]
    assert main.unseen == (2, 4) and main.train_classes == (0, 1, 3, 5, 6, 7, 8, 9)
    assert main.names == tuple(NAMES)
    # The control names every class by another class's name, each name used once.
    assert control.train_classes == main.train_classes
    assert all(a != b for a, b in zip(control.names, NAMES, strict=True))
    assert sorted(control.names) == sorted(NAMES)
    # The calibration head holds 2 seen classes out of training.
    assert len(calib.pseudo_unseen) == 2 and set(calib.pseudo_unseen) <= set(main.train_classes)
    assert set(calib.train_classes) == set(main.train_classes) - set(calib.pseudo_unseen)
    assert make_heads(NAMES, cfg) == heads  # seeded, deterministic
    assert make_heads(NAMES, {**cfg, "seed": 4}) != heads


def test_make_heads_errors():
    base = {"unseen": [], "control": False, "calibration_holdout": 0, "seed": 0}
    assert [h.name for h in make_heads(NAMES, base)] == ["all"]
    with pytest.raises(UserError, match="platypus"):
        make_heads(NAMES, {**base, "unseen": [("cat", "platypus")]})
    with pytest.raises(UserError, match="calibration_holdout"):
        make_heads(NAMES, {**base, "unseen": [("cat",)], "calibration_holdout": 8})
    with pytest.raises(UserError, match="need `unseen`"):
        make_heads(NAMES, {**base, "control": True})


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_locked_cached_heads_train(tfds_dir, tmp_path, loss):
    heads = {"unseen": [("cat", "dog", "giraffe"), ("bear", "cow", "horse")], "control": True}
    c = tiny_config(steps=40, loss=loss, heads=heads, lr=3e-2)
    c.evals = {"zeroshot_unseen": {"type": "zeroshot_unseen", "split": "test[:5%]"}}
    result = trainer.train_and_evaluate(c, str(tmp_path / "wd"))
    curve = losses(str(tmp_path / "wd"))
    assert len(curve) == 40 and np.mean(curve[-5:]) < 0.85 * np.mean(curve[:5])
    assert 0.0 <= result["eval/zeroshot_unseen/accuracy"] <= 1.0
    assert {"eval/zeroshot_unseen/split_0/accuracy", "eval/zeroshot_unseen/split_1/accuracy"} <= (
        set(result)
    )


def test_itm_head_trains_beside_the_contrastive_loss(tfds_dir, tmp_path):
    c = tiny_config(steps=16, loss="siglip", lr=3e-2)
    c.model.fusion = {"name": "concat_mlp", "out_dim": 16, "hidden_dim": 16}
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))
    rows = [r for r in read_metrics(str(tmp_path / "wd")) if "train/loss" in r]
    assert {"train/itm_loss", "train/itm_accuracy", "train/contrastive_loss"} <= set(rows[0])
    itm_curve = [r["train/itm_loss"] for r in rows]
    assert np.mean(itm_curve[-4:]) < np.mean(itm_curve[:4])


def test_config_errors(tfds_dir):
    c = tiny_config(lock_text=False, heads={"unseen": [("cat",), ("dog",)]})
    with pytest.raises(UserError, match="share it"):
        tasks.build(c)
    c = tiny_config()
    c.model.loss.name = "triplet"
    with pytest.raises(UserError, match="loss.name"):
        tasks.build(c)
    c = tiny_config()
    c.model.image.colour = "red"
    with pytest.raises(UserError, match="colour"):
        tasks.build(c)
    c = tiny_config(lock_image=False)
    c.model.image_proj.norm = "standardize"
    with pytest.raises(UserError, match="standardize"):
        tasks.build(c)


def test_itm_loss_sees_only_the_heads_own_classes(tfds_dir):
    c = tiny_config(heads={"unseen": [("cat", "dog")]})
    c.model.fusion = {"name": "concat_mlp", "out_dim": 8, "hidden_dim": 8}
    task = tasks.build(c)
    batch = next(task.train_iterator(0, 1))
    variables = nn.unbox(task.init(jax.random.key(0), batch))
    head_vars = two_tower_predict.head_variables(variables["params"], variables)
    r = np.random.default_rng(0)
    labels = jnp.asarray(np.arange(12) % 10)  # cat (2) and dog (4) are unseen by head 0
    feats = r.normal(size=(12, task.image_width)).astype(np.float32)
    texts = jnp.asarray(r.normal(size=(1, 12, task.text_width)), jnp.float32)
    sim = jnp.asarray(r.normal(size=(1, 12, 12)), jnp.float32)
    mask = jnp.asarray(task.texts.class_mask())

    @jax.jit
    def itm_loss(f):
        args = (head_vars, f, texts, sim, labels, mask, jax.random.key(1))
        return two_tower_losses.itm_loss(task.head_module, task.fusion_opts, *args)[0][0]

    def loss(f):
        return float(itm_loss(jnp.asarray(f)))

    moved = feats.copy()
    moved[np.isin(np.asarray(labels), [2, 4])] += 5.0  # unseen-class images
    assert loss(moved) == pytest.approx(loss(feats), rel=1e-6)
    moved[np.asarray(labels) == 0] += 5.0  # a seen-class image
    assert loss(moved) != pytest.approx(loss(feats), rel=1e-3)


def test_provenance_describes_the_code_as_the_run_began(tfds_dir, tmp_path, monkeypatch):
    """A checkout edited while a run trains does not reach its provenance.json: the code is
    described before the run builds anything (here the description counts the task builds
    done before it)."""
    import json

    from xmodal_jax import provenance

    built = []
    real_build = tasks.build
    monkeypatch.setattr(tasks, "build", lambda *a, **k: built.append(1) or real_build(*a, **k))
    monkeypatch.setattr(provenance, "describe", lambda config: {"tasks_built": len(built)})
    trainer.train_and_evaluate(tiny_config(steps=1), str(tmp_path))
    assert built and json.loads((tmp_path / "provenance.json").read_text()) == {"tasks_built": 0}
    assert set(json.loads((tmp_path / "timing.json").read_text())) >= {"set-up", "training"}
