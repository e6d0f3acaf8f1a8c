"""Stacker features: metadata and per-patient context, computed without ever reading a label.

Patient context turns the "ugly duckling" sign into numbers: a lesion whose CNN probability stands
out from the same patient's other lesions is suspicious even when its absolute probability is not.
"""

from __future__ import annotations

import pandas as pd

from metadata.dataset import SEXES, SITES

METADATA_FEATURES: tuple[str, ...] = ("age", "sex", "site")


def metadata_features(table: pd.DataFrame) -> pd.DataFrame:
    """Age as a float and sex/site as categoricals with a fixed vocabulary; missing stays missing."""
    return pd.DataFrame(
        {
            "age": table["age"].astype(float),
            "sex": table["sex"].astype(pd.CategoricalDtype(list(SEXES))),
            "site": table["site"].astype(pd.CategoricalDtype(list(SITES))),
        },
        index=table.index,
    )


def patient_context_features(patient_id: pd.Series, scores: pd.DataFrame) -> pd.DataFrame:
    """Per patient: lesion count, and each score's within-patient rank, z-score and gap from the mean.

    `scores` holds one column per model (e.g. `cnn_small`). The rank is a percentile in (0, 1];
    the z-score is missing for patients with a single lesion or identical scores (no spread to
    compare against) rather than an invented 0.
    """
    grouped = scores.groupby(patient_id.to_numpy(), sort=False)
    columns = {"patient_n_lesions": patient_id.map(patient_id.value_counts()).astype(float)}
    means = grouped.transform("mean")
    stds = grouped.transform("std")
    ranks = grouped.rank(pct=True)
    for name in scores.columns:
        columns[f"{name}_patient_rank"] = ranks[name]
        columns[f"{name}_patient_z"] = (scores[name] - means[name]) / stds[name].where(stds[name] > 0)
        columns[f"{name}_patient_diff"] = scores[name] - means[name]
    return pd.DataFrame(columns, index=scores.index)


# Columns that carry the label (or are decided from it); never stacker features, whatever is asked.
DENIED_FEATURES: dict[str, str] = {
    "target": "is the label itself",
    "diagnosis": "is the label in finer classes",
    "benign_malignant": "is the label in words",
    "split": "says whether a label exists, not anything about the lesion",
}


def check_feature_columns(columns: list[str]) -> None:
    """Refuse any denied (label-derived) column, naming it and why."""
    denied = [c for c in columns if c in DENIED_FEATURES or c.startswith("diagnosis")]
    if denied:
        reasons = "; ".join(f"{c} {DENIED_FEATURES.get(c, DENIED_FEATURES['diagnosis'])}" for c in denied)
        raise ValueError(f"refusing label-derived feature(s): {reasons}.")
