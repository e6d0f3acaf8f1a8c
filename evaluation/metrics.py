"""Metrics, looked up by name so reports and model selection share one definition.

Binary metrics take `(y_true, y_score)`; the ISIC 2024 top-15 metric also needs patient ids and the
multi-class ones a probability matrix. Bootstrap intervals resample patients (lesions of one
patient are correlated); AUC and pAUC are bootstrapped from weighted ROC curves in one vectorised
pass, so 1,000 resamples of a 30,000-image run take seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

Metric = Callable[[np.ndarray, np.ndarray], float]
CurveMetric = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (fpr, tpr) of many ROC curves, one per row -> values


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present (undefined, not 0.5).

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), roc_auc([1, 1], [0.2, 0.3])
    (0.75, nan)
    """
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


ISIC_MIN_TPR = 0.80  # ISIC 2024's pAUC counts the ROC curve above 80% sensitivity


UNDEFINED = "undefined"  # how a metric reads on rows of one class (a fold without a melanoma), where it has no value


def metric_text(value: float | None, digits: int = 3) -> str:
    """A metric for people: its value, `undefined` where it is NaN (one class only), `-` where there is none.

    >>> metric_text(0.91234), metric_text(float("nan")), metric_text(None)
    ('0.912', 'undefined', '-')
    """
    if value is None:
        return "-"
    return UNDEFINED if np.isnan(value) else f"{value:.{digits}f}"


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC: how far a fold's AUC moves by chance alone; NaN
    (undefined) where the AUC is, on rows without a melanoma or without another lesion.

    >>> auc_standard_error(float("nan"), 0, 300)
    nan
    """
    if n_positive < 1 or n_negative < 1 or np.isnan(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc**2) + (n_negative - 1) * (q2 - auc**2)) / (
        n_positive * n_negative
    )
    return float(np.sqrt(max(variance, 0.0)))


def pauc_above_tpr(y_true: np.ndarray, y_score: np.ndarray, min_tpr: float = ISIC_MIN_TPR) -> float:
    """Partial ROC AUC over the region TPR >= `min_tpr` (ISIC 2024 metric; range 0 to 1 - min_tpr).

    Computed as in the ISIC 2024 scoring code: swap the classes and negate the scores, so the TPR
    band becomes an FPR band, take scikit-learn's McClish-standardised partial AUC and undo the
    standardisation.

    >>> round(pauc_above_tpr([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)  # the best possible is 1 - 0.8
    0.1
    """
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    max_fpr = 1.0 - min_tpr
    scaled = roc_auc_score(1 - y_true, -np.asarray(y_score), max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (scaled - 0.5))


def _roc_points(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every achievable (FPR, TPR) operating point, none dropped."""
    fpr, tpr, _ = roc_curve(y_true, y_score, drop_intermediate=False)
    return fpr, tpr


_RATE_TOLERANCE = 1e-9  # 1 - 0.9 is 0.0999...; an FPR of exactly 0.1 must still count as 90% specificity


def sensitivity_at_specificity(y_true: np.ndarray, y_score: np.ndarray, specificity: float) -> float:
    """Highest sensitivity over the thresholds whose specificity is at least `specificity`.

    Only ROC vertices count (thresholds one could actually pick), not points interpolated between them.

    >>> sensitivity_at_specificity(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), 0.5)
    1.0
    """
    if len(np.unique(y_true)) < 2:
        return float("nan")
    fpr, tpr = _roc_points(y_true, y_score)
    return float(tpr[1 - fpr >= specificity - _RATE_TOLERANCE].max())


def specificity_at_sensitivity(y_true: np.ndarray, y_score: np.ndarray, sensitivity: float) -> float:
    """Highest specificity over the thresholds whose sensitivity is at least `sensitivity`."""
    if len(np.unique(y_true)) < 2:
        return float("nan")
    fpr, tpr = _roc_points(y_true, y_score)
    return float((1 - fpr[tpr >= sensitivity - _RATE_TOLERANCE]).max())


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn and the ISIC scorer compute it)."""
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(average_precision_score(y_true, y_score))


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared error of the probabilities: calibration and sharpness in one number."""
    return float(np.mean((np.asarray(y_prob, dtype=float) - np.asarray(y_true, dtype=float)) ** 2))


def calibration_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width probability bins (the last one closed): `n`, `mean_prob`, `observed_rate`; empty bins left out."""
    y_prob = np.asarray(y_prob, dtype=float)
    bins = np.minimum((y_prob * n_bins).astype(int), n_bins - 1)
    grouped = pd.DataFrame({"bin": bins, "prob": y_prob, "y": np.asarray(y_true, dtype=float)}).groupby("bin")
    return pd.DataFrame({"n": grouped.size(), "mean_prob": grouped["prob"].mean(), "observed_rate": grouped["y"].mean()})


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """Gap between predicted and observed melanoma rate, averaged over the bins weighted by size (Guo et al. 2017).

    >>> round(expected_calibration_error(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8])), 3)
    0.15
    """
    bins = calibration_bins(y_true, y_prob, n_bins)
    return float((bins["n"] * (bins["mean_prob"] - bins["observed_rate"]).abs()).sum() / bins["n"].sum())


def top_n_sensitivity(y_true: np.ndarray, y_score: np.ndarray, patient_ids: np.ndarray, n: int = 15) -> float:
    """ISIC 2024 secondary metric: share of each patient's melanomas among the patient's `n` top-scored lesions.

    Averaged over the patients who have a melanoma, as the official script ranks submissions
    (ISIC-Research/Challenge-2024-Metrics); ties keep row order, like its `nlargest`.
    """
    frame = pd.DataFrame({"patient": np.asarray(patient_ids), "y": np.asarray(y_true, dtype=float), "score": y_score})
    in_top = frame.groupby("patient")["score"].rank(method="first", ascending=False) <= n
    per_patient = frame.assign(found=frame["y"] * in_top).groupby("patient")[["found", "y"]].sum()
    with_melanoma = per_patient[per_patient["y"] > 0]
    if with_melanoma.empty:
        return float("nan")
    return float((with_melanoma["found"] / with_melanoma["y"]).mean())


METRICS: dict[str, Metric] = {
    "auc": roc_auc,
    "pauc_80tpr": pauc_above_tpr,
    "sens_at_90spec": partial(sensitivity_at_specificity, specificity=0.90),
    "sens_at_95spec": partial(sensitivity_at_specificity, specificity=0.95),
    "spec_at_90sens": partial(specificity_at_sensitivity, sensitivity=0.90),
    "spec_at_95sens": partial(specificity_at_sensitivity, sensitivity=0.95),
    "average_precision": average_precision,
}
# Only meaningful when the scores are probabilities (not for a rank blend); lower is better.
PROBABILITY_METRICS: dict[str, Metric] = {
    "brier": brier_score,
    "ece": expected_calibration_error,
}


def prior_adjusted_argmax(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """The class maximising p(class | image) / prior(class), per row.

    With `prior` the class distribution a model was fitted to (training frequencies times class
    weights), this is the decision that maximises balanced accuracy for a calibrated model ("logit
    adjustment", Menon et al., ICLR 2021): a model can train on the natural class mix, which ranks
    melanoma best, and still be judged on balanced accuracy. `prior` is (n_classes,) or one row per image.
    """
    return prior_adjusted_probabilities(probs, prior).argmax(axis=1)


def prior_adjusted_probabilities(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """p(class | image) / prior(class), renormalised per row: what the model would say under a uniform class mix.

    Its argmax is `prior_adjusted_argmax`, so a challenge scored on the argmax of submitted
    probabilities (ISIC 2018/2019: balanced accuracy) gets the balanced-accuracy decision.

    >>> prior_adjusted_probabilities(np.array([[0.8, 0.2, 0.0]]), np.array([0.8, 0.2, 0.0])).round(2).tolist()
    [[0.5, 0.5, 0.0]]
    """
    probs = np.asarray(probs, dtype=float)
    prior = np.broadcast_to(np.asarray(prior, dtype=float), probs.shape)
    # a class the model was fitted without (prior 0) has probability 0, and stays at 0
    adjusted = np.divide(probs, prior, out=np.zeros_like(probs), where=prior > 0)
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def multiclass_summary(
    y_class: np.ndarray, probs: np.ndarray, classes: list[str], prior: np.ndarray | None = None
) -> dict[str, object]:
    """Balanced accuracy (mean per-class recall, the ISIC 2018/2019 goal metric), one-vs-rest AUC per class,
    and the confusion matrix (rows: true class, columns: predicted class, both in `classes` order).

    The predicted class is the argmax, or the prior-adjusted argmax when the model's training `prior`
    is given (then `balanced_accuracy_argmax` keeps the plain argmax's figure). Rows whose true class
    is not among `classes` are left out.
    """
    y_class = np.asarray(y_class, dtype=object)
    known = np.isin(y_class, classes)
    y_class, probs = y_class[known], np.asarray(probs, dtype=float)[known]
    names = np.asarray(classes, dtype=object)

    def recall_and_matrix(predicted: np.ndarray) -> tuple[float, np.ndarray]:
        matrix = confusion_matrix(y_class, names[predicted], labels=classes)
        support = matrix.sum(axis=1)
        return float((np.diag(matrix)[support > 0] / support[support > 0]).mean()), matrix

    plain, matrix = recall_and_matrix(probs.argmax(axis=1))
    summary: dict[str, object] = {"decision": "argmax", "balanced_accuracy": plain}
    if prior is not None:
        prior = np.broadcast_to(np.asarray(prior, dtype=float), (len(known), len(classes)))[known]
        adjusted, matrix = recall_and_matrix(prior_adjusted_argmax(probs, prior))
        summary = {"decision": "prior_adjusted", "balanced_accuracy": adjusted, "balanced_accuracy_argmax": plain}
    return {
        **summary,
        "class_auc": {c: roc_auc((y_class == c).astype(int), probs[:, i]) for i, c in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),
    }


def per_fold(metric: Metric, y_true: np.ndarray, y_score: np.ndarray, folds: np.ndarray) -> list[float]:
    """The metric on each fold's rows, in fold order."""
    return [float(metric(y_true[folds == f], y_score[folds == f])) for f in np.unique(folds)]


_BOOT_CHUNK = 100  # resamples drawn and scored at a time: bounded memory on a 33,000-image run


def _resampling_units(n_rows: int, groups: np.ndarray | None) -> np.ndarray:
    """Each row's resampling unit: its group (patient) code, or the row itself."""
    if groups is None:
        return np.arange(n_rows)
    return pd.factorize(pd.Series(groups), use_na_sentinel=False)[0]


def _unit_counts(n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """How often each unit is drawn (with replacement, `n_units` draws) per resample; one row per resample."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        draws = rng.integers(0, n_units, (size, n_units)) + n_units * np.arange(size)[:, None]
        yield np.bincount(draws.ravel(), minlength=size * n_units).reshape(size, n_units)


def bootstrap_weights(
    n_rows: int, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
    """How often each row is drawn in each resample (one row per resample), a chunk of resamples at a time.

    Lesions of one patient are correlated, so resampling images understates the spread; with
    `groups` (patients) whole groups are drawn, keeping each patient's lesions together.
    """
    units = _resampling_units(n_rows, groups)
    for counts in _unit_counts(int(units.max()) + 1, n_boot, seed):
        yield counts[:, units]


def bootstrap_samples(
    n_rows: int, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
) -> list[np.ndarray]:
    """Row indices of `n_boot` bootstrap resamples (whole groups when given): the same resamples as `bootstrap_weights`."""
    rows = np.arange(n_rows)
    return [np.repeat(rows, counts) for chunk in bootstrap_weights(n_rows, groups, n_boot, seed) for counts in chunk]


def weighted_roc_curves(
    y_true: np.ndarray, y_score: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and TPR of the same scores under each row of `weights` (bootstrap counts): one curve per row.

    Tied scores are one threshold, so the trapezoid under a curve is the AUC with ties counted 1/2,
    exactly as on the resampled rows themselves. A resample without both classes is a NaN row.
    """
    scores = np.asarray(y_score, dtype=float)
    order = np.argsort(-scores, kind="stable")
    positive = np.asarray(y_true)[order] == 1
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(order) - 1]
    ordered_weights = np.asarray(weights)[:, order]
    origin = np.zeros((len(ordered_weights), 1))
    seen = np.hstack([origin, np.cumsum(ordered_weights, axis=1, dtype=float)[:, threshold_ends]])
    # Melanomas are few: accumulate their columns only, then read the sum at each threshold.
    positives_seen = np.hstack([origin, np.cumsum(ordered_weights[:, positive], axis=1, dtype=float)])
    tp = positives_seen[:, np.r_[0, np.cumsum(positive)[threshold_ends]]]
    fp = seen - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return fp / fp[:, -1:], tp / tp[:, -1:]


def roc_area_above_tpr(fpr: np.ndarray, tpr: np.ndarray, min_tpr: float = 0.0) -> np.ndarray:
    """Area between each ROC curve (one per row) and the line TPR = `min_tpr`, where the curve is above it.

    `min_tpr` 0 gives the AUC, 0.8 the ISIC 2024 pAUC. The height above the line is linear along a
    segment, so a segment that crosses the line counts only the part above it.
    """
    low, high = tpr[:, :-1] - min_tpr, tpr[:, 1:] - min_tpr
    crosses = (low < 0) & (high > 0)
    share_above = np.where(crosses, high / np.where(crosses, high - low, 1.0), 1.0)
    mean_height_above = (np.clip(low, 0, None) + np.clip(high, 0, None)) / 2
    return (np.diff(fpr, axis=1) * share_above * mean_height_above).sum(axis=1)


# Metrics with a vectorised form over weighted ROC curves: all resamples of a chunk scored at once.
CURVE_METRICS: dict[Metric, CurveMetric] = {
    roc_auc: partial(roc_area_above_tpr, min_tpr=0.0),
    pauc_above_tpr: partial(roc_area_above_tpr, min_tpr=ISIC_MIN_TPR),
}


def bootstrap_values(
    metric: Metric, y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0,
) -> np.ndarray:
    """The metric on each of `n_boot` resamples (NaN where a resample lacks a class); same seed, same resamples."""
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    curve_metric = CURVE_METRICS.get(metric)
    if curve_metric is None:
        return np.array([metric(y_true[i], y_score[i]) for i in bootstrap_samples(len(y_true), groups, n_boot, seed)])
    return bootstrap_curve_values([curve_metric], y_true, y_score, groups, n_boot=n_boot, seed=seed)[0]


def bootstrap_curve_values(
    curve_metrics: list[CurveMetric], y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0,
) -> list[np.ndarray]:
    """Several ROC-curve metrics on the same resamples, each resample's curve built once."""
    chunks = bootstrap_weights(len(y_true), groups, n_boot, seed)
    per_chunk = [[m(*curves) for m in curve_metrics] for curves in (weighted_roc_curves(y_true, y_score, w) for w in chunks)]
    return [np.concatenate(values) for values in zip(*per_chunk)]


def bootstrap_cis(
    metrics: dict[str, Metric], y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of several named metrics on the same resamples (ROC-curve metrics share the curves)."""
    on_curves = {name: CURVE_METRICS[m] for name, m in metrics.items() if m in CURVE_METRICS}
    values = dict(zip(on_curves, bootstrap_curve_values(list(on_curves.values()), y_true, y_score, groups, n_boot=n_boot, seed=seed)))
    others = {name: m for name, m in metrics.items() if name not in on_curves}
    values.update({name: bootstrap_values(m, y_true, y_score, groups, n_boot=n_boot, seed=seed) for name, m in others.items()})
    return {name: _percentile_interval(values[name], level) for name in metrics}


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_ci(
    metric: Metric, y_true: np.ndarray, y_score: np.ndarray, groups: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric`; resamples without both classes are skipped."""
    return bootstrap_cis({"metric": metric}, y_true, y_score, groups, n_boot=n_boot, seed=seed, level=level)["metric"]


@dataclass(frozen=True)
class PairedBootstrap:
    """`metric(A) - metric(B)` on all rows, its percentile interval, and the two-sided bootstrap p-value."""

    difference: float
    ci: tuple[float, float]
    p_value: float


def paired_bootstrap(
    metric: Metric, y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, groups: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> PairedBootstrap:
    """Is A better than B beyond resampling noise? Both are scored on the same resamples, so the
    patient-to-patient variation they share cancels out of the difference.

    p is twice the smaller share of resampled differences on either side of 0, counted with the
    usual +1 so a finite bootstrap never claims p = 0.
    """
    differences = bootstrap_values(metric, y_true, score_a, groups, n_boot=n_boot, seed=seed) - bootstrap_values(
        metric, y_true, score_b, groups, n_boot=n_boot, seed=seed
    )
    differences = differences[np.isfinite(differences)]
    smaller_tail = min(int((differences <= 0).sum()), int((differences >= 0).sum()))
    return PairedBootstrap(
        difference=float(metric(y_true, score_a) - metric(y_true, score_b)),
        ci=_percentile_interval(differences, level),
        p_value=min(1.0, 2 * (smaller_tail + 1) / (len(differences) + 1)),
    )
