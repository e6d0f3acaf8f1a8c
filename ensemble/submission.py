"""Submission CSVs, validated before they are written and written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from metadata.io import atomic_write


def write_submission(
    image_ids: pd.Series, probs: np.ndarray, expected_ids: pd.Series, path: Path, id_column: str = "image_name"
) -> pd.DataFrame:
    """Write `id_column,target`: every expected id exactly once, probabilities finite in [0, 1]."""
    submission = pd.DataFrame({id_column: np.asarray(image_ids, dtype=object), "target": np.asarray(probs, dtype=float)})
    duplicated = submission[id_column][submission[id_column].duplicated()]
    if len(duplicated):
        raise ValueError(f"submission: id {duplicated.iloc[0]!r} appears more than once.")
    expected, got = set(expected_ids), set(submission[id_column])
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise ValueError(f"submission: {len(missing)} test id(s) missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]}).")
    bad = ~np.isfinite(submission["target"]) | (submission["target"] < 0) | (submission["target"] > 1)
    if bad.any():
        raise ValueError(f"submission: id {submission[id_column][bad].iloc[0]!r} has probability outside [0, 1].")
    atomic_write(path, lambda tmp: submission.to_csv(tmp, index=False))
    return submission
