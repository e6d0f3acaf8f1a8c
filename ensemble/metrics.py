"""Metrics, looked up by name so reports and model selection share one definition."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

Metric = Callable[[np.ndarray, np.ndarray], float]


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (undefined, not 0.5)."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def pauc_above_tpr(y_true: np.ndarray, y_score: np.ndarray, min_tpr: float = 0.80) -> float:
    """Partial ROC AUC over the region TPR >= `min_tpr` (ISIC 2024 metric; range 0 to 1 - min_tpr).

    Computed as in the ISIC 2024 scoring code: swap the classes and negate the scores, so the TPR
    band becomes an FPR band, take scikit-learn's McClish-standardised partial AUC and undo the
    standardisation.
    """
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    max_fpr = 1.0 - min_tpr
    scaled = roc_auc_score(1 - y_true, -np.asarray(y_score), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


METRICS: dict[str, Metric] = {
    "auc": roc_auc,
    "pauc_80tpr": pauc_above_tpr,
}


def per_fold(metric: Metric, y_true: np.ndarray, y_score: np.ndarray, folds: np.ndarray) -> list[float]:
    """The metric on each fold's rows, in fold order."""
    return [float(metric(y_true[folds == f], y_score[folds == f])) for f in np.unique(folds)]
