"""TENT on the image tower of a two-tower zero-shot classifier (`zeroshot_tent`): a tiny
BatchNorm ResNet, locked, under random heads; the shift stand-in is `invert`."""

import os

import jax
import numpy as np
import pytest
from twotower_testing import PP, tiny_config

from xmodal_jax import config as config_lib
from xmodal_jax import evaluators, tasks
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.objectives import contrastive
from xmodal_jax.tasks.two_tower_predict import head_variables

SHIFTED = {"dataset": "animal_silhouettes", "split": "test[:3%]", "pp": "invert|" + PP}
HEADS = {"unseen": [("cat", "dog", "giraffe"), ("bear", "cow", "zebra")], "control": True}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))


def _task(image=None):
    c = tiny_config(heads=HEADS)
    tiny_resnet = {"width": 0.125, "stage_sizes": (1, 1, 1, 1)}  # BatchNorm, 64-d features
    c.model.image = image or {"tower": "resnet18", "overrides": tiny_resnet, "locked": True}
    task = tasks.build(c)
    batch = next(task.train_iterator(0, 1))
    return task, task.init(jax.random.key(0), batch)


def _evaluator(task, classes="unseen", heads="main", **opts):
    cfg = {"type": "zeroshot_tent", **SHIFTED, "classes": classes, "heads": heads, **opts}
    cls = evaluators.get("zeroshot_tent")
    return cls("tent", cfg, task.predict_fns(), None, opts.get("batch_size", 16))


def _reference_accuracy(task, variables, classes_of_head, batch_size):
    """Episodic TENT's predictions are those of the loaded tower with batch-statistic BN: here
    Flax's own training-mode BatchNorm on each batch's real rows (no padding, no interceptor),
    each head's projection and the cosine with its class-prompt embeddings, in float64."""
    src = pipeline.source("animal_silhouettes", SHIFTED["split"])
    op = preprocess.compose(SHIFTED["pp"])
    labels = pipeline.split_labels("animal_silhouettes", SHIFTED["split"])
    classifier, _ = task.class_embeddings(variables, None)
    tower = task.image_tower
    hv = head_variables(variables["params"], variables)
    train_mode = jax.jit(
        lambda x: tower.module.apply(tower.variables, x, train=True, mutable=["batch_stats"])[0]
    )
    out = {}
    for i, classes in classes_of_head.items():
        rows = np.flatnonzero(np.isin(labels, classes))
        correct = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            x = np.stack([op(dict(src[int(r)]))["image"] for r in chunk])
            z = task.heads_module.apply(hv, train_mode(x)["pooled"], method="embed_image")
            z = np.float64(contrastive.l2_normalize(z)[i])
            scores = z @ np.float64(classifier[i][classes]).T
            correct += int(np.sum(classes[np.argmax(scores, axis=1)] == labels[chunk]))
        out[i] = correct / len(rows)
    return out


@pytest.mark.parametrize("opts", [{"episodic": True, "lr": 0.05}, {"steps": 0}])
def test_episodic_tent_predicts_as_batch_statistic_zero_shot(tfds_dir, opts):
    """So does online TENT with no update (`steps=0`, batch statistics alone)."""
    task, variables = _task()
    for classes in ("unseen",):
        ev = _evaluator(task, classes, **opts)
        result = ev.run(variables)
        expected = _reference_accuracy(
            task, variables, {i: ev._class_subset(h) for i, h in ev.heads}, 16
        )
        got = [result[f"split_{h.split}/accuracy"] for _, h in ev.heads]
        np.testing.assert_allclose(got, [expected[i] for i, _ in ev.heads], atol=1e-12)
        assert result["accuracy"] == pytest.approx(np.mean(got))
        assert result["chance"] == pytest.approx(1 / len(ev._class_subset(ev.heads[0][1])))


def test_source_statistics_predict_first_as_the_zero_shot_evaluator(tfds_dir):
    """With the running statistics kept, episodic TENT's predictions (made before each update)
    are the plain zero-shot classifier's, which reads the cached inference-mode features."""
    task, variables = _task()
    fns = task.predict_fns()
    for classes, heads in (("unseen", "main"), ("seen", "main"), ("unseen", "control")):
        ev = _evaluator(task, classes, heads, episodic=True, statistics="source", lr=0.05)
        cfg = {"type": "zeroshot", **SHIFTED, "classes": classes, "heads": heads}
        plain = evaluators.get("zeroshot")("plain", cfg, fns, None, 16).run(variables)
        tent_result = ev.run(variables)
        for key, value in plain.items():
            assert tent_result[key] == pytest.approx(value, abs=1e-12), (classes, heads, key)
        online = _evaluator(task, classes, heads, statistics="source", lr=0.05).run(variables)
        assert online["adapt/entropy"] != pytest.approx(tent_result["adapt/entropy"], abs=1e-6)


def test_online_tent_moves_only_the_tower_batch_norm_parameters(tfds_dir):
    task, variables = _task()
    before = jax.tree.map(np.array, variables)
    ev = _evaluator(task, lr=0.05)
    online = ev.run(variables)
    jax.tree.map(np.testing.assert_array_equal, variables, before)  # given variables untouched
    episodic = _evaluator(task, lr=0.05, episodic=True).run(variables)
    assert online["adapt/entropy"] != pytest.approx(episodic["adapt/entropy"], abs=1e-6)

    tower_vars = task.image_tower_variables(variables)
    i, head = ev.heads[0]
    classes = ev._class_subset(head)
    images, labels, mask = next(ev.stream(classes))
    assert np.isin(labels, classes).all() and mask.sum() == len(labels)
    norm, opt_state = ev.initial(variables, tower_vars, images, mask)
    stats = jax.tree_util.tree_flatten_with_path(task.image_tower.variables["batch_stats"])[0]
    bn = {"/".join(k.key for k in path[:-1]) for path, _ in stats}  # every BatchNorm's path
    assert bn == set(norm) and len(norm) > 4
    assert all(set(v) == {"scale", "bias"} for v in norm.values())
    classifier, _ = task.class_embeddings(variables)
    scale = task.logit_scales(variables)[i]
    adapted, *_ = ev._adapt(
        variables, tower_vars, i, norm, opt_state, images, mask, classifier[i][classes], scale
    )
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), adapted, norm)
    assert all(jax.tree.leaves(moved))  # every BN scale and bias of the tower took a step
    # padding rows do not count: the same real rows, other padding, the same logits
    other = images.copy()
    other[~mask] = 3.0
    a, _ = task.tent_image_embeddings(variables, tower_vars, images, norm, mask)
    b, _ = task.tent_image_embeddings(variables, tower_vars, other, norm, mask)
    np.testing.assert_allclose(np.asarray(a)[:, mask], np.asarray(b)[:, mask], atol=1e-5)


def test_zeroshot_tent_errors(tfds_dir):
    task, variables = _task()
    with pytest.raises(UserError, match="optimizer='rmsprop'"):
        _evaluator(task, optimizer="rmsprop")
    with pytest.raises(UserError, match="steps >= 0"):
        _evaluator(task, steps=-1)
    with pytest.raises(UserError, match="statistics='test'"):
        _evaluator(task, statistics="test")
    with pytest.raises(UserError, match="cosine logits"):
        _evaluator(task, score="itm")
    vit, vit_variables = _task(image={**tiny_config().model.image.to_dict()})
    with pytest.raises(UserError, match="BatchNorm"):
        _evaluator(vit).run(vit_variables)


def test_shift_tent_config_names_its_setting(tfds_dir):
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "animals", "shift_tent.py")
    c = config_lib.load(f"{path}:corruption=fog,severity=3")
    assert set(c.evals) == {
        "shift_seen_tent", "shift_unseen_tent", "shift_unseen_control_tent", "val_pseudo_unseen",
    }  # fmt: skip
    for name in ("shift_seen_tent", "shift_unseen_tent", "shift_unseen_control_tent"):
        ev = c.evals[name]
        assert ev.type == "zeroshot_tent" and ev.dataset == "animal_silhouettes_c/fog_3"
        assert (ev.split, ev.lr, ev.batch_size, ev.optimizer) == ("test", 1e-3, 128, "adam")
    assert c.evals.shift_unseen_control_tent.heads == "control"
    assert c.evals.shift_seen_tent.statistics == "batch"
    c = config_lib.load(f"{path}:lr=0.0005,episodic=True,statistics=source")
    assert c.evals.shift_seen_tent.episodic and c.evals.shift_unseen_tent.statistics == "source"
    c = config_lib.load(f"{path}:split=2,source_bn=True,statistics=source")
    assert c.model.image.statistics == "source" and len(c.heads.unseen) == 1
    assert c.evals.shift_unseen_tent.statistics == "source"
