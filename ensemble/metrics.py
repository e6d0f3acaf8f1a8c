"""Metrics, looked up by name so reports and model selection share one definition."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
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


def bootstrap_samples(
    n_rows: int, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """Row indices of `n_boot` bootstrap resamples; whole groups (patients) are resampled when given.

    Lesions of one patient are correlated, so resampling images understates the spread; resampling
    patients keeps each patient's lesions together, as the ISIC 2020 leaderboard's analyses do.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        return [rng.integers(0, n_rows, n_rows) for _ in range(n_boot)]
    codes, uniques = pd.factorize(pd.Series(groups), use_na_sentinel=False)
    members = [np.flatnonzero(codes == g) for g in range(len(uniques))]
    return [np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]) for _ in range(n_boot)]


def bootstrap_ci(
    metric: Metric,
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric`; resamples without both classes are skipped."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    values = np.array([metric(y_true[i], y_score[i]) for i in bootstrap_samples(len(y_true), groups, n_boot, seed)])
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
