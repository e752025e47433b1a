"""Zero-shot classifier, generalised zero-shot calibration and retrieval recall."""

import numpy as np
import pytest

from xmodal_jax import evaluation as E

# ---- zero-shot classifier ----------------------------------------------------------------


class FakeEncoder:
    """Maps each prompt to a fixed random vector; records the chunk sizes it was called with."""

    def __init__(self, prompts, dim=6, seed=0):
        r = np.random.default_rng(seed)
        self.table = {p: r.normal(size=dim) * r.uniform(0.5, 3.0) for p in prompts}
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(len(prompts))
        return np.stack([self.table[p] for p in prompts]).astype(np.float32)


CLASSES = ["cat", "dog", "zebra"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


def test_classifier_matches_float64_reference():
    prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
    enc = FakeEncoder(prompts)
    w = E.build_classifier(CLASSES, enc, TEMPLATES, batch_size=4)
    assert enc.calls == [4, 2] and w.shape == (3, 6) and w.dtype == np.float32

    ref = []
    for c in CLASSES:
        e = np.stack([enc.table[t.format(c)] for t in TEMPLATES])
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        m = e.mean(0)
        ref.append(m / np.linalg.norm(m))
    np.testing.assert_allclose(w, np.stack(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w, E.build_classifier(CLASSES, enc, TEMPLATES), rtol=1e-6)


def test_default_templates_and_zero_shot_accuracy_known_answer():
    assert all(t.count("{}") == 1 for t in E.DEFAULT_TEMPLATES) and len(E.DEFAULT_TEMPLATES) >= 5
    # Every prompt of class k encodes to e_k plus template-specific noise orthogonal to all e_j.
    dim = 3 + len(E.DEFAULT_TEMPLATES)

    def encode(prompts):
        out = []
        for p in prompts:
            k = next(i for i, c in enumerate(CLASSES) if p.endswith(f" {c}."))
            v = np.zeros(dim)
            v[k] = 1.0
            v[3 + E.DEFAULT_TEMPLATES.index(p.replace(CLASSES[k], "{}"))] = 0.5
            out.append(v)
        return np.stack(out)

    w = E.build_classifier(CLASSES, encode)
    images = np.zeros((6, dim))
    labels = np.array([0, 1, 2, 2, 1, 0])
    images[np.arange(6), labels] = 2.0
    images[0, 1] = 1.5  # still closer to cat than to dog
    logits = E.zeroshot_logits(images, w)
    assert E.accuracy(logits, labels) == 1.0
    assert E.accuracy(logits, (labels + 1) % 3) == 0.0
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-6)


def test_accuracy_top_k_hand_case():
    scores = np.array([[0.1, 0.9, 0.5], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]])
    labels = np.array([2, 0, 0])
    assert E.accuracy(scores, labels) == pytest.approx(1 / 3)
    assert E.accuracy(scores, labels, top_k=2) == pytest.approx(2 / 3)
    assert E.accuracy(scores, labels, top_k=3) == 1.0


def test_classifier_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        E.build_classifier(CLASSES, lambda p: np.ones((len(p), 2)), ["no placeholder"])
    with pytest.raises(ValueError, match=r"\[6, D\]"):
        E.build_classifier(CLASSES, lambda p: np.ones((1, 2)), TEMPLATES)
    with pytest.raises(ValueError, match="share D"):
        E.zeroshot_logits(np.ones((2, 3)), np.ones((4, 5)))


# ---- generalised zero-shot ----------------------------------------------------------------


def test_per_class_accuracy_is_a_mean_over_classes():
    labels = np.array([0, 0, 0, 1, 2])
    preds = np.array([0, 0, 1, 1, 0])
    assert E.per_class_accuracy(preds, labels, [0, 1]) == pytest.approx((2 / 3 + 1) / 2)
    assert E.per_class_accuracy(preds, labels, [0, 1, 2]) == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert E.harmonic_mean(0.5, 0.25) == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_gzsl_metrics_hand_case_with_calibration():
    # Classes 0, 1 seen; 2 unseen. Seen scores are inflated by 0.3 for the unseen images.
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # seen 0, correct at any gamma < 0.7
            [0.1, 0.8, 0.7],  # seen 1, flips to 2 when gamma > 0.1
            [0.5, 0.0, 0.4],  # unseen 2, correct when gamma > 0.1
            [0.6, 0.2, 0.35],  # unseen 2, correct when gamma > 0.25
        ]
    )
    labels = np.array([0, 1, 2, 2])
    m = E.gzsl_metrics(scores, labels, [0, 1], [2], gamma=0.0)
    assert (m["seen_accuracy"], m["unseen_accuracy"], m["harmonic_mean"]) == (1.0, 0.0, 0.0)
    m = E.gzsl_metrics(scores, labels, [0, 1], [2], gamma=0.2)
    assert (m["seen_accuracy"], m["unseen_accuracy"]) == (0.5, 0.5)
    m = E.gzsl_metrics(scores, labels, [0, 1], [2], gamma=0.3)
    assert (m["seen_accuracy"], m["unseen_accuracy"]) == (0.5, 1.0)
    assert m["harmonic_mean"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="cover all"):
        E.gzsl_metrics(scores, labels, [0], [2])


def _np_h(scores, labels, seen, unseen, gamma):
    s = scores.copy()
    s[:, seen] -= gamma
    pred = s.argmax(1)

    def pc(classes):
        return np.mean([np.mean(pred[labels == c] == c) for c in classes if np.any(labels == c)])

    a, b = pc(seen), pc(unseen)
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def test_choose_calibration_is_optimal_on_a_fine_grid():
    r = np.random.default_rng(0)
    n, c = 300, 7  # columns 0-4 seen, 5-6 pseudo-unseen, 7 a test-time unseen class
    labels = r.integers(0, c, size=n)
    scores = r.normal(size=(n, c + 1))
    scores[np.arange(n), labels] += 1.5
    scores[:, :5] += 0.8  # seen classes are over-confident
    seen, pu = np.arange(5), np.array([5, 6])

    gamma = E.choose_calibration(scores, labels, seen, pu)
    sub = scores[:, :7]  # only seen + pseudo-unseen columns compete
    grid = np.linspace(-3, 4, 3501)
    best_grid = max(_np_h(sub, labels, seen, pu, g) for g in grid)
    chosen = _np_h(sub, labels, seen, pu, gamma)
    assert chosen >= best_grid - 1e-12
    assert chosen > _np_h(sub, labels, seen, pu, 0.0)  # calibration helps here
    assert 0.0 < gamma < 3.0


def test_choose_calibration_refuses_unseen_labels():
    scores = np.zeros((3, 4))
    with pytest.raises(ValueError, match="seen classes only"):
        E.choose_calibration(scores, np.array([0, 1, 3]), [0, 1], [2])
    with pytest.raises(ValueError, match="both seen and unseen"):
        E.choose_calibration(scores, np.array([0, 1, 2]), [0, 1], [1, 2])


# ---- retrieval ----------------------------------------------------------------------------


def test_retrieval_hand_case_with_several_captions():
    # 3 images, 5 captions: image 0 -> captions 0, 1; image 1 -> 2, 3; image 2 -> 4.
    t2i = np.array([0, 0, 1, 1, 2])
    sim = np.array(
        [
            [0.1, 0.9, 0.8, 0.0, 0.0],  # image 0: caption 1 (its own) ranks first
            [0.7, 0.0, 0.1, 0.2, 0.6],  # image 1: own best 0.2 is beaten by 0.7, 0.6 -> rank 2
            [0.5, 0.0, 0.0, 0.0, 0.4],  # image 2: own 0.4 beaten by 0.5 -> rank 1
        ]
    )
    i2t, t2i_rank = E.retrieval_ranks(sim, t2i)
    np.testing.assert_array_equal(i2t, [0, 2, 1])
    # caption 0 (image 0): column [0.1, 0.7, 0.5] -> rank 2; caption 1: 0.9 top -> 0;
    # caption 2 (image 1): [0.8, 0.1, 0.0] -> 1; caption 3: [0, 0.2, 0] -> 0; caption 4 -> 1.
    np.testing.assert_array_equal(t2i_rank, [2, 0, 1, 0, 1])
    m = E.retrieval_metrics(sim, t2i, ks=(1, 2, 5))
    assert m["i2t_R@1"] == pytest.approx(1 / 3) and m["i2t_R@2"] == pytest.approx(2 / 3)
    assert m["t2i_R@1"] == pytest.approx(2 / 5) and m["t2i_R@2"] == pytest.approx(4 / 5)
    assert m["i2t_R@5"] == 1.0 and m["t2i_R@5"] == 1.0


def test_retrieval_matches_sort_based_reference():
    r = np.random.default_rng(1)
    n_img, n_txt = 20, 45
    t2i = np.concatenate([np.arange(n_img), r.integers(0, n_img, n_txt - n_img)])
    sim = r.normal(size=(n_img, n_txt))
    got = E.retrieval_metrics(sim, t2i)

    def recall(order_rows, hits, k):
        return np.mean([np.any(hits(q)[order[:k]]) for q, order in enumerate(order_rows)])

    i2t_order = np.argsort(-sim, axis=1)
    t2i_order = np.argsort(-sim.T, axis=1)
    for k in (1, 5, 10):
        ref_i2t = recall(i2t_order, lambda i: t2i == i, k)
        ref_t2i = recall(t2i_order, lambda j: np.arange(n_img) == t2i[j], k)
        assert got[f"i2t_R@{k}"] == pytest.approx(ref_i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(ref_t2i)


def test_retrieval_ties_count_against_the_query_and_bad_inputs():
    m = E.retrieval_metrics(np.ones((3, 3)), np.arange(3), ks=(1, 3))
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0 and m["i2t_R@3"] == 1.0
    with pytest.raises(ValueError, match="have no caption"):
        E.retrieval_metrics(np.ones((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="text_to_image"):
        E.retrieval_metrics(np.ones((3, 3)), np.array([0, 1]))
