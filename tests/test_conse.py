"""ConSE (Norouzi et al. 2014): the embedding of Eq. 1 against a direct float64 loop, and the
training-free evaluator of the two-tower task against the towers applied by hand."""

import numpy as np
import pytest
from twotower_testing import tiny_config

from xmodal_jax import evaluators, tasks
from xmodal_jax.data import pipeline
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation import conse
from xmodal_jax.evaluation import zeroshot as zs
from xmodal_jax.models import imagenet_classes


def _eq1(logits, source_emb, top_t):
    """f(x) = sum_t p(y_t|x) s(y_t) / sum_t p(y_t|x) over the top-T classes, one image at a time."""
    out = []
    for row in np.asarray(logits, np.float64):
        p = np.exp(row - row.max())
        p /= p.sum()
        top = sorted(range(len(p)), key=lambda k: -p[k])[:top_t]
        z = sum(p[k] for k in top)
        out.append(sum(p[k] * np.asarray(source_emb[k], np.float64) for k in top) / z)
    return np.stack(out)


def test_conse_embedding_is_eq1():
    rng = np.random.default_rng(0)
    logits, emb = rng.normal(size=(6, 9)) * 3, rng.normal(size=(9, 5))
    for t in (1, 3, 9):
        np.testing.assert_allclose(conse.conse_embeddings(logits, emb, t), _eq1(logits, emb, t),
                                   rtol=1e-12, atol=1e-12)  # fmt: skip
    # T=1 is the top class's embedding itself; T=K the full expectation.
    np.testing.assert_allclose(conse.conse_embeddings(logits, emb, 1), emb[logits.argmax(1)])
    with pytest.raises(ValueError, match="top_t=10"):
        conse.conse_embeddings(logits, emb, 10)


def test_conse_predicts_the_nearest_target_name():
    source = np.eye(3)  # three source classes on the axes
    target = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # target 0 between sources 0 and 1
    logits = np.log(np.array([[0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.45, 0.1, 0.45]]))
    # Image 2 with T=1: source 0 (first of the tie) -> target 0; with T=3 its mean points at
    # (0.45, 0.1, 0.45), nearer target 1 (cos 0.70) than target 0 (cos 0.60).
    assert conse.conse_predict(logits, source, target, 1).tolist() == [0, 1, 0]
    assert conse.conse_predict(logits, source, target, 3).tolist() == [0, 1, 1]


def test_conse_evaluator_equals_the_towers_applied_by_hand(tfds_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path))
    c = tiny_config(heads={"unseen": [("cat", "dog", "horse"), ("bear", "cow", "zebra")]})
    c.model.image.overrides = {**c.model.image.overrides, "num_classes": 1000}
    task = tasks.build(c)
    fns = task.predict_fns()
    cfg = {"type": "conse", "split": "test[:10%]", "top_t": 5}
    ev = evaluators.get("conse")("conse", cfg, fns, None, 64)
    variables = {"params": {}}  # training-free: the locked towers only
    got = ev.run(variables)

    data = pipeline.eval_data(cfg, "conse", default=task.data)
    src = pipeline.source(data["name"], data["split"], data.get("data_dir"))
    from xmodal_jax.data import preprocess

    pp = preprocess.compose(data["pp"])
    images = np.stack([pp(dict(src[i]))["image"] for i in range(len(src))])
    labels = np.asarray([src[i]["label"] for i in range(len(src))])
    tower = task.image_tower
    logits = np.asarray(tower.module.apply(tower.variables, images)["logits"], np.float64)
    encode = lambda texts: task.text_tower_features(None, texts)
    source_emb = zs.build_classifier(imagenet_classes.names(), encode, task.templates)
    target_emb = zs.build_classifier(list(task.class_names), encode, task.templates)
    accs = []
    for unseen in ((2, 4, 7), (0, 3, 9)):  # cat dog horse / bear cow zebra
        rows = np.isin(labels, unseen)
        f = _eq1(logits[rows], source_emb, 5)
        t = target_emb[list(unseen)]
        cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
            t / np.linalg.norm(t, axis=1, keepdims=True)
        ).T
        accs.append(np.mean(np.asarray(unseen)[cos.argmax(1)] == labels[rows]))
    assert got["split_0/accuracy"] == pytest.approx(accs[0], abs=1e-9)
    assert got["split_1/accuracy"] == pytest.approx(accs[1], abs=1e-9)
    assert got["accuracy"] == pytest.approx(np.mean(accs), abs=1e-9)
    assert got["chance"] == pytest.approx(1 / 3)

    # The name embeddings come from the feature cache: a second task (another run) embeds no
    # name again, reads exactly what the text tower gives, and the evaluator agrees to the bit.
    again = tasks.build(c)
    cached = again.locked_text_classifier(imagenet_classes.names(), task.templates)
    assert (again._cache.hits, again._cache.misses) == (1, 0)
    np.testing.assert_array_equal(cached, source_emb)
    assert evaluators.get("conse")("conse", cfg, again.predict_fns(), None, 64).run({}) == got
    changed = again.locked_text_classifier(imagenet_classes.names(), ("a {}.",))
    assert again._cache.misses == 1 and not np.array_equal(changed, source_emb)

    plain = tasks.build(tiny_config(heads={"unseen": [("cat", "dog", "horse")]}))
    with pytest.raises(UserError, match="ConSE needs a locked image tower"):
        evaluators.get("conse")("conse", cfg, plain.predict_fns(), None, 64)
