"""The CNN outputs of a run as stacker inputs: each fold model's log-odds on one scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from metadata.run.completion import require_complete
from metadata.run.io import read_table
from metadata.run.layout import OOF_FILE, RunLayout


def cnn_names(run_dir: Path) -> list[str]:
    """CNNs of a run that have an assembled OOF table, in name order; refuses a run whose assembly of a CNN was interrupted."""
    require_complete(run_dir, "train-cnns")
    return sorted(p.parent.name for p in RunLayout(run_dir).cnn.glob(f"*/{OOF_FILE}"))


def logit(probs: np.ndarray | pd.Series) -> np.ndarray:
    """Log-odds, clipped away from 0 and 1 so saturated probabilities stay finite."""
    p = np.clip(np.asarray(probs, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fold_model_scales(oof: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of each fold model's OOF log-odds (`fold` -> `mean`, `std`).

    Each fold's OOF probabilities come from a different model with its own calibration; pooled raw,
    they rank worse than any fold alone. Standardising every fold model's log-odds by its own OOF
    statistics puts them on one scale, and the same statistics apply to that model's test (or
    new-patient) predictions, so nothing depends on the batch being scored.
    """
    stats = pd.DataFrame({"fold": oof["fold"].to_numpy(), "logit": logit(oof["prob"])}).groupby("fold")["logit"]
    scales = pd.DataFrame({"mean": stats.mean(), "std": stats.std()})
    return scales.assign(std=scales["std"].where(scales["std"] > 0, 1.0))


def standardized_oof_scores(oof: pd.DataFrame, scales: pd.DataFrame) -> np.ndarray:
    """Each OOF row's log-odds standardised by the scales of the fold model that scored it."""
    folds = oof["fold"].to_numpy()
    return (logit(oof["prob"]) - scales["mean"].reindex(folds).to_numpy()) / scales["std"].reindex(folds).to_numpy()


def standardized_test_scores(test: pd.DataFrame, scales: pd.DataFrame) -> np.ndarray:
    """Mean over fold models of each model's standardised log-odds (`prob_fold<k>` columns)."""
    per_model = [(logit(test[f"prob_fold{fold}"]) - row["mean"]) / row["std"] for fold, row in scales.iterrows()]
    return np.mean(per_model, axis=0)


def cnn_score_column(name: str) -> str:
    """The stack's input column of CNN `name`'s standardised score."""
    return f"cnn_{name}"


def cnn_score_table(run_dir: Path, split: str, image_ids: pd.Series) -> pd.DataFrame:
    """One `cnn_<name>` column per CNN (fold-model-standardised log-odds), aligned with `image_ids`."""
    columns = {}
    for name in cnn_names(run_dir):
        oof_file, test_file = RunLayout(run_dir).cnn_outputs(name)
        oof = read_table(oof_file, "train-cnns")
        scales = fold_model_scales(oof)
        frame = oof if split == "train" else read_table(test_file, "train-cnns")
        scores = standardized_oof_scores(frame, scales) if split == "train" else standardized_test_scores(frame, scales)
        aligned = pd.Series(scores, index=frame["image_id"].to_numpy()).reindex(image_ids.to_numpy())
        if aligned.isna().any():
            missing = aligned.index[aligned.isna()][0]
            raise ValueError(
                f"{oof_file.parent}: no {split} prediction for image {missing!r}; "
                "the CNN outputs are from other data or folds: re-run `train-cnns`."
            )
        columns[cnn_score_column(name)] = aligned.to_numpy()
    return pd.DataFrame(columns, index=image_ids.index)
