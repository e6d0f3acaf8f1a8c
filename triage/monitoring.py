"""How the alert performs on the clinic's own patients, next to what the bundle promised.

Per bundle version and operating point (the missingness pattern whose threshold judged a lesion):
the lesions scored and the alert rate, and on the lesions whose outcome is known, the observed
sensitivity, specificity and PPV of the alert with patient-bootstrap intervals. A promise outside the
observed interval is flagged in plain words: the sensitivity the bundle promised (out of fold), and
the alert rate it expected. Beside it, the batch-shift statistics `predict` computes (image colour
and contrast, CNN scores, missing metadata) over a rolling window of the latest uploads.

The figures are pure functions of a table of scored lesions (`operating_point_figures`), so they can
be checked by hand:

>>> rows = pd.DataFrame({"patient_id": list("abcdefgh"), "alert": [1, 1, 1, 0, 1, 0, 0, 0],
...                      "target": [1, 1, 0, 0, np.nan, 0, 0, 1]})
>>> figures = operating_point_figures(rows, promised=None, n_boot=50, seed=0)
>>> figures["sensitivity"]["value"], figures["specificity"]["value"], figures["ppv"]["value"], figures["alert_rate"]["value"]
(0.6666666666666666, 0.75, 0.6666666666666666, 0.5)
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd

from evaluation.metrics import bootstrap_ci
from evaluation.operating_point import OperatingPoint, sensitivity_at, specificity_at

SENSITIVITY_FLAG = "sensitivity below its promised interval"
SENSITIVITY_ABOVE = "sensitivity above its promised interval"
ALERT_RATE_FLAG = "alert rate above the promised rate"
ALERT_RATE_BELOW = "alert rate below the promised rate"
CI_LEVEL = 0.95


def _ppv(y_true: np.ndarray, alert: np.ndarray) -> float:
    """The share of alerted lesions that are melanomas; NaN without alerts."""
    alerted = np.asarray(alert) >= 0.5
    return float(np.asarray(y_true)[alerted].mean()) if alerted.any() else float("nan")


def _alert_rate(_: np.ndarray, alert: np.ndarray) -> float:
    return float(np.mean(np.asarray(alert) >= 0.5)) if len(alert) else float("nan")


def _interval(metric, y: np.ndarray, alert: np.ndarray, patients: np.ndarray, *, n_boot: int, seed: int) -> dict[str, float | None]:  # noqa: ANN001
    value = metric(y, alert)
    if len(y) == 0 or np.isnan(value):
        return {"value": None, "low": None, "high": None}
    low, high = bootstrap_ci(metric, y, alert, patients, n_boot=n_boot, seed=seed, level=CI_LEVEL)
    return {"value": float(value), "low": None if np.isnan(low) else float(low), "high": None if np.isnan(high) else float(high)}


def _outside(interval: dict[str, float | None], promised: float) -> str | None:
    """"below" or "above" when `promised` lies outside the observed interval, else None."""
    if interval["low"] is None or interval["high"] is None:
        return None
    return "below" if interval["high"] < promised else "above" if interval["low"] > promised else None


def operating_point_figures(rows: pd.DataFrame, *, promised: OperatingPoint | None, n_boot: int = 1000, seed: int = 0) -> dict[str, object]:
    """The figures of one operating point's lesions (`patient_id`, `alert` 0/1, `target`: 1 melanoma,
    0 not, NaN unknown): observed alert rate, sensitivity, specificity and PPV with patient-bootstrap
    intervals, the promise beside them, and the flags."""
    alert, patients = rows["alert"].to_numpy(float), rows["patient_id"].to_numpy()
    known = rows["target"].notna().to_numpy()
    y = rows["target"].to_numpy(float)[known]
    interval = partial(_interval, n_boot=n_boot, seed=seed)
    figures: dict[str, object] = {
        "lesions_scored": int(len(rows)),
        "alert_rate": interval(_alert_rate, np.zeros(len(rows)), alert, patients),
        "lesions_with_outcome": int(known.sum()),
        "melanomas": int(y.sum()),
        "sensitivity": interval(partial(sensitivity_at, threshold=0.5), y, alert[known], patients[known]),
        "specificity": interval(partial(specificity_at, threshold=0.5), y, alert[known], patients[known]),
        "ppv": interval(_ppv, y, alert[known], patients[known]),
    }
    flags = []
    if promised is not None:
        figures |= {"promised_sensitivity": promised.oof_sensitivity, "promised_sensitivity_ci": list(promised.oof_sensitivity_ci),
                    "promised_specificity": promised.oof_specificity, "promised_alert_rate": promised.oof_alert_rate, "threshold": promised.threshold}
        side = _outside(figures["sensitivity"], promised.oof_sensitivity)
        flags += [SENSITIVITY_FLAG if side == "below" else SENSITIVITY_ABOVE] if side else []
        side = _outside(figures["alert_rate"], promised.oof_alert_rate)
        flags += [ALERT_RATE_FLAG if side == "above" else ALERT_RATE_BELOW] if side else []
    figures["flags"] = flags
    return figures


def bundle_figures(scored: pd.DataFrame, points: dict[str, OperatingPoint], *, n_boot: int = 1000, seed: int = 0) -> list[dict[str, object]]:
    """`operating_point_figures` of every operating point in `scored` (one bundle's lesions, each its
    latest score under that bundle: `operating_point`, `patient_id`, `alert`, `target`)."""
    return [
        {"operating_point": name, **operating_point_figures(rows, promised=points.get(name), n_boot=n_boot, seed=seed)}
        for name, rows in scored.groupby("operating_point", sort=True)
    ]
