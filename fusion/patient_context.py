"""Stacker features: metadata and per-patient context, computed without ever reading a label.

Patient context turns the "ugly duckling" sign into numbers: a lesion whose CNN probability stands
out from the same patient's other lesions is suspicious even when its absolute probability is not.
"""

from __future__ import annotations

import pandas as pd

from errors import DataError
from metadata.schema import CANONICAL_COLUMNS, SEXES, SITES

RUN_COLUMNS: tuple[str, ...] = ("fold",)  # bookkeeping a run adds to the table; never a feature


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


def patient_metadata_context(table: pd.DataFrame) -> pd.DataFrame:
    """Per patient, from metadata alone: how many sites, this site's share, and the age within the patient.

    ISIC ages are per image, so a lesion photographed at a later visit has an age above the
    patient's first one; a lesion on a site where the patient has few others stands apart.
    """
    patient = table["patient_id"].fillna(table["image_id"]).to_numpy()
    site = table["site"].astype("string").fillna("missing")
    age = table["age"].astype(float)
    by_patient = age.groupby(patient)
    n_lesions = site.groupby(patient).transform("size")
    return pd.DataFrame(
        {
            "patient_n_sites": site.groupby(patient).transform("nunique").astype(float),
            "patient_site_share": site.groupby([patient, site.to_numpy()]).transform("size") / n_lesions,
            "patient_age_min": by_patient.transform("min"),
            "age_above_patient_min": age - by_patient.transform("min"),
            "patient_age_span": by_patient.transform("max") - by_patient.transform("min"),
        },
        index=table.index,
    )


CONTEXT_STATISTICS = ("rank", "z", "diff")


def patient_context_features(
    patient_id: pd.Series, scores: pd.DataFrame, statistics: tuple[str, ...] = CONTEXT_STATISTICS, count: bool = True
) -> pd.DataFrame:
    """Per patient: lesion count, and each score's within-patient rank, z-score and gap from the mean.

    `scores` holds one column per model (e.g. `cnn_small`) or per image feature; `statistics` picks
    among rank, z and diff, `count` whether to add `patient_n_lesions`. The rank is a percentile in
    (0, 1]; the z-score is missing for patients with a single lesion or identical scores (no spread
    to compare against) rather than an invented 0.

    >>> context = patient_context_features(pd.Series(["p1", "p1", "p1", "p2"]), pd.DataFrame({"cnn_small": [0.1, 0.2, 0.9, 0.5]}))
    >>> context["cnn_small_patient_rank"].round(2).tolist(), context["cnn_small_patient_z"].round(2).tolist()
    ([0.33, 0.67, 1.0, 1.0], [-0.69, -0.46, 1.15, nan])
    """
    grouped = scores.groupby(patient_id.to_numpy(), sort=False)
    columns = {"patient_n_lesions": patient_id.map(patient_id.value_counts()).astype(float)} if count else {}
    means = grouped.transform("mean")
    stds = grouped.transform("std")
    ranks = grouped.rank(pct=True)
    computed = {
        "rank": lambda name: ranks[name],
        "z": lambda name: (scores[name] - means[name]) / stds[name].where(stds[name] > 0),
        "diff": lambda name: scores[name] - means[name],
    }
    for name in scores.columns:
        for statistic in statistics:
            columns[f"{name}_patient_{statistic}"] = computed[statistic](name)
    return pd.DataFrame(columns, index=scores.index)


# Columns that carry the label (or are decided from it); never stacker features, whatever is asked.
DENIED_FEATURES: dict[str, str] = {
    "target": "is the label itself",
    "diagnosis": "is the label in finer classes",
    "benign_malignant": "is the label in words",
    "dx": "is HAM10000's diagnosis (the label)",
    "dx_type": "says how the diagnosis was confirmed; histopathology is mostly done for suspicious lesions",
    "lesion_id": "can encode the label where ids are assigned by diagnosis",
    "split": "says whether a label exists, not anything about the lesion",
}
# Prefixes of label-derived column families (ISIC 2024 `iddx_*` diagnoses, `mel_*` melanoma details).
DENIED_PREFIXES: dict[str, str] = {
    "diagnosis": "is a diagnosis column",
    "iddx_": "is an ISIC 2024 diagnosis column",
    "mel_": "describes a melanoma (only set when the label is positive)",
}


def denial_reason(column: str) -> str | None:
    """Why a column may never be a feature, or None when it may."""
    if column in DENIED_FEATURES:
        return DENIED_FEATURES[column]
    return next((reason for prefix, reason in DENIED_PREFIXES.items() if column.startswith(prefix)), None)


def check_feature_columns(columns: list[str]) -> None:
    """Refuse any denied (label-derived) column, naming it and why."""
    denied = {c: denial_reason(c) for c in columns if denial_reason(c)}
    if denied:
        reasons = "; ".join(f"{c} {why}" for c, why in denied.items())
        raise DataError(f"refusing label-derived feature(s): {reasons}.")


def extra_numeric_features(table: pd.DataFrame) -> pd.DataFrame:
    """The layout's further numeric columns (e.g. ISIC 2024 `tbp_lv_*`), minus any denied one."""
    columns = [
        c for c in table.columns
        if c not in CANONICAL_COLUMNS and c not in RUN_COLUMNS and denial_reason(c) is None and pd.api.types.is_numeric_dtype(table[c])
    ]
    return table[columns].astype(float)
