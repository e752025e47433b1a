"""Evaluators: per-class accuracy and the few-shot ridge probe, against references computed
here from the model's outputs with numpy and scikit-learn."""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import Ridge

import xmodal_jax.data  # noqa: F401  (registers the embedded datasets)
from xmodal_jax import evaluators, tasks
from xmodal_jax.data import pipeline, preprocess
from xmodal_jax.errors import UserError
from xmodal_jax.evaluators import classification as classification_evals
from xmodal_jax.parallel import mesh as mesh_lib

pytestmark = pytest.mark.mesh  # needs the 8 devices of XMODAL_TEST_DEVICES=8

PP = "value_range(0, 1, in_hi=16)|resize(28)|keep('image', 'label')"


def _sklearn_probe(x_train, y_train, x_test, num_classes, l2):
    """The protocol of `ridge_fewshot_accuracy`, fit by scikit-learn: standardise with the
    training statistics, append a constant 100, regress {-1, +1} one-hot targets."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    prep = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])
    targets = 2.0 * np.eye(num_classes)[y_train] - 1.0
    ridge = Ridge(alpha=l2, fit_intercept=False, solver="svd").fit(prep(x_train), targets)
    return ridge.predict(prep(x_test)).argmax(1)


@pytest.mark.parametrize("n_train, dim", [(60, 8), (12, 40)])  # primal and dual forms
def test_ridge_fewshot_matches_sklearn(n_train, dim):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, dim)) * 2
    y_train, y_test = np.arange(n_train) % 3, rng.integers(0, 3, 300)
    x_train = centers[y_train] + rng.normal(size=(n_train, dim))
    x_test = centers[y_test] + rng.normal(size=(300, dim))
    for l2 in (0.1, 2.0**10):
        expected = np.mean(_sklearn_probe(x_train, y_train, x_test, 3, l2) == y_test)
        got = classification_evals.ridge_fewshot_accuracy(x_train, y_train, x_test, y_test, 3, l2)
        assert got == pytest.approx(expected, abs=1e-12)
        assert 0.5 < got <= 1.0  # separable blobs: far above chance


def test_per_class_accuracy():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 2]])  # class 1 has no examples
    out = classification_evals.per_class_accuracy(confusion, ["cat", "no show", "a/b"])
    assert out == {
        "mean_class_accuracy": pytest.approx((3 / 4 + 2 / 4) / 2),
        "class_accuracy/cat": 0.75,
        "class_accuracy/a_b": 0.5,
    }
    assert set(classification_evals.per_class_accuracy(confusion, "abc", each=False)) == {
        "mean_class_accuracy"
    }


def _task():
    c = ml_collections.ConfigDict()
    c.seed, c.batch_size = 0, 16
    c.model = {"name": "lenet", "num_classes": 10, "bottleneck": 32, "dropout": 0.0}
    c.data = {"name": "digits_uci", "split": "train", "pp": PP}
    task = tasks.build(c)
    variables = jax.jit(task.init)(
        jax.random.key(3), {"image": np.zeros((2, 28, 28, 1), np.float32)}
    )
    return task, nn.unbox(variables)


def _outputs(task, variables, split):
    """`predict` on every example of a digits_uci split, one by one, in numpy."""
    src, pp = pipeline.source("digits_uci", split), preprocess.compose(PP)
    rows = [pp(src[i]) for i in range(len(src))]
    images = np.stack([r["image"] for r in rows])
    out = jax.jit(task.predict)(variables, {"image": images})
    return {k: np.asarray(v) for k, v in out.items()}, np.array([r["label"] for r in rows])


def test_classification_and_fewshot_evaluators_on_digits(tfds_dir):
    task, variables = _task()
    test_out, test_labels = _outputs(task, variables, "test")
    train_out, train_labels = _outputs(task, variables, "train")
    mesh = mesh_lib.make_mesh({"data": 8})  # eval batches sharded over 8 devices

    cfg = {"dataset": "digits_uci", "split": "test", "pp": PP}
    clf = classification_evals.Classification(
        "target", cfg, task.predict_fns(), mesh, batch_size=64
    )
    got = clf.run(variables)
    pred = test_out["logits"].argmax(1)
    per_class = [np.mean(pred[test_labels == c] == c) for c in range(10)]
    assert got["accuracy"] == pytest.approx(np.mean(pred == test_labels), abs=1e-9)
    assert got["mean_class_accuracy"] == pytest.approx(np.mean(per_class), abs=1e-9)
    names = pipeline.class_names("digits_uci")
    for c, name in enumerate(names):
        assert got[f"class_accuracy/{name}"] == pytest.approx(per_class[c], abs=1e-9)

    shots, l2 = (1, 5), 2.0**10
    fewshot = classification_evals.FewShot(
        "fewshot", {**cfg, "shots": shots, "seeds": 2}, task.predict_fns(), mesh, 64
    )
    got = fewshot.run(variables)
    for k in shots:
        accs = []
        for seed in range(2):  # the documented draw: per class, a seeded permutation, first k
            rng = np.random.default_rng(seed)
            idx = np.concatenate(
                [rng.permutation(np.flatnonzero(train_labels == c))[:k] for c in range(10)]
            )
            pred = _sklearn_probe(
                train_out["pooled"][idx].astype(np.float64),
                train_labels[idx],
                test_out["pooled"].astype(np.float64),
                10,
                l2,
            )
            accs.append(np.mean(pred == test_labels))
        assert got[f"{k}shot_accuracy"] == pytest.approx(np.mean(accs), abs=2 / 899), k
    assert got["5shot_accuracy"] > 0.3  # even random LeNet features separate UCI digits


def test_fewshot_errors(tfds_dir):
    task, _ = _task()
    mesh = mesh_lib.make_mesh({"data": 8})
    cfg = {"dataset": "digits_uci", "pp": PP, "shots": (200,)}
    with pytest.raises(UserError, match="fewer than 200 training examples"):
        classification_evals.FewShot("fs", cfg, task.predict_fns(), mesh, 64)._support_indices()
    with pytest.raises(UserError, match="no 'dataset'"):
        classification_evals.FewShot("fs", {"pp": PP}, task.predict_fns(), mesh, 64)


def test_each_evaluator_runs_at_its_own_interval_and_all_at_the_end():
    c = ml_collections.ConfigDict(
        {
            "total_steps": 12,
            "eval_every": 5,
            "evals": {"a": {"every": 2}, "b": {}, "c": {"every": 0}},
        }
    )
    assert [evaluators.due(c, s) for s in (3, 4, 5, 10, 12)] == [
        [],
        ["a"],
        ["b"],
        ["a", "b"],
        ["a", "b", "c"],
    ]
