"""`validate`: score a labelled set the run never saw with a bundle, next to what the bundle promised.

The bundle promises, per operating point, an out-of-fold sensitivity (with its patient-bootstrap
interval) at its alert threshold. On new data that promise holds only if the data resemble the
training data; this measures it: melanoma AUC (stack and the CNNs alone), sensitivity and
specificity at each operating point the lesions were judged by, calibration, alert rate, with
patient-bootstrap intervals, and a warning for every operating point whose sensitivity falls
outside its promised interval.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.outputs import stack_column
from ensemble.bundle import Bundle
from ensemble.predict import Advance, score_patients
from errors import DataError, OptionError
from evaluation.metrics import Metric, bootstrap_ci, expected_calibration_error, roc_auc
from evaluation.operating_point import sensitivity_at, specificity_at
from fusion.missingness import each_lesion_alone, without_metadata
from rundir.io import write_json, write_text


def _without_metadata(rows: pd.DataFrame) -> pd.DataFrame:
    """As `predict --images` without a metadata CSV scores them: no age, sex, site or further metadata
    columns, each image its own patient (a clinic uploading photos without a form)."""
    return each_lesion_alone(without_metadata(rows))


# --metadata-mode: how the labelled rows reach the bundle.
METADATA_MODES: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {"as-given": lambda rows: rows, "none": _without_metadata}


def validation_rows(rows: pd.DataFrame, metadata_mode: str) -> tuple[pd.DataFrame, int]:
    """The labelled rows to score, as `metadata_mode` has them (`METADATA_MODES`), and how many unlabelled ones were left out."""
    if metadata_mode not in METADATA_MODES:
        raise OptionError(f"--metadata-mode {metadata_mode!r}: choose one of {tuple(METADATA_MODES)}.")
    labelled = rows["target"].notna()
    if not labelled.any():
        raise DataError("no row of this data has a melanoma label; `validate` needs a labelled set (use `predict` to score it).")
    return METADATA_MODES[metadata_mode](rows[labelled].reset_index(drop=True)), int((~labelled).sum())


@dataclass(frozen=True)
class Interval:
    """A statistic on the validation rows and its patient-bootstrap interval."""

    value: float
    ci: tuple[float, float]


def _estimate(metric: Metric, y_true: np.ndarray, y_score: np.ndarray, patients: np.ndarray, *, n_boot: int, seed: int) -> Interval:
    value = metric(y_true, y_score)
    return Interval(float(value), bootstrap_ci(metric, y_true, y_score, groups=patients, n_boot=n_boot, seed=seed))


def operating_point_rows(bundle: Bundle, scored: pd.DataFrame, n_boot: int, seed: int) -> list[dict[str, object]]:
    """Per operating point used: what it promised on OOF and what it achieved on these rows."""
    entries = []
    for name, rows in scored.groupby("operating_point", sort=True):
        point = bundle.operating_points[name]
        y, alert, patients = rows["target"].to_numpy(int), rows["alert"].to_numpy(float), rows["patient_id"].to_numpy()
        has_both = 0 < y.sum() < len(y)
        sensitivity = _estimate(partial(sensitivity_at, threshold=0.5), y, alert, patients, n_boot=n_boot, seed=seed) if y.any() else None
        low, high = point.oof_sensitivity_ci
        entries.append(
            {
                "pattern": name,
                "threshold": point.threshold,
                "target_sensitivity": point.target_sensitivity,
                "promised_sensitivity": point.oof_sensitivity,
                "promised_sensitivity_ci": [low, high],
                "sensitivity": None if sensitivity is None else sensitivity.value,
                "sensitivity_ci": None if sensitivity is None else list(sensitivity.ci),
                "promised_specificity": point.oof_specificity,
                "specificity": specificity_at(y, alert, 0.5) if (y == 0).any() else None,
                "alert_rate": float(alert.mean()),
                "promised_alert_rate": point.oof_alert_rate,
                "n_images": int(len(rows)),
                "n_melanoma": int(y.sum()),
                "auc": roc_auc(y, rows["melanoma_probability"].to_numpy()) if has_both else None,
                "within_promise": None if sensitivity is None else bool(low <= sensitivity.value <= high),
            }
        )
    return entries


def validation_warnings(points: list[dict[str, object]]) -> list[str]:
    """A line for each operating point whose sensitivity fell outside its promised interval."""
    return [
        f"operating point {p['pattern']}: sensitivity {p['sensitivity']:.3f} on {p['n_melanoma']} melanoma(s) is "
        f"{'below' if p['sensitivity'] < p['promised_sensitivity_ci'][0] else 'above'} the promised "
        f"{p['promised_sensitivity']:.3f} [{p['promised_sensitivity_ci'][0]:.3f}, {p['promised_sensitivity_ci'][1]:.3f}]"
        for p in points
        if p["within_promise"] is False
    ]


def validate_bundle(
    bundle: Bundle, rows: pd.DataFrame, *, batch_size: int, advance: Advance, n_boot: int = 1000, seed: int = 0
) -> dict[str, object]:
    """Score labelled `rows` with the bundle; the validation report as a JSON-ready dict."""
    scored_patients = score_patients(bundle, rows, batch_size=batch_size, advance=advance)
    labels = rows.set_index("image_id")["target"].astype(int)
    scored = scored_patients.predictions.assign(target=lambda f: labels.reindex(f["image_id"]).to_numpy())
    y, probability = scored["target"].to_numpy(int), scored["melanoma_probability"].to_numpy()
    patients, alert = scored["patient_id"].to_numpy(), scored["alert"].to_numpy(float)
    if not 0 < y.sum() < len(y):
        raise DataError(f"the labelled rows hold {int(y.sum())} melanoma(s) in {len(y)} images; an AUC needs both classes.")
    cnn_scores = scored_patients.cnn_scores.reindex(scored["image_id"])
    cnn_only = cnn_scores.mean(axis=1).to_numpy()
    auc = _estimate(roc_auc, y, probability, patients, n_boot=n_boot, seed=seed)
    points = operating_point_rows(bundle, scored, n_boot, seed)
    sensitivity = _estimate(partial(sensitivity_at, threshold=0.5), y, alert, patients, n_boot=n_boot, seed=seed)
    promised = scored.loc[y == 1, "operating_point"].map({n: p.oof_sensitivity for n, p in bundle.operating_points.items()})
    return {
        "bundle": str(bundle.path.resolve()),
        "n_images": int(len(y)),
        "n_melanoma": int(y.sum()),
        "n_patients": int(len(np.unique(patients))),
        "mel_auc": auc.value,
        "mel_auc_ci": list(auc.ci),
        "mel_auc_cnn_only": roc_auc(y, cnn_only),
        "mel_auc_per_cnn": {m.name: roc_auc(y, cnn_scores[stack_column(m.name)].to_numpy()) for m in bundle.cnns},  # which member travels
        "bundle_oof_auc": bundle.manifest.get("stack_oof_auc"),
        "ece": expected_calibration_error(y, probability),
        "alert_rate": float(alert.mean()),
        "promised_sensitivity": float(promised.mean()),
        "sensitivity_at_alert": sensitivity.value,
        "sensitivity_at_alert_ci": list(sensitivity.ci),
        "specificity_at_alert": specificity_at(y, alert, 0.5),
        "operating_points": points,
        "warnings": validation_warnings(points),
        "shift_warnings": scored_patients.shift_warnings,
        "n_boot": n_boot,
    }


def render_validation(report: dict[str, object]) -> str:
    """validation.md: the headline figures, one row per operating point, the warnings."""
    def num(value: object) -> str:
        return "-" if value is None else f"{value:.3f}"

    def ci(values: object) -> str:
        return "-" if values is None else f"[{values[0]:.3f}, {values[1]:.3f}]"

    lines = [
        "# External validation of a bundle",
        "",
        f"Bundle `{report['bundle']}`: {report['n_images']} images, {report['n_melanoma']} melanomas, {report['n_patients']} patients.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| melanoma AUC (stack) | {num(report['mel_auc'])} {ci(report['mel_auc_ci'])} |",
        f"| melanoma AUC (the CNNs alone) | {num(report['mel_auc_cnn_only'])} |",
        *(f"| melanoma AUC (CNN `{name}`) | {num(auc)} |" for name, auc in report["mel_auc_per_cnn"].items()),
        f"| the bundle's own OOF AUC | {num(report['bundle_oof_auc'])} |",
        f"| sensitivity at the alert | {num(report['sensitivity_at_alert'])} {ci(report['sensitivity_at_alert_ci'])} (promised {num(report['promised_sensitivity'])}) |",
        f"| specificity at the alert | {num(report['specificity_at_alert'])} |",
        f"| alert rate | {num(report['alert_rate'])} |",
        f"| ECE | {num(report['ece'])} |",
        "",
        "| operating point | threshold | promised sensitivity [OOF CI] | sensitivity [CI] | promised specificity | specificity | alert rate (OOF) | images | melanomas |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *(
            f"| {p['pattern']} | {p['threshold']:.4f} | {num(p['promised_sensitivity'])} {ci(p['promised_sensitivity_ci'])} | "
            f"{num(p['sensitivity'])} {ci(p['sensitivity_ci'])} | {num(p['promised_specificity'])} | {num(p['specificity'])} | "
            f"{num(p['alert_rate'])} ({num(p['promised_alert_rate'])}) | {p['n_images']} | {p['n_melanoma']} |"
            for p in report["operating_points"]
        ),
        "",
        "Intervals: 95% patient bootstrap. Each lesion is judged by the operating point of its missingness pattern.",
        "",
        *(f"- **warning:** {w}" for w in [*report["warnings"], *report["shift_warnings"]]),
    ]
    return "\n".join(lines) + "\n"


def write_validation(report: dict[str, object], out: Path) -> None:
    """OUT/validation.json and OUT/validation.md."""
    write_json(report, Path(out) / "validation.json")
    write_text(render_validation(report), Path(out) / "validation.md")
