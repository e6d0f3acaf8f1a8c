"""What a bundle saw out of fold, so that `predict` can say when a batch looks unlike it.

A stack's promise (its sensitivity at the alert, its calibration) holds for images like the ones
it was validated on. The scoring reference records, from the run, per-image statistics of a
sample of training images (colour and contrast: other cameras, lighting and colour balance move
them), the moments of each CNN's standardised OOF score, and how often each metadata field was
missing. A batch is compared statistic by statistic: its mean is flagged when it lies further from
the reference mean than both `SHIFT_Z` standard errors and `SHIFT_EFFECT` reference SDs (a test
that grows strict with the batch, floored by a difference that matters), and only for batches of
at least `MIN_SHIFT_IMAGES` images.

>>> reference = {"brightness": {"mean": 120.0, "std": 20.0}}
>>> shift_warnings(reference, {"brightness": np.full(50, 160.0)})
['brightness: batch mean 160 vs 120 (SD 20) on the training images']
>>> shift_warnings(reference, {"brightness": np.full(50, 122.0)})
[]
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd

MIN_SHIFT_IMAGES = 20
SHIFT_Z = 4.0
SHIFT_EFFECT = 0.5
REFERENCE_SAMPLE = 1000  # training images whose statistics make the reference (seeded sample)
MISSING_RATE_SHIFT = 0.25  # a field missing this much more often than in training is worth a word
ALERT_RATE_SHIFT = 0.1


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per image of a decoded batch (N, H, W, 3, values 0-255): mean red, green, blue, brightness, contrast."""
    images = np.asarray(images, dtype=np.float32)
    grey = images.mean(axis=-1)
    return {
        "red": images[..., 0].mean(axis=(1, 2)),
        "green": images[..., 1].mean(axis=(1, 2)),
        "blue": images[..., 2].mean(axis=(1, 2)),
        "brightness": grey.mean(axis=(1, 2)),
        "contrast": grey.std(axis=(1, 2)),
    }


def concat_statistics(batches: Iterable[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-image statistics of several batches, joined."""
    batches = list(batches)
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]} if batches else {}


def moments(values: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and SD of each statistic (the reference a batch is compared with)."""
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0} for name, v in values.items()}


def shift_warnings(
    reference: dict[str, dict[str, float]], batch: dict[str, np.ndarray], where: str = "the training images"
) -> list[str]:
    """One line per statistic whose batch mean is far from the reference (see the module doc); `where`
    names what the reference was measured on."""
    warnings = []
    for name, values in batch.items():
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        if name not in reference or len(values) < MIN_SHIFT_IMAGES:
            continue
        mean, std = reference[name]["mean"], max(reference[name]["std"], 1e-9)
        gap = abs(values.mean() - mean)
        if gap > max(SHIFT_Z * std / np.sqrt(len(values)), SHIFT_EFFECT * std):
            warnings.append(f"{name}: batch mean {values.mean():.3g} vs {mean:.3g} (SD {std:.2g}) on {where}")
    return warnings


def missing_rate_warnings(training_rates: dict[str, float], batch: pd.DataFrame) -> list[str]:
    """Fields the batch lacks far more often than the training rows did (scored by other operating points)."""
    if len(batch) < MIN_SHIFT_IMAGES:
        return []
    rates = batch.isna().mean()
    more = [f for f, rate in rates.items() if f in training_rates and rate - training_rates[f] > MISSING_RATE_SHIFT]
    if not more:
        return []
    gaps = ", ".join(f"{f} {rates[f]:.0%} (training {training_rates[f]:.0%})" for f in more)
    return [f"metadata missing far more often than in training: {gaps}; those lesions are judged by the operating point of their missingness pattern"]


def alert_rate_warning(alerts: np.ndarray, expected_rate: np.ndarray) -> list[str]:
    """The batch's alert rate against the OOF alert rates of its lesions' operating points."""
    alerts, expected_rate = np.asarray(alerts, dtype=float), np.asarray(expected_rate, dtype=float)
    n = len(alerts)
    if n < MIN_SHIFT_IMAGES:
        return []
    observed, expected = alerts.mean(), expected_rate.mean()
    standard_error = np.sqrt(np.sum(expected_rate * (1 - expected_rate))) / n
    if abs(observed - expected) > max(SHIFT_Z * standard_error, ALERT_RATE_SHIFT):
        return [f"alert rate {observed:.0%} vs {expected:.0%} expected from the out-of-fold alert rates of these lesions' operating points"]
    return []
