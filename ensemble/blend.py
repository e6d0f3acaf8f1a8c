"""Blends of several models' probabilities, and collecting the CNN outputs of a run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from metadata.io import read_table


def cnn_names(run_dir: Path) -> list[str]:
    """CNNs of a run that have an assembled OOF table, in name order."""
    return sorted(p.parent.name for p in (Path(run_dir) / "cnn").glob("*/oof.parquet"))


def cnn_prob_table(run_dir: Path, split: str, image_ids: pd.Series) -> pd.DataFrame:
    """One `cnn_<name>` column per CNN, aligned with `image_ids`; refuses rows without a probability."""
    columns = {}
    for name in cnn_names(run_dir):
        frame = read_table(Path(run_dir) / "cnn" / name / f"{'oof' if split == 'train' else 'test'}.parquet", "train-cnns")
        probs = frame.set_index("image_id")["prob"].reindex(image_ids.to_numpy())
        if probs.isna().any():
            missing = probs.index[probs.isna()][0]
            raise ValueError(
                f"{run_dir}/cnn/{name}: no {split} probability for image {missing!r}; "
                "the CNN outputs are from other data or folds: re-run `train-cnns`."
            )
        columns[f"cnn_{name}"] = probs.to_numpy()
    return pd.DataFrame(columns, index=image_ids.index)


def mean_blend(probs: pd.DataFrame) -> pd.Series:
    """Plain mean of the models' probabilities."""
    return probs.mean(axis=1)


def rank_blend(probs: pd.DataFrame) -> pd.Series:
    """Mean of the models' percentile ranks: robust to models with different calibration."""
    return probs.rank(pct=True).mean(axis=1)
