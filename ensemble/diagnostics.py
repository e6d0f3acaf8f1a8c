"""What the stack learnt from each feature, and warnings when OOF predictions look too good to be out-of-fold.

Leakage shows up as a number nobody could reach honestly: a CNN whose OOF AUC is above anything it
reached on its own validation fold while training, a single feature that nearly separates the
classes on its own, or OOF tables whose folds are not the run's folds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ensemble.run_files import RunPredictions
from evaluation.metrics import auc_standard_error, roc_auc
from fusion.stack_model import StackModel
from rundir.io import read_table
from rundir.layout import PRIMARY_STACK, STACK_FEATURES_FILE, RunLayout

NEAR_PERFECT_AUC = 0.99  # no melanoma model or single feature reaches this honestly on ISIC data
# OOF AUC (with TTA) may beat the training-time validation AUC (without) by this much, or by two
# standard errors of that AUC on a fold too small to pin it down (the demo's folds have ~25 melanomas).
VALIDATION_TOLERANCE = 0.03
VALIDATION_TOLERANCE_SE = 2.0


def single_feature_auc(values: pd.Series, target: np.ndarray) -> float | None:
    """AUC of one numeric feature on its own, in whichever direction ranks better; None for a categorical."""
    if not pd.api.types.is_numeric_dtype(values):
        return None
    present = values.notna().to_numpy()
    auc = roc_auc(target[present], values.to_numpy(dtype=float, na_value=np.nan)[present])
    return None if np.isnan(auc) else max(auc, 1 - auc)


def lightgbm_gain_share(run_dir: Path) -> pd.Series:
    """Each feature's share of the total split gain, averaged over the fold models (empty without a stack)."""
    layout = RunLayout(run_dir)
    return StackModel.load(layout.stack).gain_share() if layout.stack_model.state.exists() else pd.Series(dtype=float)


def stack_feature_table(run_dir: Path, predictions: RunPredictions) -> list[dict[str, object]]:
    """Per stack feature: LightGBM gain share, its own AUC, and the stack's OOF AUC minus that AUC.

    A stack barely above its best single feature adds little; one below a feature is overfitting.
    """
    features_file = RunLayout(run_dir).stack / STACK_FEATURES_FILE
    if not features_file.exists() or PRIMARY_STACK not in {m.name for m in predictions.models}:
        return []
    features = read_table(features_file, "stack").set_index("image_id").reindex(predictions.rows.index)
    target = predictions.rows["target"].to_numpy(dtype=int)
    stack_auc = roc_auc(target, predictions.model(PRIMARY_STACK).oof["prob"].to_numpy())
    gain = lightgbm_gain_share(run_dir).reindex(features.columns)
    table = []
    for name in features.columns:
        auc = single_feature_auc(features[name], target)
        table.append(
            {
                "feature": name,
                "gain_share": None if np.isnan(gain[name]) else float(gain[name]),
                "single_feature_auc": auc,
                "stack_auc_minus_single": None if auc is None else stack_auc - auc,
            }
        )
    return sorted(table, key=lambda row: -(row["gain_share"] or 0.0))


@dataclass(frozen=True)
class RunEvidence:
    """What the leakage checks look at."""

    run_dir: Path
    predictions: RunPredictions
    stack_features: list[dict[str, object]]


def _folds_differ(evidence: RunEvidence) -> list[str]:
    folds_file = RunLayout(evidence.run_dir).folds
    if not folds_file.exists():
        return []
    run_folds = read_table(folds_file, "folds").set_index("image_id")["fold"]
    warnings = []
    for model in evidence.predictions.models:
        differ = int((model.oof["fold"] != run_folds.reindex(model.oof.index)).sum())
        if differ:
            warnings.append(
                f"{model.name}: {differ} OOF row(s) carry another fold than {folds_file}; those predictions came from "
                "models trained with other folds, which may have seen the rows. Re-run its stage after `folds`."
            )
    return warnings


def _oof_above_validation(evidence: RunEvidence) -> list[str]:
    warnings = []
    target = evidence.predictions.rows["target"].to_numpy(dtype=int)
    for model in evidence.predictions.of_kind("cnn"):
        for history_file in RunLayout(evidence.run_dir).histories(model.name):
            history = json.loads(history_file.read_text())
            in_fold = (model.oof["fold"] == history["fold"]).to_numpy()
            oof_auc = roc_auc(target[in_fold], model.oof["prob"].to_numpy()[in_fold])
            val_aucs = np.asarray(history["val_auc"], dtype=float)
            if np.isnan(oof_auc) or np.isnan(val_aucs).all():  # a fold of one class: both AUCs undefined, nothing to compare
                continue
            best_val = float(np.nanmax(val_aucs))
            n_positive = int(target[in_fold].sum())
            chance = VALIDATION_TOLERANCE_SE * auc_standard_error(best_val, n_positive, int(in_fold.sum()) - n_positive)
            if oof_auc > best_val + max(VALIDATION_TOLERANCE, chance):
                warnings.append(
                    f"{model.name} fold {history['fold']}: OOF AUC {oof_auc:.3f} is above the best validation AUC it reached "
                    f"while training ({best_val:.3f}, {history_file}); OOF predictions that beat every epoch's validation "
                    "score were not made by that fold's model alone: check for label or fold leakage."
                )
    return warnings


def _near_perfect(evidence: RunEvidence) -> list[str]:
    target = evidence.predictions.rows["target"].to_numpy(dtype=int)
    scores = {f"CNN {m.name} (OOF)": roc_auc(target, m.oof["prob"].to_numpy()) for m in evidence.predictions.of_kind("cnn")}
    scores.update({f"stack feature {row['feature']}": row["single_feature_auc"] for row in evidence.stack_features})
    return [
        f"{what} alone has AUC {auc:.4f}: too good to be out-of-fold for melanoma; check how it was produced "
        "(labels, a refit on all rows, or duplicates across folds)."
        for what, auc in scores.items()
        if auc is not None and auc >= NEAR_PERFECT_AUC
    ]


LEAKAGE_CHECKS: dict[str, Callable[[RunEvidence], list[str]]] = {
    "folds_differ": _folds_differ,
    "oof_above_validation": _oof_above_validation,
    "near_perfect": _near_perfect,
}


def leakage_warnings(evidence: RunEvidence) -> list[str]:
    """Every check's warnings, in registry order."""
    return [warning for check in LEAKAGE_CHECKS.values() for warning in check(evidence)]
