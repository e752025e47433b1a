"""Proxy A-distance between source and target features (a diagnostic, not a loss).

Ben-David et al., "Analysis of Representations for Domain Adaptation", NeurIPS 2006: train a
domain classifier on half of the (frozen) source+target features, measure its error ``eps`` on
the other half, and report ``d_A = 2 (1 - 2 eps)``: about 2 for separable domains, about 0 for
indistinguishable ones (slightly negative when the held-out error exceeds 1/2 by chance).

The split is stratified by domain and seeded; features are standardised with the training
half's statistics; the classifier is scikit-learn's logistic regression or a small MLP.
Everything is float64 numpy and deterministic for a given seed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLASSIFIERS = ("logistic", "mlp")


def proxy_a_distance(
    features_s: Any,
    features_t: Any,
    *,
    classifier: str = "logistic",
    seed: int = 0,
    mlp_hidden: int = 64,
    max_iter: int = 1000,
) -> dict[str, float]:
    """``{"a_distance": 2 (1 - 2 eps), "error": eps}`` for [n_s, D] and [n_t, D] features."""
    # scikit-learn is imported here, not at the top: it is most of the import time of the
    # trainer (evaluators import this module), and only this evaluator needs it.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}.")
    xs = np.asarray(features_s, np.float64).reshape(len(features_s), -1)
    xt = np.asarray(features_t, np.float64).reshape(len(features_t), -1)
    if xs.shape[1] != xt.shape[1]:
        raise ValueError(f"source and target feature widths differ: {xs.shape} vs {xt.shape}.")
    if min(len(xs), len(xt)) < 2:
        raise ValueError("the proxy A-distance needs at least 2 examples per domain.")
    x = np.concatenate([xs, xt])
    y = np.concatenate([np.ones(len(xs), np.int64), np.zeros(len(xt), np.int64)])
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.5, random_state=seed, stratify=y, shuffle=True
    )
    scaler = StandardScaler().fit(x_tr)
    if classifier == "logistic":
        clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    else:
        clf = MLPClassifier(hidden_layer_sizes=(mlp_hidden,), max_iter=max_iter, random_state=seed)
    # One BLAS thread: the solver's products are small ([n, D] by [D]), and a second thread only
    # waits for work, spinning against the cores the trainer (or a table's other jobs) uses.
    with threadpool_limits(1, user_api="blas"):
        clf.fit(scaler.transform(x_tr), y_tr)
        error = float(np.mean(clf.predict(scaler.transform(x_te)) != y_te))
    return {"a_distance": 2.0 * (1.0 - 2.0 * error), "error": error}
