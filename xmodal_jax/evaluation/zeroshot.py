"""Zero-shot classification from class names, and generalised zero-shot with calibration.

Classifier (Radford et al. 2021, prompt ensembling): every class name is put into every prompt
template, the prompts are encoded by the text tower, each embedding is L2-normalised, the
embeddings of a class are averaged over templates and the mean is renormalised; the rows form
the classifier W [C, D] and an image is assigned argmax_c  z_img . w_c.

Generalised zero-shot (test images from seen and unseen classes, predictions over all of them)
uses calibrated stacking (Chao et al. 2016, "An Empirical Study and Analysis of Generalized
Zero-Shot Learning for Object Recognition in the Wild"): subtract gamma from every seen-class
score before the argmax. Metrics are per-class mean accuracies on the seen and the unseen test
classes and their harmonic mean H = 2 S U / (S + U) (Xian et al. 2018, "Zero-Shot Learning - A
Comprehensive Evaluation of the Good, the Bad and the Ugly").

gamma is chosen on validation data of seen classes only (`choose_calibration`): some seen
classes are held out of training as pseudo-unseen; gamma maximises H of pseudo-seen vs
pseudo-unseen validation images, and is then applied unchanged on the test split.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


@dataclasses.dataclass(frozen=True)
class ZeroShotSetup:
    """What zero-shot evaluators score: the dataset's class names (empty for caption data), the
    heads (each with the classes it trains on, its unseen classes and the names it gives every
    class), the training data config (the default evaluation data) and the prompt templates."""

    class_names: tuple[str, ...]
    heads: tuple[Any, ...]
    data: Mapping[str, Any]
    templates: tuple[str, ...]


DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a blurry photo of a {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a drawing of a {}.",
    "a silhouette of a {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)

MAX_CANDIDATES = 4096


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norm == 0) or not np.all(np.isfinite(norm)):
        raise ValueError("Embeddings contain zero or non-finite rows; check the text encoder.")
    return x / norm


def build_classifier(
    class_names: Sequence[str],
    encode_text: Callable[[list[str]], ArrayLike],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int | None = None,
) -> np.ndarray:
    """Returns the zero-shot classifier [C, D] (float32, unit rows) for `class_names`.

    `encode_text(list of prompts) -> [len(prompts), D]`; prompts are sent in chunks of
    `batch_size` (all at once when None).
    """
    if isinstance(class_names, str) or not class_names:
        raise ValueError("class_names must be a non-empty list of strings.")
    templates = [templates] if isinstance(templates, str) else list(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"Each prompt template needs exactly one '{{}}' for the class name; bad: {bad}."
        )
    prompts = [t.replace("{}", name) for name in class_names for t in templates]
    step = batch_size or len(prompts)
    chunks = [np.asarray(encode_text(prompts[i : i + step])) for i in range(0, len(prompts), step)]
    emb = np.concatenate(chunks).astype(np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(prompts):
        raise ValueError(
            f"encode_text must return [num_prompts, D] = [{len(prompts)}, D]; got {emb.shape}."
        )
    emb = _normalize(emb).reshape(len(class_names), len(templates), -1).mean(axis=1)
    return _normalize(emb).astype(np.float32)


def zeroshot_logits(image_emb: ArrayLike, classifier: ArrayLike) -> np.ndarray:
    """Cosine similarities [N, C] between L2-normalised image embeddings and classifier rows."""
    image_emb, classifier = np.asarray(image_emb), np.asarray(classifier)
    if image_emb.ndim != 2 or classifier.ndim != 2 or image_emb.shape[1] != classifier.shape[1]:
        raise ValueError(
            f"image_emb [N, D] and classifier [C, D] must share D; got {image_emb.shape} and "
            f"{classifier.shape}. Project the image features into the text embedding space."
        )
    return _normalize(image_emb.astype(np.float32)) @ classifier.T


def accuracy(scores: ArrayLike, labels: ArrayLike, *, top_k: int = 1) -> float:
    """Fraction of rows whose label is among the top_k scores (ties broken by lower index)."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"scores must be [N, C] and labels [N]; got {scores.shape}, {labels.shape}."
        )
    top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def per_class_accuracy(predictions: ArrayLike, labels: ArrayLike, classes: ArrayLike) -> float:
    """Mean over `classes` (those with at least one example) of the per-class accuracy."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    accs = [
        np.mean(predictions[labels == c] == c) for c in np.asarray(classes) if np.any(labels == c)
    ]
    if not accs:
        raise ValueError("None of the given classes has an example in labels.")
    return float(np.mean(accs))


def harmonic_mean(seen: float, unseen: float) -> float:
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def _class_split(num_classes: int, seen, unseen) -> tuple[np.ndarray, np.ndarray]:
    seen, unseen = np.unique(np.asarray(seen, int)), np.unique(np.asarray(unseen, int))
    both = np.concatenate([seen, unseen])
    if not len(seen) or not len(unseen):
        raise ValueError("Give at least one seen and one unseen class.")
    if np.intersect1d(seen, unseen).size:
        raise ValueError(f"Classes {np.intersect1d(seen, unseen)} are both seen and unseen.")
    if both.min() < 0 or both.max() >= num_classes:
        raise ValueError(f"Class indices must lie in [0, {num_classes}); got {both}.")
    return seen, unseen


def calibrated_predictions(scores: ArrayLike, seen_classes: ArrayLike, gamma: float) -> np.ndarray:
    """argmax_c (score_c - gamma * [c is seen])."""
    scores = np.array(scores, np.float64)
    scores[:, np.asarray(seen_classes, int)] -= gamma
    return np.argmax(scores, axis=1)


def gzsl_metrics(
    scores: ArrayLike,
    labels: ArrayLike,
    seen_classes: ArrayLike,
    unseen_classes: ArrayLike,
    gamma: float = 0.0,
) -> dict[str, float]:
    """Seen / unseen per-class mean accuracy and their harmonic mean, predicting over all classes.

    `scores` [N, C] cover every class; seen and unseen classes together must be all C columns.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    seen, unseen = _class_split(scores.shape[1], seen_classes, unseen_classes)
    if len(seen) + len(unseen) != scores.shape[1]:
        raise ValueError(
            f"seen ({len(seen)}) and unseen ({len(unseen)}) classes must cover all "
            f"{scores.shape[1]} score columns."
        )
    pred = calibrated_predictions(scores, seen, gamma)
    s = per_class_accuracy(pred, labels, seen)
    u = per_class_accuracy(pred, labels, unseen)
    return {"seen_accuracy": s, "unseen_accuracy": u, "harmonic_mean": harmonic_mean(s, u)}


def choose_calibration(
    val_scores: ArrayLike,
    val_labels: ArrayLike,
    seen_classes: ArrayLike,
    pseudo_unseen_classes: ArrayLike,
    *,
    candidates: ArrayLike | None = None,
) -> float:
    """The gamma that maximises H of seen vs pseudo-unseen classes on seen-class validation data.

    `pseudo_unseen_classes` are seen classes held out of training; `val_labels` must all lie in
    `seen_classes` or `pseudo_unseen_classes`, and only those score columns compete (test-time
    unseen classes never enter). By default every gamma at which some prediction flips is
    considered (midpoints between sorted breakpoints, thinned to quantiles when there are more
    than 4096), so the maximum is exact; ties go to the gamma closest to 0.
    """
    scores, labels = np.asarray(val_scores, np.float64), np.asarray(val_labels)
    seen, unseen = _class_split(scores.shape[1], seen_classes, pseudo_unseen_classes)
    cols = np.concatenate([seen, unseen])
    if not np.all(np.isin(labels, cols)):
        raise ValueError(
            "val_labels contain classes outside seen_classes + pseudo_unseen_classes; choose "
            "gamma on validation images of seen classes only, never on test or unseen classes."
        )
    # Restrict to the competing columns, renumbered 0..k-1 (seen first).
    remap = np.full(scores.shape[1], -1)
    remap[cols] = np.arange(len(cols))
    scores, labels = scores[:, cols], remap[labels]
    seen_r, unseen_r = np.arange(len(seen)), np.arange(len(seen), len(cols))

    if candidates is None:
        gap = np.sort(np.unique(scores[:, seen_r].max(1) - scores[:, unseen_r].max(1)))
        mids = (gap[:-1] + gap[1:]) / 2
        if len(mids) > MAX_CANDIDATES:
            mids = np.quantile(mids, np.linspace(0, 1, MAX_CANDIDATES))
        candidates = np.concatenate([[gap[0] - 1.0], mids, [gap[-1] + 1.0], [0.0]])
    candidates = np.asarray(candidates, np.float64)
    best, best_h = None, -1.0
    for g in candidates[np.argsort(np.abs(candidates), kind="stable")]:
        pred = calibrated_predictions(scores, seen_r, g)
        h = harmonic_mean(
            per_class_accuracy(pred, labels, seen_r), per_class_accuracy(pred, labels, unseen_r)
        )
        if h > best_h:
            best, best_h = float(g), h
    return best
