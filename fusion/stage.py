"""The `stack` stage: read the run's folds and CNN outputs, fit the stacker per fold, write results.

Writes `RUN/stack/oof.parquet`, `RUN/stack/test.parquet`, `RUN/stack/model_fold<k>.txt`
(LightGBM text models), `RUN/stack/features.json` and `RUN/submission.csv`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.blend import cnn_names, cnn_score_table
from ensemble.metrics import roc_auc
from ensemble.submission import write_submission
from fusion.stacker import build_stack_features, cross_val_stack
from metadata.folds import attach_folds
from metadata.io import read_table, write_json, write_table


def run_stack(table: pd.DataFrame, run_dir: Path, num_boost_round: int = 300, seed: int = 0) -> float:
    """Fit the stacker on the run's folds and write its outputs; return its OOF AUC."""
    run_dir = Path(run_dir)
    folds_file = run_dir / "folds.parquet"
    train = attach_folds(table, read_table(folds_file, "folds"), str(folds_file))
    test = table[table["split"] == "test"].reset_index(drop=True)
    train_features = build_stack_features(train, cnn_score_table(run_dir, "train", train["image_id"]))
    test_features = build_stack_features(test, cnn_score_table(run_dir, "test", test["image_id"]))
    target = train["target"].to_numpy(dtype=int)
    result = cross_val_stack(
        train_features, target, train["fold"].to_numpy(), test_features, num_boost_round=num_boost_round, seed=seed
    )
    stack_dir = run_dir / "stack"
    stack_dir.mkdir(parents=True, exist_ok=True)
    for fold, model in zip(sorted(train["fold"].unique()), result.models):
        model.save(stack_dir / f"model_fold{fold}.txt")
    oof = train[["image_id", "patient_id", "fold", "target"]].assign(prob=result.oof_probs)
    write_table(oof, stack_dir / "oof.parquet")
    write_table(test[["image_id", "patient_id"]].assign(prob=result.test_probs), stack_dir / "test.parquet")
    auc = roc_auc(target, result.oof_probs)
    write_json(
        {
            "cnns": cnn_names(run_dir),
            "features": list(train_features.columns),
            "num_boost_round": num_boost_round,
            "seed": seed,
            "oof_auc": auc,
        },
        stack_dir / "features.json",
    )
    if len(test):
        write_submission(test["image_id"], np.clip(result.test_probs, 0, 1), test["image_id"], run_dir / "submission.csv")
    return auc
