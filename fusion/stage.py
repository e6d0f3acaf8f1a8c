"""The `stack` stage: read the run's folds and CNN outputs, fit the stacker per fold, write results.

Writes `RUN/stack/oof.parquet`, `RUN/stack/test.parquet`, `RUN/stack/model_fold<k>.txt`
(LightGBM text models), `RUN/stack/features.json` and `RUN/submission.csv`; the logistic-regression
baseline on the same features and folds as `RUN/stack/logreg_{oof,test}.parquet`; and the
features themselves (`RUN/stack/oof_features.parquet`) so the report can score each one alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnn.pairs import require_finished_cnns
from ensemble.blend import cnn_names, cnn_score_table
from ensemble.logreg_stack import cross_val_logreg
from ensemble.metrics import roc_auc
from ensemble.run_files import PRIMARY_STACK, STACK_FEATURES_FILE, STACK_OUTPUTS
from ensemble.submission import SUBMISSION_FORMATS, write_submission
from fusion.stacker import build_stack_features, cross_val_stack
from metadata.folds import attach_folds
from metadata.io import atomic_write, read_table, write_json, write_table


def run_stack(table: pd.DataFrame, run_dir: Path, num_boost_round: int = 300, seed: int = 0) -> float:
    """Fit the stacker on the run's folds and write its outputs; return its OOF AUC.

    Refuses while any (model, fold) pair that `train-cnns` declared is unfinished: a stack silently
    built without a model (or on a partial OOF table) would look like a finished run.
    """
    run_dir = Path(run_dir)
    require_finished_cnns(run_dir)
    folds_file = run_dir / "folds.parquet"
    train = attach_folds(table, read_table(folds_file, "folds"), str(folds_file))
    test = table[table["split"] == "test"].reset_index(drop=True)
    train_features = build_stack_features(train, cnn_score_table(run_dir, "train", train["image_id"]))
    test_features = build_stack_features(test, cnn_score_table(run_dir, "test", test["image_id"]))
    target = train["target"].to_numpy(dtype=int)
    result = cross_val_stack(
        train_features, target, train["fold"].to_numpy(), test_features, num_boost_round=num_boost_round, seed=seed
    )
    linear = cross_val_logreg(train_features, target, train["fold"].to_numpy(), test_features)
    stack_dir = run_dir / "stack"
    stack_dir.mkdir(parents=True, exist_ok=True)
    for fold, model in zip(sorted(train["fold"].unique()), result.models):
        atomic_write(stack_dir / f"model_fold{fold}.txt", model.save)
    for name, (oof_probs, test_probs) in {
        PRIMARY_STACK: (result.oof_probs, result.test_probs),
        "logreg_stack": (linear.oof_probs, linear.test_probs),
    }.items():
        oof_file, test_file = STACK_OUTPUTS[name]
        write_table(train[["image_id", "patient_id", "fold", "target"]].assign(prob=oof_probs), stack_dir / oof_file)
        write_table(test[["image_id", "patient_id"]].assign(prob=test_probs), stack_dir / test_file)
    write_table(train_features.assign(image_id=train["image_id"].to_numpy()), stack_dir / STACK_FEATURES_FILE)
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
        submission = pd.DataFrame({"image_name": test["image_id"], "target": np.clip(result.test_probs, 0, 1)})
        write_submission(submission, SUBMISSION_FORMATS["isic2020"], test["image_id"], run_dir / "submission.csv")
    return auc
