"""`recalibrate`: re-choose each operating point's calibration and alert threshold on a site's own lesions
with known outcomes, and write the result as a new bundle version.

A bundle's promise was measured out of fold on the training data; a clinic whose cameras or patients
differ gets another alert rate, and another sensitivity. With enough of its own outcomes, each
operating point (missingness pattern) gets a Platt calibration fitted on the site's lesions (composed
onto the bundle's, so a probability still means what it says) and the threshold that alerts the target
share of the site's melanomas, with patient-bootstrap intervals. A point with fewer than
`min_melanomas` melanomas (or benign lesions) keeps the bundle's and is named with how many more it
needs; with none to recalibrate, it refuses rather than promise from too few.

The site table is pure data (`patient_id`, `operating_point`, `melanoma_probability` as the bundle
gave it, `target`), from the service's database or from `predict`'s predictions.csv with a `target`
column added:

>>> from evaluation.operating_point import choose_operating_point
>>> rng = np.random.default_rng(0)
>>> target = (rng.random(400) < 0.3).astype(int)
>>> site = pd.DataFrame({"patient_id": [f"p{i}" for i in range(400)], "operating_point": "complete",
...                      "melanoma_probability": np.clip(0.05 + 0.5 * target * rng.random(400) + 0.2 * rng.random(400), 0.01, 0.99), "target": target})
>>> result = site_recalibration(site, ["complete"], sensitivity=0.95, min_melanomas=20, n_boot=50, seed=0)
>>> point = result.points["complete"]
>>> bool(point.oof_sensitivity >= 0.95), point.measured_on
(True, 'site: 400 lesions, 105 melanomas')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.bundle import Bundle, write_bundle_version
from errors import DataError
from evaluation.operating_point import OperatingPoint, choose_operating_point
from fusion.missingness import PlattCalibration

SITE_COLUMNS = ("patient_id", "operating_point", "melanoma_probability", "target")
MIN_MELANOMAS = 20  # per operating point: fewer, and the threshold's promise would rest on a handful of lesions


@dataclass(frozen=True)
class SiteRecalibration:
    """What a site's outcomes changed: calibrations and points of the sources with enough of them, and why the others kept theirs."""

    calibrations: dict[str, PlattCalibration]
    points: dict[str, OperatingPoint]
    kept: dict[str, str]  # operating point -> why it keeps the bundle's
    n_lesions: int
    n_melanomas: int


def site_table(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """The site's lesions with known outcomes, checked: every column present, targets 0 or 1, probabilities in [0, 1]."""
    missing = [c for c in SITE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column(s) {missing}; give predict's predictions.csv (patient_id, operating_point, melanoma_probability) with a target column (1 melanoma, 0 not).")
    known = frame[frame["target"].notna()].copy()
    bad = ~known["target"].isin([0, 1]) | ~known["melanoma_probability"].between(0, 1)
    if bad.any():
        raise DataError(f"{source}: row {int(np.flatnonzero(bad.to_numpy())[0]) + 2} has a target that is not 0 or 1 or a probability outside [0, 1].")
    return known.assign(target=known["target"].astype(int), patient_id=known["patient_id"].astype(str))


def site_recalibration(
    site: pd.DataFrame, sources: list[str], *, sensitivity: float = 0.95, min_melanomas: int = MIN_MELANOMAS, n_boot: int = 1000, seed: int = 0,
) -> SiteRecalibration:
    """Each source's site calibration and threshold where it has at least `min_melanomas` melanomas and as many benign lesions."""
    calibrations, points, kept = {}, {}, {}
    for source in sources:
        rows = site[site["operating_point"] == source]
        melanomas, benign = int(rows["target"].sum()), int((rows["target"] == 0).sum())
        if melanomas < min_melanomas or benign < min_melanomas:
            kept[source] = f"{melanomas} melanoma(s) and {benign} benign lesion(s) with outcomes: {max(min_melanomas - melanomas, 0)} more melanoma(s) and {max(min_melanomas - benign, 0)} more benign needed"
            continue
        calibration = PlattCalibration.fit(rows["melanoma_probability"].to_numpy(), rows["target"].to_numpy())
        probability = calibration.apply(rows["melanoma_probability"].to_numpy())
        calibrations[source] = calibration
        points[source] = choose_operating_point(
            rows["target"], probability, rows["patient_id"], sensitivity, n_boot=n_boot, seed=seed, measured_on=f"site: {len(rows)} lesions, {melanomas} melanomas",
        )
    if not points:
        raise DataError("too few outcomes to recalibrate any operating point: " + "; ".join(f"{name}: {why}" for name, why in kept.items()))
    return SiteRecalibration(calibrations, points, kept, len(site), int(site["target"].sum()))


def recalibrate_bundle(
    bundle: Bundle, site: pd.DataFrame, out: Path, *, source: str, sensitivity: float = 0.95, min_melanomas: int = MIN_MELANOMAS, n_boot: int = 1000, seed: int = 0,
) -> SiteRecalibration:
    """Write `out`: the bundle with its stack model recalibrated on the site's lesions (`site_recalibration`),
    a new version whose manifest records what it was recalibrated on and from which bundle."""
    table = site_table(site, source)
    result = site_recalibration(table, sorted(bundle.operating_points), sensitivity=sensitivity, min_melanomas=min_melanomas, n_boot=n_boot, seed=seed)
    record = {
        "recalibrated_from": bundle.manifest["created"], "source": source, "sensitivity": sensitivity, "lesions": result.n_lesions,
        "melanomas": result.n_melanomas, "recalibrated": sorted(result.points), "kept": result.kept,
    }
    write_bundle_version(bundle, bundle.stack.recalibrated(result.calibrations, result.points), Path(out), recalibration=json.loads(json.dumps(record)))
    return result
