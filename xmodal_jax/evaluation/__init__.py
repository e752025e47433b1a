"""Evaluation metrics: zero-shot and generalised zero-shot classification, retrieval recall."""

from xmodal_jax.evaluation.retrieval import retrieval_metrics, retrieval_ranks
from xmodal_jax.evaluation.zeroshot import (
    DEFAULT_TEMPLATES,
    accuracy,
    build_classifier,
    calibrated_predictions,
    choose_calibration,
    gzsl_metrics,
    harmonic_mean,
    per_class_accuracy,
    zeroshot_logits,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "accuracy",
    "build_classifier",
    "calibrated_predictions",
    "choose_calibration",
    "gzsl_metrics",
    "harmonic_mean",
    "per_class_accuracy",
    "retrieval_metrics",
    "retrieval_ranks",
    "zeroshot_logits",
]
