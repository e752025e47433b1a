"""Two-tower evaluators on hand-made embeddings (fake prediction functions), with answers worked
out by hand."""

import numpy as np
import pytest

from xmodal_jax import evaluators
from xmodal_jax.errors import UserError
from xmodal_jax.evaluation.zeroshot import ZeroShotSetup
from xmodal_jax.tasks.two_tower_heads import Head
from xmodal_jax.train import plots

NAMES = ("a", "b", "c", "d")
EYE = np.eye(4, dtype=np.float32)
PERM = EYE[[1, 0, 3, 2]]  # the control heads' classifier: class c named like class perm(c)


class FakeTask:
    """The prediction functions of a two-tower task (`predict_fns`); embeddings are fixed per
    split."""

    def __init__(self, heads, images, classifier):
        self.heads, self.images, self.classifier = heads, images, classifier

    def predict_fns(self, fused: bool = True) -> dict:
        data = {"name": "fake", "split": "train[:90%]", "pp": ""}
        fns = {
            "image_embeddings": self.image_embeddings,
            "class_embeddings": self.class_embeddings,
            "text_embeddings": self.text_embeddings,
            "zeroshot": ZeroShotSetup(NAMES, tuple(self.heads), data, ("{}",)),
        }
        if fused:
            fns["match_scores"] = self.match_scores
        return fns

    def image_embeddings(self, variables, data_cfg, *, batch_size, mesh=None):
        feats, labels = self.images[data_cfg["split"]]
        emb = np.stack([feats] * len(self.heads))
        return {"emb": emb, "feats": feats, "label": labels, "index": np.arange(len(labels))}

    def class_embeddings(self, variables, templates=None):
        return self.classifier, self.classifier

    def text_embeddings(self, variables, texts):
        table = {"one": [1, 0, 0, 0], "two": [0, 1, 0, 0], "three": [0.7, 0.7, 0, 0]}
        return np.asarray([[table[t] for t in texts]] * len(self.heads), np.float32)

    def match_scores(self, variables, feats, text_feats, head):
        return feats @ text_feats.T - 0.5


def build(kind, task, fused=True, **cfg):
    return evaluators.get(kind)("ev", {"type": kind, **cfg}, task.predict_fns(fused), None, 8)


# Test images: label -> embedding (the classifier rows are the unit vectors e_c).
TEST = (
    np.array(
        [
            [1, 0, 0, 0],  # a: right among seen {a, b}
            [0.4, 0.6, 0, 0],  # a: taken for b
            [0, 1, 0, 0],  # b: right
            [0, 0, 1, 0],  # c: right among unseen {c, d}
            [0, 0, 0.1, 0.9],  # c: taken for d
            [0, 0, 0, 1],  # d: right
            [2, 0, 0, 1],  # d: right among {c, d}, taken for a among all
            [0, 0, 0.7, 0.3],  # d: taken for c
        ],
        np.float32,
    ),
    np.array([0, 0, 1, 2, 2, 3, 3, 3]),
)


def split_heads():
    main0 = Head("split_0", 0, "main", (0, 1), (2, 3), NAMES)
    main1 = Head("split_1", 1, "main", (2, 3), (0, 1), NAMES)
    ctrl0 = Head("split_0/control", 0, "control", (0, 1), (2, 3), ("b", "a", "d", "c"))
    ctrl1 = Head("split_1/control", 1, "control", (2, 3), (0, 1), ("b", "a", "d", "c"))
    return [main0, main1, ctrl0, ctrl1]


@pytest.fixture
def task():
    return FakeTask(split_heads(), {"test": TEST}, np.stack([EYE, EYE, PERM, PERM]))


def test_zeroshot_seen_unseen_all(task):
    out = build("zeroshot", task, classes="seen").run({})
    assert out["split_0/accuracy"] == pytest.approx(2 / 3)  # images 0-2 among {a, b}
    assert out["split_1/accuracy"] == pytest.approx(3 / 5)  # images 3-7 among {c, d}
    assert out["accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    ev = build("zeroshot_unseen", task)
    out = ev.run({})
    assert out["split_0/accuracy"] == pytest.approx(3 / 5)
    assert out["split_1/accuracy"] == pytest.approx(2 / 3)
    assert ev.chance == pytest.approx(1 / 2) and out["chance"] == pytest.approx(1 / 2)
    out = build("zeroshot", task, classes="all").run({})
    assert out["split_0/accuracy"] == pytest.approx(4 / 8)  # images 1, 4, 6, 7 wrong
    out = build("zeroshot", task, classes=["c", "d"], heads="main").run({})
    assert out["split_0/accuracy"] == pytest.approx(3 / 5)


def test_control_uses_the_permuted_name_heads(task, tmp_path):
    out = build("zeroshot_control", task).run({})
    # Split 0 control: class c is scored by e_d and d by e_c; images 4 and 7 come out right.
    assert out["split_0/accuracy"] == pytest.approx(2 / 5)
    ev = build("zeroshot_unseen", task)
    ev.run({})
    assert ev.last_control["split_0"] == pytest.approx(2 / 5)
    (path,) = ev.plot(str(tmp_path))
    assert path.endswith(".png") and (tmp_path / "zeroshot_ev.png").stat().st_size > 1000
    paths = plots.write_all(str(tmp_path), [{"step": 1, "train/loss": 1.0}], {"ev": ev, "x": 1})
    assert str(tmp_path / "plots" / "zeroshot_ev.png") in paths


def test_bad_configs(task):
    with pytest.raises(UserError, match="classes"):
        build("zeroshot", task, classes="some")
    with pytest.raises(UserError, match="unknown"):
        build("zeroshot", task, classes=["a", "zebra"])
    with pytest.raises(UserError, match="val_split"):
        build("gzsl", task)
    with pytest.raises(UserError, match="calibration"):
        build("gzsl", task, val_split="train[90%:]")
    with pytest.raises(UserError, match="two_tower"):  # a classifier's prediction functions
        evaluators.get("zeroshot")("ev", {"type": "zeroshot"}, {"predict": None}, None, 8)


def gzsl_task(test=None):
    main = Head("split_0", 0, "main", (0, 1), (2, 3), NAMES)
    calib = Head("split_0/calibration", 0, "calibration", (0,), (2, 3), NAMES, (1,))
    val = (
        np.array(
            [
                [1, 0.2, 0, 0],  # a: seen for the calibration head
                [0.6, 0.5, 0, 0],  # b: pseudo-unseen, a little closer to a
                [0, 0, 5, 0],  # c: unseen in this split; must be ignored
            ],
            np.float32,
        ),
        np.array([0, 1, 2]),
    )
    test = test or (
        np.array([[1, 0, 0.3, 0], [0, 1, 0, 0.2], [0.5, 0, 0.3, 0], [0, 0.4, 0, 0.3]], np.float32),
        np.array([0, 1, 2, 3]),
    )
    return FakeTask([main, calib], {"test": test, "train[90%:]": val}, np.stack([EYE, EYE]))


def test_gzsl_chooses_gamma_on_validation_only():
    out = build("gzsl", gzsl_task(), val_split="train[90%:]").run({})
    # Calibration head on its validation images: a wins by 0.8/|(1, .2)|, b loses by
    # 0.1/|(.6, .5)|; the best penalty is the midpoint of the two gaps.
    gap_a, gap_b = 0.8 / np.hypot(1, 0.2), 0.1 / np.hypot(0.6, 0.5)
    assert out["gamma"] == pytest.approx((gap_a + gap_b) / 2, rel=1e-5)
    # With it every test image is right; without it the unseen ones never win.
    assert (out["seen"], out["unseen"], out["harmonic_mean"]) == pytest.approx((1, 1, 1))
    assert out["harmonic_mean_uncalibrated"] == 0.0
    # The test split never moves gamma.
    other_test = (np.eye(4, dtype=np.float32), np.array([3, 2, 1, 0]))
    again = build("gzsl", gzsl_task(other_test), val_split="train[90%:]").run({})
    assert again["gamma"] == out["gamma"] and again["harmonic_mean"] == 0.0


def test_retrieval_recall(task, monkeypatch):
    images = (np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32), np.array([0, 1]))
    task = FakeTask(split_heads()[:1], {"test": images}, np.stack([EYE]))
    ev = build("retrieval", task, ks=(1, 2))
    # Captions: image 0 has "one" and "three", image 1 has "two".
    monkeypatch.setattr(ev, "_captions", lambda: (["one", "three", "two"], np.array([0, 0, 1])))
    out = ev.run({})
    assert out["i2t_R@1"] == 1.0 and out["i2t_R@2"] == 1.0
    # Text->image: "three" is equally close to both images; ties count against the query.
    assert out["t2i_R@1"] == pytest.approx(2 / 3) and out["t2i_R@2"] == 1.0


def test_itm_accuracy_and_itm_ranking():
    head = Head("split_0", 0, "main", (0, 1), (2, 3), NAMES)
    images = (np.array([[1, 0.5, 0, 0], [0.2, 0.4, 0, 0]], np.float32), np.array([0, 1]))
    task = FakeTask([head], {"test": images}, np.stack([EYE]))
    # Image 0: own prompt 1 - .5 > 0, hardest other (b) .5 - .5 <= 0; image 1: own prompt
    # .4 - .5 < 0 (wrong), other .2 - .5 <= 0.
    assert build("itm", task).run({})["accuracy"] == pytest.approx(3 / 4)
    out = build("zeroshot", task, classes="seen", score="itm").run({})
    assert out["accuracy"] == pytest.approx(1.0)
    for kind, cfg in (("itm", {}), ("zeroshot", {"score": "itm"})):  # no fused head
        with pytest.raises(UserError, match="fused head"):
            build(kind, task, fused=False, **cfg)
