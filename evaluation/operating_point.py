"""The alert threshold of an exported model: chosen on out-of-fold predictions for a target sensitivity.

A screening tool is judged by the melanomas it misses, so the threshold is the highest one that
still flags at least the target share of the OOF melanomas; what that costs is the OOF specificity
at that threshold, with a patient-level bootstrap interval (lesions of one patient are correlated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np

from errors import DataError, OptionError
from evaluation.metrics import Metric, bootstrap_ci


def alerts(y_score: np.ndarray, threshold: float) -> np.ndarray:
    """The alert rule of the operating point: a probability at or above the threshold."""
    return np.asarray(y_score) >= threshold


def sensitivity_at(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> float:
    """Share of melanomas alerted; NaN without melanomas."""
    positive = np.asarray(y_true) == 1
    return float(alerts(y_score, threshold)[positive].mean()) if positive.any() else float("nan")


def specificity_at(y_true: np.ndarray, y_score: np.ndarray, threshold: float) -> float:
    """Share of non-melanomas not alerted; NaN without non-melanomas."""
    negative = np.asarray(y_true) == 0
    return float((~alerts(y_score, threshold))[negative].mean()) if negative.any() else float("nan")


def threshold_for_sensitivity(y_true: np.ndarray, y_score: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose alerts include at least `sensitivity` of the melanomas.

    That is the k-th highest melanoma score, k = ceil(sensitivity * melanomas): every higher
    threshold misses one more melanoma than the target allows.
    """
    if not 0 < sensitivity <= 1:
        raise OptionError(f"--sensitivity {sensitivity}: give a share between 0 (excluded) and 1, e.g. 0.95.")
    positive_scores = np.sort(np.asarray(y_score, dtype=float)[np.asarray(y_true) == 1])[::-1]
    if not len(positive_scores):
        raise DataError("no melanoma among the out-of-fold predictions; a sensitivity cannot be targeted.")
    needed = math.ceil(round(sensitivity * len(positive_scores), 9))  # round: 0.95 * 20 is 19.000000000000004
    return float(positive_scores[needed - 1])


@dataclass(frozen=True)
class OperatingPoint:
    """The alert threshold and what it achieved out of fold (intervals: patient bootstrap percentiles)."""

    target_sensitivity: float
    threshold: float
    oof_sensitivity: float
    oof_sensitivity_ci: tuple[float, float]
    oof_specificity: float
    oof_specificity_ci: tuple[float, float]
    ci_level: float
    n_boot: int
    n_images: int
    n_melanoma: int
    n_patients: int
    oof_alert_rate: float  # share of the OOF images alerted (what a batch like the training data should see)
    # what the figures were measured on: the run's out-of-fold predictions, or a site's own lesions (`recalibrate`)
    measured_on: str = "out-of-fold predictions"

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> OperatingPoint:
        """From `to_json` output read back from JSON (intervals come back as lists)."""
        intervals = {key: tuple(data[key]) for key in ("oof_sensitivity_ci", "oof_specificity_ci")}
        return cls(**{**data, **intervals})


def choose_operating_point(
    y_true: np.ndarray,
    y_score: np.ndarray,
    patients: np.ndarray,
    sensitivity: float = 0.95,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    measured_on: str = "out-of-fold predictions",
) -> OperatingPoint:
    """Threshold for the target sensitivity on OOF predictions, with its OOF sensitivity and specificity."""
    y_true, y_score = np.asarray(y_true, dtype=int), np.asarray(y_score, dtype=float)
    threshold = threshold_for_sensitivity(y_true, y_score, sensitivity)

    def interval(metric: Metric) -> tuple[float, float]:
        return bootstrap_ci(metric, y_true, y_score, groups=np.asarray(patients), n_boot=n_boot, seed=seed, level=level)

    return OperatingPoint(
        target_sensitivity=sensitivity,
        threshold=threshold,
        oof_sensitivity=sensitivity_at(y_true, y_score, threshold),
        oof_sensitivity_ci=interval(partial(sensitivity_at, threshold=threshold)),
        oof_specificity=specificity_at(y_true, y_score, threshold),
        oof_specificity_ci=interval(partial(specificity_at, threshold=threshold)),
        ci_level=level,
        n_boot=n_boot,
        n_images=len(y_true),
        n_melanoma=int(y_true.sum()),
        n_patients=int(len(np.unique(np.asarray(patients)))),
        oof_alert_rate=float(alerts(y_score, threshold).mean()),
        measured_on=measured_on,
    )
