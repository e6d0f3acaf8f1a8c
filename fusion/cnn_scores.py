"""The CNN outputs of a run as stacker inputs: each fold model's log-odds on one scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from errors import RunStateError
from rundir.completion import require_complete
from rundir.io import read_table
from rundir.layout import HISTORY_FILE, OOF_FILE, RunLayout


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


def _aligned(scores: pd.DataFrame, image_ids: pd.Series, source: Path, split: str) -> pd.DataFrame:
    """`scores` (indexed by image id) in the order of `image_ids`; refuses an image without a prediction."""
    aligned = scores.reindex(image_ids.to_numpy())
    if aligned.isna().any(axis=None):
        missing = aligned.index[aligned.isna().any(axis=1)][0]
        raise RunStateError(
            f"{source}: no {split} prediction for image {missing!r}; "
            "the CNN outputs are from other data or folds: re-run `train-cnns`."
        )
    return aligned.set_axis(image_ids.index)


def _cnn_split(run_dir: Path, name: str, split: str) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """A CNN's OOF table, the table of `split` (the OOF table itself for "train") and its folder."""
    oof_file, test_file = RunLayout(run_dir).cnn_outputs(name)
    oof = read_table(oof_file, "train-cnns")
    return oof, oof if split == "train" else read_table(test_file, "train-cnns"), oof_file.parent


def cnn_score_table(run_dir: Path, split: str, image_ids: pd.Series) -> pd.DataFrame:
    """One `cnn_<name>` column per CNN (fold-model-standardised log-odds), aligned with `image_ids`."""
    columns = []
    for name in cnn_names(run_dir):
        oof, frame, source = _cnn_split(run_dir, name, split)
        scales = fold_model_scales(oof)
        scores = standardized_oof_scores(frame, scales) if split == "train" else standardized_test_scores(frame, scales)
        columns.append(_aligned(pd.DataFrame({cnn_score_column(name): scores}, index=frame["image_id"].to_numpy()), image_ids, source, split))
    return pd.concat(columns, axis=1) if columns else pd.DataFrame(index=image_ids.index)


def cnn_class_score_table(run_dir: Path, split: str, image_ids: pd.Series) -> pd.DataFrame:
    """`cnn_<name>_<CLASS>` per CNN with a diagnosis head: the log of each class probability over the
    class prior its fold model was fitted to (test rows: the fold models' mean probability over their
    mean prior), so the stack sees evidence, not the training mix; aligned with `image_ids`."""
    columns = []
    for name in cnn_names(run_dir):
        oof, frame, source = _cnn_split(run_dir, name, split)
        classes = [c.removeprefix("prob_") for c in oof.columns if c.startswith("prob_") and not c.startswith("prob_fold")]
        if not classes:
            continue
        prior = _split_prior(training_priors(source, oof["fold"]), classes, oof["fold"], split)
        # reindexed: a run without test rows has only `prob` in its empty test table (rows it lacks are refused below)
        probs = frame.reindex(columns=[f"prob_{c}" for c in classes]).to_numpy(dtype=float)
        evidence = np.log(np.clip(probs, 1e-6, 1.0) / prior)
        table = pd.DataFrame(evidence, columns=[f"{cnn_score_column(name)}_{c}" for c in classes], index=frame["image_id"].to_numpy())
        columns.append(_aligned(table, image_ids, source, split))
    return pd.concat(columns, axis=1) if columns else pd.DataFrame(index=image_ids.index)


def fold_mean_prior(priors: pd.DataFrame, folds: pd.Series | np.ndarray) -> pd.Series:
    """The class mix behind test predictions (class -> probability): the fold models' own mixes
    (`priors`, one row per OOF row, predicted in `folds`), averaged as their outputs are."""
    return priors.groupby(np.asarray(folds)).first().mean()


def _split_prior(priors: pd.DataFrame | None, classes: list[str], folds: pd.Series, split: str) -> np.ndarray | float:
    """The class mix behind a split's probabilities: each OOF row's fold model's, or for test rows
    `fold_mean_prior`; 1 when the run did not record it."""
    if priors is None:
        return 1.0
    return priors[classes].to_numpy() if split == "train" else fold_mean_prior(priors[classes], folds).to_numpy()


def training_priors(model_dir: Path, folds: pd.Series) -> pd.DataFrame | None:
    """Each OOF row's training prior, from its fold's `history.json`; None for a binary head or an older run."""
    histories = {int(f): model_dir / f"fold{int(f)}" / HISTORY_FILE for f in folds.unique()}
    if not all(path.exists() for path in histories.values()):
        return None
    records = {fold: json.loads(path.read_text()) for fold, path in histories.items()}
    if any(record.get("training_prior") is None for record in records.values()):
        return None
    classes = next(iter(records.values()))["classes"]
    by_fold = pd.DataFrame({fold: record["training_prior"] for fold, record in records.items()}, index=classes).T
    return by_fold.reindex(folds.to_numpy()).set_axis(folds.index)
