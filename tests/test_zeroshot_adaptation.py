"""The zero-shot adaptation task: a tiny two-tower model adapted to a cheap shift of
`animal_silhouettes` (the target images inverted), with the class-name anchors fixed."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from twotower_testing import PP, TINY_IMAGE, read_metrics, tiny_config, train_steps

from experiments import quickstart
from experiments.animals import shift_adapt
from xmodal_jax import config as config_lib
from xmodal_jax import evaluators, tasks
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import adaptation
from xmodal_jax.objectives.adaptation import adabn as adabn_lib
from xmodal_jax.train import trainer

UNSEEN = ("cat", "dog", "giraffe")
SHIFTED_PP = "invert|" + PP
TARGET_SPLIT = "train[4%:8%]"
TINY_TEXT = {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))


def adapt_config(method="entropy", steps=2, heads=None, batch_size=32, **options):
    c = tiny_config(steps=steps, heads=heads or {"unseen": [UNSEEN]}, batch_size=batch_size)
    c.task = "zeroshot_adaptation"
    c.data.target = {"name": "animal_silhouettes", "split": TARGET_SPLIT, "pp": SHIFTED_PP}
    c.adaptation = {"method": method, **options}
    if method in ("dann", "cdan"):
        c.adaptation.hidden = (16,)
    return c


def _state(variables):
    return {k: v for k, v in variables.items() if k != "params"}


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_embeddings(variables, feats):
    """float64 L2-normalised projected image embeddings of head 0, by hand."""
    v = nn.unbox(variables)
    head, stats = v["params"]["heads"], v["stats"]["heads"]["image"]
    x = (np.float64(feats) - np.float64(stats["mean"][0])) / np.float64(stats["std"][0])
    kernel, bias = head["image"]["out"]["kernel"][0], head["image"]["out"]["bias"][0]
    return _unit(x @ np.float64(kernel) + np.float64(bias))


def ref_logits(task, variables, feats):
    """float64 zero-shot logits over the seen classes, from the parameters by hand."""
    head = nn.unbox(variables)["params"]["heads"]
    zi = ref_embeddings(variables, feats)
    zt = _unit(np.float64(task.cached_class_text[0]))  # text_proj 'none': the anchors as cached
    seen = [i for i in range(10) if task.class_names[i] not in UNSEEN]
    log_scale = min(float(head["logit"]["log_scale"][0]), np.log(100.0))
    return np.exp(log_scale) * zi @ zt[seen].T


@pytest.mark.parametrize("method", ["entropy", "mcc", "im"])
def test_adaptation_term_is_the_registered_loss_of_the_zeroshot_logits(tfds_dir, method):
    task = tasks.build(adapt_config(method, weight=0.7))
    batch = next(task.train_iterator(0, 1))
    variables = task.init(jax.random.key(0), batch)
    params, state = variables["params"], _state(variables)
    assert batch["target"]["image_feats"].shape == (32, 1, 32)  # [B, H, Di]
    ref = ref_logits(task, variables, batch["target"]["image_feats"][:, 0])
    assert ref.shape == (32, 7)
    logits, _ = task.zeroshot_logits(params, state, jnp.asarray(batch["target"]["image_feats"]))
    np.testing.assert_allclose(logits[0], ref, rtol=1e-4, atol=1e-4)
    inputs = adaptation.AdaptationInputs(logits_t=jnp.asarray(ref, jnp.float32))
    expected, aux = adaptation.get_loss(method)(inputs, {"weight": 0.7})
    total, (_, metrics) = task.loss(params, state, batch, jax.random.key(1), 0.5)
    np.testing.assert_allclose(metrics["adapt/inductive/loss"], aux["loss"], rtol=1e-4)
    np.testing.assert_allclose(total, metrics["source_loss"] + expected, rtol=1e-4)
    assert float(aux["loss"]) != 0.0


@pytest.mark.parametrize("method", ["dann", "cdan"])
def test_adversarial_term_is_the_registered_loss_of_the_image_embeddings(tfds_dir, method):
    task = tasks.build(adapt_config(method))
    batch = next(task.train_iterator(0, 1))
    variables = task.init(jax.random.key(0), batch)
    params, state = variables["params"], _state(variables)
    source = batch["adapt_source"]["image_feats"][:, 0]  # head 0's own-class source rows
    target = batch["target"]["image_feats"][:, 0]
    disc = nn.unbox(params["discriminator"]["head_0"])
    inputs = adaptation.AdaptationInputs(
        features_s=jnp.asarray(ref_embeddings(variables, source), jnp.float32),
        features_t=jnp.asarray(ref_embeddings(variables, target), jnp.float32),
        logits_s=jnp.asarray(ref_logits(task, variables, source), jnp.float32),
        logits_t=jnp.asarray(ref_logits(task, variables, target), jnp.float32),
        progress=0.5,
        discriminator=lambda h: task.discriminator.apply({"params": disc}, h),
    )
    _, aux = adaptation.get_loss(method)(inputs, task.options)
    _, (_, metrics) = task.loss(params, state, batch, jax.random.key(1), 0.5)
    np.testing.assert_allclose(metrics["adapt/inductive/loss"], aux["loss"], rtol=1e-4)
    np.testing.assert_allclose(metrics["adapt/inductive/grl_coeff"], aux["grl_coeff"], rtol=1e-6)


def test_adaptation_term_never_moves_the_text_anchors_or_the_temperature(tfds_dir):
    c = adapt_config("entropy")
    c.model.embed_dim = 16
    c.model.text_proj = {"kind": "linear"}  # a trainable text projection: still no gradient
    task = tasks.build(c)
    batch = next(task.train_iterator(0, 1))
    variables = task.init(jax.random.key(0), batch)

    def adapt(params):
        return task.adaptation_loss(params, _state(variables), batch, jax.random.key(1), 1.0)[0]

    grads = nn.unbox(jax.grad(adapt)(variables["params"]))["heads"]
    for leaf in jax.tree.leaves({"text": grads["text"], "logit": grads["logit"]}):
        np.testing.assert_array_equal(leaf, 0.0)
    assert np.abs(grads["image"]["out"]["kernel"]).max() > 0


def test_training_keeps_the_class_embeddings_and_moves_the_image_projection(tfds_dir):
    task, (before, state0), (after, state1) = train_steps(adapt_config("dann"), steps=3)
    assert set(before) == {"heads", "discriminator"}
    # What the zero-shot evaluators score against, recomputed from the class prompts: unchanged.
    anchors0, _ = task.class_embeddings({"params": before, **state0})
    anchors1, feats = task.class_embeddings({"params": after, **state1})
    np.testing.assert_array_equal(anchors0, anchors1)
    np.testing.assert_allclose(anchors1[0], _unit(np.float64(feats[0])), rtol=1e-5, atol=1e-6)
    kernel = lambda p: np.asarray(nn.unbox(p)["heads"]["image"]["out"]["kernel"])
    assert not np.array_equal(kernel(before), kernel(after))
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b),
        nn.unbox(before["discriminator"]),
        nn.unbox(after["discriminator"]),
    )
    assert all(jax.tree.leaves(changed))


def _labels(batches, part, split, head=0):
    labels = pipeline.split_labels("animal_silhouettes", split)
    return np.concatenate([labels[np.asarray(b[part]["index"])[:, head]] for b in batches])


def test_inductive_target_batches_hold_only_seen_classes(tfds_dir):
    task = tasks.build(adapt_config())
    it = task.train_iterator(0, 1)
    batches = [next(it) for _ in range(30)]  # 960 rows: every seen-class target row, 4 times
    assert all(set(b["target"]) == {"image_feats", "index"} for b in batches)  # no labels
    seen_ids = set(task.heads[0].train_classes)
    assert set(_labels(batches, "target", TARGET_SPLIT).tolist()) == seen_ids
    rows = task.target_rows(task.heads[0])
    assert set(pipeline.split_labels("animal_silhouettes", TARGET_SPLIT)[rows]) == seen_ids


def test_each_head_reads_only_its_own_classes(tfds_dir):
    """Two splits with control and calibration heads: head i's source and target streams hold
    exactly its training classes (a calibration head: without its pseudo-unseen ones)."""
    heads = {"unseen": [UNSEEN, ("bear", "cow")], "control": True, "calibration_holdout": 2}
    task = tasks.build(adapt_config(heads=heads))
    assert task.num_heads == 6
    it = task.train_iterator(0, 1)
    batches = [next(it) for _ in range(40)]
    assert batches[0]["target"]["image_feats"].shape == (32, 6, 32)
    for i, head in enumerate(task.heads):
        train = set(head.train_classes)
        assert set(_labels(batches, "target", TARGET_SPLIT, i).tolist()) == train, head.name
        assert set(_labels(batches, "adapt_source", "train[:4%]", i).tolist()) == train
        assert len(task.predicted_classes[i]) == len(train)
    assert set(task.heads[-1].pseudo_unseen).isdisjoint(task.heads[-1].train_classes)


def test_transductive_reads_unseen_class_images_and_says_so(tfds_dir):
    c = adapt_config(transductive=True)
    task = tasks.build(c)
    assert task.target_rows(task.heads[0]) is None and len(task.predicted_classes[0]) == 10
    it = task.train_iterator(0, 1)
    found = set(_labels([next(it) for _ in range(20)], "target", TARGET_SPLIT).tolist())
    assert found == set(range(10))
    batch = next(it)
    variables = task.init(jax.random.key(0), batch)
    _, (_, metrics) = task.loss(
        variables["params"], _state(variables), batch, jax.random.key(1), 0.5
    )
    assert np.isfinite(metrics["adapt/transductive/loss"])
    assert not any(k.startswith("adapt/inductive") for k in metrics)


@pytest.mark.parametrize(
    "method",  # one logit loss and one adversarial one here, the others in the slow tier
    ["entropy", "dann", *(pytest.param(m, marks=pytest.mark.slow) for m in ("mcc", "im", "cdan"))],
)
def test_each_method_trains_and_evaluates_on_the_shifted_split(tfds_dir, tmp_path, method):
    heads = {"unseen": [UNSEEN], "calibration_holdout": 2}  # a calibration head for GZSL
    c = adapt_config(method, steps=3, heads=heads)
    shifted = {"split": "test[:5%]", "pp": SHIFTED_PP}
    c.evals = {
        "shift_seen": {"type": "zeroshot", "classes": "seen", **shifted},
        "shift_unseen": {"type": "zeroshot_unseen", **shifted},
        "shift_gzsl": {"type": "gzsl", "val_split": "train[96%:]", **shifted},
    }
    result = trainer.train_and_evaluate(c, str(tmp_path / "wd"))
    rows = [r for r in read_metrics(str(tmp_path / "wd")) if "train/loss" in r]
    assert len(rows) == 3
    assert all(np.isfinite(r["train/adapt/inductive/loss"]) for r in rows)
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    for name in ("shift_seen", "shift_unseen"):
        assert 0.0 <= result[f"eval/{name}/accuracy"] <= 1.0
    assert 0.0 <= result["eval/shift_gzsl/harmonic_mean"] <= 1.0
    if method in ("dann", "cdan"):
        assert 0.0 <= rows[-1]["train/adapt/inductive/domain_accuracy"] <= 1.0


def test_config_errors(tfds_dir):
    c = adapt_config()
    del c.data["target"]
    with pytest.raises(UserError, match="config.data.target is missing"):
        tasks.build(c)
    with pytest.raises(UserError, match="unknown domain-adaptation loss 'entropi'"):
        tasks.build(adapt_config("entropi"))
    c = adapt_config()
    del c.adaptation["method"]
    with pytest.raises(UserError, match="adaptation.method is not set"):
        tasks.build(c)
    with pytest.raises(UserError, match="replaces the source loss"):
        tasks.build(adapt_config("importance"))
    with pytest.raises(UserError, match="wieght"):
        tasks.build(adapt_config(wieght=2.0))
    c = adapt_config()
    c.model.text.locked = False
    with pytest.raises(UserError, match="lock the text tower"):
        tasks.build(c)
    c = adapt_config()
    c.data.target.pp = "flip_lr|" + PP
    with pytest.raises(UserError, match="deterministic pp"):
        tasks.build(c)


def test_inductive_filter_needs_target_labels_of_the_same_classes(tfds_dir, monkeypatch):
    c = adapt_config()
    c.data.target.name = "digits_uci"
    task = tasks.build(c)
    with pytest.raises(UserError, match="the inductive filter needs the same ones"):
        task.target_rows(task.heads[0])
    task = tasks.build(adapt_config())
    monkeypatch.setattr(pipeline, "source", lambda *a: [{"image": np.zeros((28, 28, 1))}])
    with pytest.raises(UserError, match="has no labels"):
        task.target_rows(task.heads[0])


# ------------------------------------------------------------------ experiment configs

ANIMALS = os.path.join(os.path.dirname(__file__), "..", "experiments", "animals")


def on_embedded(c):
    """A shift config on tiny towers, small slices, and the embedded `animal_silhouettes` with
    `invert` dropped standing in for the corrupted dataset (not built here)."""
    c.model.image = {
        "tower": TINY_IMAGE["tower"],
        "overrides": {**TINY_IMAGE["overrides"], "patch_size": 28, "image_size": 112},
        "locked": True,
    }
    c.model.text = {"tower": "minilm_l6", "overrides": TINY_TEXT, "locked": True}
    c.data.split, c.batch_size, c.total_steps = "train[:4%]", 16, 2
    shifted = {"dataset": "animal_silhouettes", "pp": quickstart.IMAGE_PP.replace("invert|", "")}
    if "target" in c.data:
        assert c.data.target.name == "animal_silhouettes_c/fog_3"
        c.data.target = {"name": "animal_silhouettes", "split": TARGET_SPLIT, "pp": shifted["pp"]}
    for name, ev in c.evals.items():
        if name.startswith("shift_"):
            assert ev.dataset == "animal_silhouettes_c/fog_3" and ev.split == "test"
            ev.update(shifted)
        ev.split = "test[:2%]"
        if "val_split" in ev:
            ev.val_split = "train[96%:]"
    c.evals.val_pseudo_unseen.split = "train[96%:]"
    # ConSE reads MobileNetV2's ImageNet classifier, which the tiny stand-in tower lacks
    # (test_conse.py runs it on the real one).
    for name in ("shift_conse", "shift_conse_transductive"):
        if name in c.evals:
            del c.evals[name]
    return c


@pytest.mark.parametrize("method", shift_adapt.METHODS)
def test_shift_adapt_configs_build(method, tfds_dir):
    c = config_lib.load(f"{ANIMALS}/shift_adapt.py:method={method}")
    assert c.task == "zeroshot_adaptation" and c.adaptation.method == method
    if method != "none":
        assert c.adaptation.warmup == ("none" if method in ("dann", "cdan") else "sigmoid")
    assert c.data.target.split == "train[:90%]" and not c.adaptation.transductive
    task = tasks.build(on_embedded(c))
    assert task.num_heads == 15 and task.setting == "inductive"
    evaluators.build_all(c, task.predict_fns(), None)  # every evaluator's config is valid


def test_shift_adabn_config_runs_one_split(tfds_dir):
    c = config_lib.load(f"{ANIMALS}/shift_adapt.py:method=none,adabn=True,split=2")
    assert c.adaptation.to_dict() == {"method": "none", "transductive": False, "adabn": True}
    assert c.heads.unseen == (quickstart.unseen_splits(3)[2],)
    task = tasks.build(on_embedded(c))
    assert [h.role for h in task.heads] == ["main", "control", "calibration"]
    with pytest.raises(UserError, match="one split per run"):
        tasks.build(on_embedded(config_lib.load(f"{ANIMALS}/shift_adapt.py:adabn=True")))
    assert "statistics" not in c.model.image  # the recorded configs stay as they were
    c = config_lib.load(f"{ANIMALS}/shift_adapt.py:method=none,adabn=True,split=2,source_bn=True")
    assert c.model.image.statistics == "source"


def test_shift_configs_build_train_and_evaluate_on_the_stand_in(tfds_dir, tmp_path):
    c = config_lib.load(f"{ANIMALS}/shift_source_only.py:corruption=fog,severity=3")
    assert c.task == "two_tower" and set(c.evals) == {
        "shift_seen", "shift_unseen", "shift_unseen_control", "shift_gzsl", "shift_conse",
        "val_pseudo_unseen",
    }  # fmt: skip
    assert c.evals.shift_conse.dataset == "animal_silhouettes_c/fog_3"
    task = tasks.build(on_embedded(c))
    evaluators.build_all(c, task.predict_fns(), None)
    many = config_lib.load(f"{ANIMALS}/shift_source_only.py:corruptions=fog+snow,severity=5")
    one = config_lib.load(f"{ANIMALS}/shift_source_only.py:corruption=snow,severity=5")
    for name in ("shift_seen", "shift_unseen", "shift_unseen_control", "shift_gzsl", "shift_conse"):
        assert many.evals[f"{name}_snow"].to_dict() == one.evals[name].to_dict()
    assert many.evals.shift_conse_fog.dataset == "animal_silhouettes_c/fog_5"
    assert one.evals.shift_gzsl.dataset == "animal_silhouettes_c/snow_5"
    assert len(many.evals) == 2 * 5 + 1 and "val_pseudo_unseen" in many.evals
    assert len(config_lib.load(f"{ANIMALS}/shift_source_only.py:corruptions=all").evals) == 96
    for config in ("shift_source_only.py", "shift_tent.py"):  # the clean control
        clean = config_lib.load(f"{ANIMALS}/{config}:corruption=none,severity=5")
        shift = [v for k, v in clean.evals.items() if k.startswith("shift_")]
        assert shift and {v.dataset for v in shift} == {clean.data.name}
        assert {v.split for v in shift} == {"test"}
    with pytest.raises(UserError, match="unknown \\['smog'\\]"):
        config_lib.load(f"{ANIMALS}/shift_source_only.py:corruptions=fog+smog")
    with pytest.raises(UserError, match="Unknown config argument 'corruptions'"):
        config_lib.load(f"{ANIMALS}/shift_adapt.py:corruptions=all")
    c = config_lib.load(f"{ANIMALS}/shift_adapt.py:method=mcc,transductive=True")
    assert c.adaptation.transductive and "shift_unseen_transductive" in c.evals
    c.evals = {k.removesuffix("_transductive"): v for k, v in c.evals.items()}
    result = trainer.train_and_evaluate(on_embedded(c), str(tmp_path / "mcc"))
    assert 0.0 <= result["eval/shift_unseen/accuracy"] <= 1.0
    assert 0.0 <= result["eval/shift_gzsl/harmonic_mean"] <= 1.0
    rows = [r for r in read_metrics(str(tmp_path / "mcc")) if "train/loss" in r]
    assert all(np.isfinite(r["train/adapt/transductive/loss"]) for r in rows)
    with pytest.raises(UserError, match="method='coral'"):
        config_lib.load(f"{ANIMALS}/shift_adapt.py:method=coral")


# ------------------------------------------------------------------ AdaBN on the image tower


def adabn_config(method="none", **options):
    c = adapt_config(method, batch_size=16, adabn=True, **options)
    tiny_resnet = {"width": 0.125, "stage_sizes": (1, 1, 1, 1)}  # BatchNorm, 64-d features
    c.model.image = {"tower": "resnet18", "overrides": tiny_resnet, "locked": True}
    c.data.split, c.data.target.split = "train[:2%]", "train[4%:6%]"
    return c


def _images(split, pp, rows=None):
    src = pipeline.source("animal_silhouettes", split)
    op = preprocess.compose(pp)
    rows = range(len(src)) if rows is None else rows
    return np.stack([op(dict(src[int(i)]))["image"] for i in rows])


def test_adabn_statistics_come_from_seen_class_target_images_and_feed_the_target_domain(
    tfds_dir,
):
    task = tasks.build(adabn_config("entropy"))
    labels = pipeline.split_labels("animal_silhouettes", "train[4%:6%]")
    seen = np.flatnonzero(np.isin(labels, task.heads[0].train_classes))
    assert 0 < len(seen) < len(labels)
    tower = task.image_tower
    expected = adabn_lib.adapt_batch_norm(
        tower.module, tower.variables, [_images("train[4%:6%]", SHIFTED_PP, seen)]
    )
    adapted = task.adabn_tower.variables
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5),
        adapted["batch_stats"],
        expected["batch_stats"],
    )
    pooled = jax.jit(lambda v, x: tower.module.apply(v, x)["pooled"])
    apply = lambda v, x: np.asarray(pooled(v, x))
    every = adabn_lib.adapt_batch_norm(
        tower.module, tower.variables, [_images("train[4%:6%]", SHIFTED_PP)]
    )
    for other in (every, tower.variables):  # neither all target rows nor the loaded statistics
        differ = jax.tree.map(
            lambda a, b: not np.allclose(a, b, rtol=2e-3, atol=1e-5),
            adapted["batch_stats"],
            other["batch_stats"],
        )
        assert all(jax.tree.leaves(differ))
    batch = next(task.train_iterator(0, 1))  # training: target through the adapted tower
    index = np.asarray(batch["target"]["index"])[:, 0]
    target = apply(adapted, _images("train[4%:6%]", SHIFTED_PP, index))
    np.testing.assert_allclose(batch["target"]["image_feats"][:, 0], target, rtol=1e-4, atol=1e-4)
    index = np.asarray(batch["adapt_source"]["index"])[:, 0]  # the source: as loaded
    source = apply(tower.variables, _images("train[:2%]", PP, index))
    np.testing.assert_allclose(batch["adapt_source"]["image_feats"][:, 0], source, atol=1e-4)
    variables = task.init(jax.random.key(0), batch)  # evaluation: the target domain adapted
    cfg = {"name": "animal_silhouettes", "split": "test[:1%]", "pp": SHIFTED_PP}
    feats = task.image_embeddings(variables, cfg, batch_size=16)["feats"]
    np.testing.assert_allclose(feats, apply(adapted, _images("test[:1%]", SHIFTED_PP)), atol=1e-4)


def test_adabn_alone_trains_on_source_batches_only_and_caches_its_statistics(tfds_dir, monkeypatch):
    passes = []
    adapt = adabn_lib.adapt_batch_norm
    monkeypatch.setattr(
        adabn_lib, "adapt_batch_norm", lambda *a, **k: passes.append(1) or adapt(*a, **k)
    )
    task = tasks.build(adabn_config())  # method 'none'
    read = []
    features = task.cached_image_features
    task.cached_image_features = lambda cfg: read.append(cfg["split"]) or features(cfg)
    batch = next(task.train_iterator(0, 1))
    assert set(batch) == {"source"} and read == ["train[:2%]"] and not passes
    with_term = next(tasks.build(adabn_config("entropy")).train_iterator(0, 1))["source"]
    jax.tree.map(np.testing.assert_array_equal, batch["source"], with_term)
    variables = task.init(jax.random.key(0), batch)
    _, (_, metrics) = task.loss(variables["params"], _state(variables), batch, jax.random.key(1), 1)
    assert not any(k.startswith("adapt/") for k in metrics)  # no term
    stats = task.adabn_tower.variables["batch_stats"]
    c = adabn_config()
    c.batch_size = 8  # another run, same tower and target images: the statistics read, not redone
    again = tasks.build(c).adabn_tower.variables["batch_stats"]
    assert len(passes) == 1
    jax.tree.map(np.testing.assert_array_equal, again, stats)
    c.data.target.split = "train[4%:7%]"  # other target images: estimated again
    tasks.build(c).adabn_tower  # noqa: B018
    assert len(passes) == 2


def test_source_statistics_come_from_seen_class_source_images_and_feed_every_split(
    tfds_dir, monkeypatch
):
    plain = tasks.build(adabn_config("entropy"))
    target = plain.adabn_tower.variables["batch_stats"]
    c = adabn_config("entropy")
    c.model.image.statistics = "source"
    task = tasks.build(c)
    # AdaBN on top: the target's statistics do not depend on those they replace, so the ones
    # estimated with the loaded statistics are read from the cache, not estimated again.
    passes = []
    adapt = adabn_lib.adapt_batch_norm
    monkeypatch.setattr(
        adabn_lib, "adapt_batch_norm", lambda *a, **k: passes.append(1) or adapt(*a, **k)
    )
    jax.tree.map(np.testing.assert_array_equal, task.adabn_tower.variables["batch_stats"], target)
    assert not passes
    labels = pipeline.split_labels("animal_silhouettes", "train[:2%]")
    seen = np.flatnonzero(np.isin(labels, task.heads[0].train_classes))
    assert 0 < len(seen) < len(labels)
    loaded = plain.image_tower.variables
    module = plain.image_tower.module
    expected = adabn_lib.adapt_batch_norm(module, loaded, [_images("train[:2%]", PP, seen)])
    close = lambda a, b: np.allclose(a, b, rtol=2e-3, atol=1e-5)
    source = task.image_tower.variables
    assert all(jax.tree.leaves(jax.tree.map(close, source["batch_stats"], expected["batch_stats"])))
    jax.tree.map(  # the tower TENT starts from (`shift_tent.py:source_bn=True`)
        np.testing.assert_array_equal,
        task.image_tower_variables({})["batch_stats"],
        source["batch_stats"],
    )
    every = adabn_lib.adapt_batch_norm(module, loaded, [_images("train[:2%]", PP)])
    images = [_images("train[4%:6%]", SHIFTED_PP)]
    jax.tree.map(  # what the cache relies on: the estimate ignores the statistics it replaces
        np.testing.assert_array_equal,
        adabn_lib.adapt_batch_norm(module, source, images)["batch_stats"],
        adabn_lib.adapt_batch_norm(module, loaded, images)["batch_stats"],
    )
    for other in (every, loaded):  # neither all source rows nor the loaded statistics
        differ = jax.tree.map(
            lambda a, b: not close(a, b), source["batch_stats"], other["batch_stats"]
        )
        assert all(jax.tree.leaves(differ))
    pooled = jax.jit(lambda v, x: module.apply(v, x)["pooled"])
    batch = next(task.train_iterator(0, 1))  # the source's features: of its own statistics
    index = np.asarray(batch["adapt_source"]["index"])[:, 0]
    np.testing.assert_allclose(
        batch["adapt_source"]["image_feats"][:, 0],
        np.asarray(pooled(source, _images("train[:2%]", PP, index))),
        atol=1e-4,
    )


def test_source_statistics_errors(tfds_dir):
    c = adabn_config()
    c.model.image.statistics = "target"
    with pytest.raises(UserError, match="statistics='target'; use one of"):
        tasks.build(c)
    c.model.image.statistics = "source"
    c.heads = {"unseen": [UNSEEN, ("bear", "cow")]}
    with pytest.raises(UserError, match="statistics='source': .* one split per run"):
        tasks.build(c)
    c = adabn_config()
    c.model.image.update(statistics="source", locked=False)
    with pytest.raises(UserError, match="locked, cached image tower"):
        tasks.build(c)
    c = adapt_config("none")  # the tiny ViT: LayerNorm only
    c.model.image.statistics = "source"
    with pytest.raises(UserError, match="statistics='source': the image tower .* no BatchNorm"):
        tasks.build(c)
    c = adapt_config("none")
    c.model.text.statistics = "source"
    with pytest.raises(UserError, match="only the image tower's"):
        tasks.build(c)


def test_adabn_errors(tfds_dir):
    c = adabn_config()
    c.heads = {"unseen": [UNSEEN, ("bear", "cow")]}
    with pytest.raises(UserError, match="one split per run"):
        tasks.build(c)
    c = adapt_config("none", adabn=True)  # the tiny ViT: LayerNorm only
    task = tasks.build(c)
    with pytest.raises(UserError, match="no BatchNorm statistics"):
        task.adabn_tower  # noqa: B018
    with pytest.raises(UserError, match="wieght"):
        tasks.build(adapt_config("none", wieght=1.0))


def test_the_iterator_reads_only_a_few_batches_ahead(tfds_dir, monkeypatch):
    """A batch holds 1 + 2H feature batches, so grain's default read-ahead of 500 batches
    would hold tens of GB with the quick start's 15 heads."""
    import time

    from xmodal_jax.tasks import feature_cache

    task = tasks.build(adapt_config())
    it = task.train_iterator(0, 1)
    batches = []
    get = feature_cache._ShuffledBatches.rows_of
    monkeypatch.setattr(
        feature_cache._ShuffledBatches, "rows_of", lambda s, i: batches.append(i) or get(s, i)
    )
    next(it)
    time.sleep(2.0)
    per_step = 3  # the two-tower batch, one head's source and target batches
    assert len(batches) <= 12 * per_step  # read ahead, plus the batches in flight in 2 threads
