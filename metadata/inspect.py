"""`inspect`: what a data folder holds and whether the pipeline can train on it.

Decodes every listed image once (catching truncated files), finds exact and near-duplicate images,
and reports duplicate pairs that cross train/test, which would inflate test scores.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from errors import DataError
from metadata.dataset import load_dataset
from metadata.duplicates import NEAR_DUPLICATE_BITS, find_duplicate_pairs, fingerprint_images


def _pairs_across_splits(pairs: pd.DataFrame, split_of: pd.Series) -> pd.DataFrame:
    return pairs[pairs["image_id_a"].map(split_of) != pairs["image_id_b"].map(split_of)]


def inspect_dataset(
    root: Path, format_name: str | None = None, metadata: Path | None = None, *, max_distance: int = NEAR_DUPLICATE_BITS,
    advance: Callable[[], None] | None = None,
) -> dict:
    """A JSON-ready summary of the data; `trainable` is False when training would fail or mislead.

    `advance` is called once per image decoded (a progress bar's hook)."""
    try:
        loaded = load_dataset(root, format_name, metadata, on_bad_image="skip")
    except DataError as error:
        return {"data": str(root), "trainable": False, "errors": [str(error)]}
    table = loaded.table
    has_images = table["image_path"].notna()
    fingerprints, unreadable = fingerprint_images(
        table.loc[has_images, "image_id"].tolist(), table.loc[has_images, "image_path"].tolist(), on_error="skip", advance=advance
    )
    pairs = find_duplicate_pairs(fingerprints, max_distance=max_distance)
    by_id = table.set_index("image_id")
    crossing = _pairs_across_splits(pairs, by_id["split"])
    diagnosis = by_id["diagnosis"].astype("string")
    conflicting = pairs[
        pairs["image_id_a"].map(diagnosis).fillna("?") != pairs["image_id_b"].map(diagnosis).fillna("?")
    ]
    train = table[table["split"] == "train"]
    labelled = table[table["target"].notna()]
    problems = []
    if len(loaded.skipped):
        problems.append(f"{len(loaded.skipped)} listed image(s) have no file")
    if unreadable:
        problems.append(f"{len(unreadable)} image(s) cannot be decoded")
    if train["target"].nunique() < 2:
        problems.append("the training split needs both melanoma and non-melanoma rows")
    return {
        "data": str(Path(root).resolve()),
        "format": loaded.format_name,
        "metadata_only": bool(not has_images.any()),
        "rows": {split: int(n) for split, n in table["split"].value_counts().sort_index().items()},
        "patients": int(table["patient_id"].nunique()),
        "lesions": int(table["lesion_id"].nunique()),
        "melanoma": {split: int(n) for split, n in labelled.groupby("split")["target"].sum().items()},
        "diagnosis_counts": {str(k): int(v) for k, v in table["diagnosis"].value_counts().items() if v > 0},
        "sources": {str(k): int(v) for k, v in table["source"].value_counts().items()},
        "missing_values": {c: int(n) for c, n in table.isna().sum().items() if n > 0},
        "images_listed_but_missing": loaded.skipped["image_id"].tolist(),
        "images_present_but_not_listed": loaded.unlisted_images,
        "unreadable_images": [{"image_id": i, "error": e} for i, e in unreadable],
        "duplicate_pairs": {
            "exact": int((pairs["kind"] == "exact").sum()),
            "near": int((pairs["kind"] == "near").sum()),
            "max_hamming_distance": max_distance,
            "across_train_test": crossing.to_dict(orient="records"),
            "conflicting_diagnosis": conflicting.to_dict(orient="records"),
            "pairs": pairs.to_dict(orient="records"),
        },
        "trainable": not problems,
        "errors": problems,
    }
