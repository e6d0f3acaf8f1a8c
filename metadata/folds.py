"""Triple-stratified K folds: grouped by patient, stratified by target, balanced in images per patient.

Folds are assigned to *patients* (so no patient is in two folds; patients linked by a duplicate
image count as one) with scikit-learn's
`StratifiedKFold` over one stratum label per patient that combines how many melanomas the patient
has (0, 1, 2+) with a quantile bin of their image count. Each fold thus gets a similar melanoma rate
and a similar mix of patients with few and many images.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from errors import DataError, OptionError, RunStateError
from metadata.duplicates import duplicate_groups


def _patient_strata(patients: pd.DataFrame, k: int) -> np.ndarray:
    """One stratum label per patient, coarsened until every stratum has at least k patients.

    Finest first: melanoma count (0, 1, 2+) x 4 image-count quantile bins; then fewer bins; then
    melanoma yes/no alone; then a single stratum.
    """
    melanomas = patients["melanomas"].to_numpy()
    ranks = patients["images"].rank(method="first")
    for melanoma_classes in (3, 2, 1):
        melanoma_class = np.minimum(melanomas, melanoma_classes - 1)
        for bins in (4, 3, 2, 1):
            size_bin = pd.qcut(ranks, bins, labels=False).to_numpy()
            strata = melanoma_class * bins + size_bin
            counts = np.bincount(strata)
            if counts[counts > 0].min() >= k:
                return strata
    return np.zeros(len(patients), dtype=np.int64)


MAX_LINKED_PATIENTS = 4  # patients one group of near duplicates may join before its links look like look-alikes


def cut_chaining_links(train: pd.DataFrame, duplicate_pairs: pd.DataFrame, max_patients: int = MAX_LINKED_PATIENTS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split duplicate pairs into `(kept, cut)`: near-duplicate links that would join more than
    `max_patients` patients into one group are cut.

    A copy of a photograph under another patient id links two patients; a group of dozens linked only
    by perceptual-hash neighbours is look-alike lesions chaining (at 400,000 images even distinct
    lesions have neighbours a few bits apart), and it would make one fold swallow the others. Links
    are taken strongest first (exact and listed pairs, always kept; then near pairs by distance) and
    a near link is cut when the group it would make holds more than `max_patients` patients.

    >>> train = pd.DataFrame({"image_id": list("abcd"), "patient_id": ["p1", "p2", "p3", "p3"]})
    >>> pairs = pd.DataFrame({"image_id_a": ["a", "b"], "image_id_b": ["b", "c"], "kind": ["near", "near"], "distance": [1, 2]})
    >>> kept, cut = cut_chaining_links(train, pairs, max_patients=2)
    >>> list(kept["image_id_b"]), list(cut["image_id_b"])
    (['b'], ['c'])
    """
    pairs = duplicate_pairs.reset_index(drop=True)
    patient_of = pd.Series(train["patient_id"].fillna(train["image_id"]).astype(str).to_numpy(), index=train["image_id"].astype(str))
    first = patient_of.reindex(pairs["image_id_a"].astype(str)).to_numpy()
    second = patient_of.reindex(pairs["image_id_b"].astype(str)).to_numpy()
    near = pairs["kind"].eq("near").to_numpy()
    crossing = pairs.index[pd.notna(first) & pd.notna(second) & (first != second)]
    strongest_first = pairs.loc[crossing].assign(near=near[crossing]).sort_values(["near", "distance"], kind="stable").index
    parent: dict[str, str] = {}
    patients: dict[str, int] = {}  # per group root

    def root(patient: str) -> str:
        while parent.get(patient, patient) != patient:
            patient = parent[patient]
        return patient

    cut = np.zeros(len(pairs), dtype=bool)
    for position in strongest_first:
        ra, rb = root(first[position]), root(second[position])
        if ra == rb:
            continue
        joined = patients.get(ra, 1) + patients.get(rb, 1)
        if near[position] and joined > max_patients:
            cut[position] = True
            continue
        parent[rb], patients[ra] = ra, joined
    return pairs[~cut], pairs[cut]


def fold_groups(train: pd.DataFrame, duplicate_pairs: pd.DataFrame | None = None) -> pd.Series:
    """Group per training row: its patient, merged with every image it duplicates (transitively).

    A duplicate of a held-out image in the training folds would leak its label, so patients linked
    by a duplicate pair share one group. Without pairs this is the patient id.
    """
    patients = train["patient_id"].fillna(train["image_id"]).astype(str)
    if duplicate_pairs is None or duplicate_pairs.empty:
        return patients.set_axis(train.index)
    ids = train["image_id"].astype(str)
    in_train = duplicate_pairs["image_id_a"].isin(ids) & duplicate_pairs["image_id_b"].isin(ids)
    first_of_patient = ids.groupby(patients.to_numpy()).transform("first")
    same_patient = pd.DataFrame({"image_id_a": first_of_patient.to_numpy(), "image_id_b": ids.to_numpy()})
    links = pd.concat([duplicate_pairs.loc[in_train, ["image_id_a", "image_id_b"]], same_patient])
    groups = duplicate_groups(ids.tolist(), links)
    return pd.Series(groups.reindex(ids).to_numpy(), index=train.index)


def source_folds(train: pd.DataFrame) -> pd.DataFrame:
    """Leave-one-source-out folds: fold f holds every image of the f-th source (sorted by name)."""
    sources = train["source"].astype(str)
    names = sorted(sources.unique())
    if len(names) < 2:
        raise DataError(f"--group-by source needs at least 2 sources; the data has only {names}.")
    return pd.DataFrame(
        {
            "image_id": train["image_id"].to_numpy(),
            "patient_id": train["patient_id"].to_numpy(),
            "fold": sources.map({name: i for i, name in enumerate(names)}).to_numpy(dtype=np.int64),
        }
    )


def triple_stratified_folds(
    train: pd.DataFrame, k: int = 5, seed: int = 0, groups: pd.Series | None = None
) -> pd.DataFrame:
    """Return `image_id, patient_id, fold` for every training row; folds are 0..k-1.

    `groups` (aligned with `train`) are kept whole; by default each patient is a group.
    """
    if k < 2:
        raise OptionError(f"k must be at least 2, got {k}.")
    groups = fold_groups(train) if groups is None else groups.astype(str)
    patient_ids = train["patient_id"].fillna(train["image_id"]).astype(str).to_numpy()
    patients = (
        pd.DataFrame({"group": groups.to_numpy(), "target": train["target"].astype(int).to_numpy(), "patient": patient_ids})
        .groupby("group", sort=True)
        .agg(melanomas=("target", "sum"), images=("target", "size"), patients=("patient", "nunique"))
        .reset_index()
    )
    if len(patients) < k:
        raise OptionError(f"only {len(patients)} patients for {k} folds; lower --k.")
    # One real patient may hold more images than a fold (ISIC 2024 has patients with thousands): their
    # fold is simply larger. A group of several patients that large is duplicate links gone wrong.
    chained = patients[(patients["images"] > len(train) / k) & (patients["patients"] > 1)]
    if len(chained):
        largest = chained.loc[chained["images"].idxmax()]
        raise DataError(
            f"group {largest['group']!r} joins {largest['patients']} patients through duplicate images and holds "
            f"{largest['images']} of {len(train)} images, more than a fold of {k}: one fold would hold them all. Check those "
            "pairs (`inspect` lists them); if they are look-alikes, not copies, run `folds --no-dedup` or a lower "
            "--max-linked-patients; or use fewer folds (--k)."
        )
    strata = _patient_strata(patients, k)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    patient_fold = np.empty(len(patients), dtype=np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(patients)), strata)):
        patient_fold[held_out] = fold
    fold_of_group = dict(zip(patients["group"], patient_fold))
    return pd.DataFrame(
        {
            "image_id": train["image_id"].to_numpy(),
            "patient_id": train["patient_id"].to_numpy(),
            "fold": groups.map(fold_of_group).to_numpy(dtype=np.int64),
        }
    )


def attach_folds(table: pd.DataFrame, folds: pd.DataFrame, folds_file: str) -> pd.DataFrame:
    """Training rows of the canonical table with their `fold`; refuses rows the folds do not cover."""
    train = table[table["split"] == "train"].merge(folds[["image_id", "fold"]], on="image_id", how="left")
    if train["fold"].isna().any():
        missing = train.loc[train["fold"].isna(), "image_id"].iloc[0]
        raise RunStateError(f"{folds_file} has no fold for image {missing!r}: re-run `folds` on this data.")
    return train.astype({"fold": int})
