"""The `stack` stage: read the run's folds and CNN outputs, fit the stacker per fold, write results.

Writes `RUN/stack/oof.parquet`, `RUN/stack/test.parquet`, `RUN/stack/model_fold<k>.txt`
(LightGBM text models) and `RUN/stack/features.json` (the CLI then writes `RUN/submission.csv`); the OOF scores of
every masked copy (`RUN/stack/masked_oof.parquet`: one row per image and missingness pattern) and
the scoring reference `predict` compares new batches with (`RUN/stack/scoring_reference.json`); the logistic-regression
baseline on the same features and folds as `RUN/stack/logreg_{oof,test}.parquet`; and the
features themselves (`RUN/stack/oof_features.parquet`) so the report can score each one alone. With
the run's dermoscopy features (`features` stage) they are a third input family, with their
patient context, and `RUN/stack/family_gain.parquet` holds the OOF scores of the stack without
each family (`fusion.family_gain`). With diagnoses on every training row (3+ classes), the
differential-diagnosis stack (`fusion.diagnosis_stack`) writes `RUN/stack/diagnosis_{oof,test}.parquet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cnn.pairs import require_finished_cnns
from evaluation.metrics import roc_auc
from fusion.cnn_scores import cnn_class_score_table, cnn_names, cnn_score_table
from fusion.diagnosis_stack import cross_val_diagnosis_stack, diagnosis_classes, diagnosis_tables
from fusion.family_gain import family_gain_scores
from fusion.image_features.stage import finished_recipe, read_run_features
from fusion.logreg_stack import cross_val_logreg
from fusion.missingness import METADATA_FIELDS, MaskedCopy, PatternCalibration, masked_copies, missingness_pattern
from fusion.shift import REFERENCE_SAMPLE, concat_statistics, image_statistics, moments
from fusion.stacker import build_stack_features, cross_val_stack
from metadata.folds import attach_folds
from rundir.completion import writing
from rundir.io import atomic_write, read_table, write_json, write_table
from rundir.layout import FAMILY_GAIN_FILE, MASKED_OOF_FILE, PRIMARY_STACK, SCORING_REFERENCE_FILE, STACK_FEATURES_FILE, STACK_OUTPUTS, RunLayout

DIAGNOSIS_STACK = "diagnosis_stack"
# written only by some runs (with dermoscopy features; with diagnoses): a refit without them removes the old ones
OPTIONAL_STACK_FILES = (FAMILY_GAIN_FILE, *STACK_OUTPUTS[DIAGNOSIS_STACK])


def masked_oof_table(train: pd.DataFrame, oof_scores: np.ndarray, copies: list[MaskedCopy], masked_scores: dict[str, np.ndarray]) -> pd.DataFrame:
    """OOF scores of every row under every pattern it can take: the rows as given and each masked copy.

    One row per (image, pattern); where two copies give an image the same pattern (a row that already
    lacked a field), the copy built for that pattern wins.
    """
    keys = train[["image_id", "patient_id", "fold", "target"]].reset_index(drop=True)
    parts = [keys.assign(design="complete", pattern=missingness_pattern(train).to_numpy(), score=oof_scores)]
    parts += [keys.assign(design=c.design, pattern=c.pattern.to_numpy(), score=masked_scores[c.design]) for c in copies]
    table = pd.concat(parts, ignore_index=True)
    own = table["design"] == table["pattern"]
    table = table.iloc[np.argsort(~own.to_numpy(), kind="stable")].drop_duplicates(["image_id", "pattern"])
    return table.sort_index().reset_index(drop=True)


def scoring_reference(
    train: pd.DataFrame, cnn_scores: pd.DataFrame, image_size: int | None, color_constancy: str = "none", seed: int = 0
) -> dict[str, object]:
    """What `predict` compares a batch with (see `fusion.shift`): image statistics of a seeded sample of
    training images as the first CNN sees them (its size and colour constancy), CNN score moments,
    metadata missing rates."""
    reference: dict[str, object] = {
        "cnn_scores": moments({c: cnn_scores[c].to_numpy() for c in cnn_scores.columns}),
        "missing_rate": {f: float(train[f].isna().mean()) for f in METADATA_FIELDS},
        "image_size": image_size,
        "images": {},
    }
    if image_size is not None:
        from cnn.pipeline import image_dataset

        sample = train["image_path"].sample(min(REFERENCE_SAMPLE, len(train)), random_state=seed).astype(str).tolist()
        batches = image_dataset(sample, None, image_size, 64, cache="none", color_constancy=color_constancy)
        reference["images"] = moments(concat_statistics(image_statistics(b.numpy()) for b in batches))
    return reference


def _first_cnn_input(run_dir: Path) -> tuple[int | None, str]:
    """Input size and colour constancy of the run's first CNN (the one `predict` takes image statistics
    from); no size without a CNN, or for CNN outputs written without a training history (no image
    reference is kept then)."""
    names = cnn_names(run_dir)
    histories = RunLayout(run_dir).histories(names[0]) if names else []
    config = json.loads(histories[0].read_text()).get("config", {}) if histories else {}
    size = config.get("image_size")
    return (None if size is None else int(size)), config.get("color_constancy", "none")


def diagnosis_stack_tables(
    train: pd.DataFrame, test: pd.DataFrame, run_dir: Path, scores: tuple[pd.DataFrame, pd.DataFrame],
    images: tuple[pd.DataFrame | None, pd.DataFrame | None],
) -> dict[str, pd.DataFrame]:
    """The diagnosis stack's OOF and test tables (`fusion.diagnosis_stack`), or none when the training
    rows lack diagnoses: its inputs are the CNN `scores` and each CNN's class scores, metadata, patient
    context and the dermoscopy features of `images` (each a pair: train, test)."""
    classes = diagnosis_classes(train)
    if classes is None:
        return {}

    def features(rows: pd.DataFrame, split: str, cnn_scores: pd.DataFrame, image_features: pd.DataFrame | None) -> pd.DataFrame:
        return build_stack_features(rows, pd.concat([cnn_scores, cnn_class_score_table(run_dir, split, rows["image_id"])], axis=1), image_features)

    stack = cross_val_diagnosis_stack(
        features(train, "train", scores[0], images[0]), train["diagnosis"], classes, train["fold"].to_numpy(), features(test, "test", scores[1], images[1])
    )
    oof, test_table = diagnosis_tables(train[["image_id", "patient_id", "fold", "target"]], test[["image_id", "patient_id"]], stack)
    return dict(zip(STACK_OUTPUTS[DIAGNOSIS_STACK], (oof, test_table)))


@dataclass
class StackFit:
    """Everything `stack` writes under RUN/stack, computed before any of it is written."""

    boosters: dict[int, Any]  # fold -> the LightGBM stacker trained without it
    tables: dict[str, pd.DataFrame]  # file name under RUN/stack -> table
    scoring_reference: dict[str, Any]
    recipe: dict[str, Any]  # RUN/stack/features.json
    auc: float  # OOF melanoma AUC of the calibrated LightGBM stack


def fit_stack(table: pd.DataFrame, run_dir: Path, num_boost_round: int = 300, seed: int = 0) -> StackFit:
    """Fit the LightGBM stack (on the rows as given plus their masked copies, calibrated per
    missingness pattern on OOF scores) and the logistic-regression baseline on the run's folds."""
    folds_file = RunLayout(run_dir).folds
    train = attach_folds(table, read_table(folds_file, "folds"), str(folds_file))
    test = table[table["split"] == "test"].reset_index(drop=True)
    train_scores = cnn_score_table(run_dir, "train", train["image_id"])
    feature_recipe = finished_recipe(run_dir)
    train_images, test_images = (read_run_features(run_dir, rows["image_id"]) for rows in (train, test))
    train_features = build_stack_features(train, train_scores, train_images)
    test_cnn_scores = cnn_score_table(run_dir, "test", test["image_id"])
    test_features = build_stack_features(test, test_cnn_scores, test_images)
    copies = [c for c in masked_copies(train, seed) if c.design != "complete"]
    target, folds = train["target"].to_numpy(dtype=int), train["fold"].to_numpy()
    result = cross_val_stack(
        train_features, target, folds, test_features, num_boost_round=num_boost_round, seed=seed,
        masked_features={c.design: build_stack_features(c.rows, train_scores, train_images) for c in copies},
        increasing=tuple(train_scores.columns),
    )
    masked = masked_oof_table(train, result.oof_probs, copies, result.masked_oof)
    # a lesion's CNN scores are never masked: each masked row takes its image's
    cnn_of_masked = {c: train_scores[c].set_axis(train["image_id"]).reindex(masked["image_id"]).to_numpy() for c in train_scores}
    calibration = PatternCalibration.fit(masked["score"], masked["target"], masked["fold"], masked["pattern"], cnn_of_masked)
    # `prob`: the calibration new patients get (one per pattern, so each pattern keeps its ranking);
    # `prob_cross_fitted`: each fold by a calibration fitted without it, for an honest calibration error.
    masked["score"] = calibration.chosen_scores(masked["score"], masked["pattern"], cnn_of_masked)
    masked["scorer"] = masked["pattern"].map(calibration.sources).map(calibration.scorers)
    masked["prob"] = calibration.apply(masked["score"], masked["pattern"])
    masked["prob_cross_fitted"] = calibration.apply(masked["score"], masked["pattern"], masked["fold"])
    train_pattern, test_pattern = missingness_pattern(train).to_numpy(), missingness_pattern(test).to_numpy()
    labelled, unlabelled = train[["image_id", "patient_id", "fold", "target"]], test[["image_id", "patient_id"]]
    test_scores = test_features[list(train_scores.columns)]
    oof_score = calibration.chosen_scores(result.oof_probs, train_pattern, {c: train_scores[c].to_numpy() for c in train_scores})
    test_score = calibration.chosen_scores(result.test_probs, test_pattern, {c: test_scores[c].to_numpy() for c in test_scores})
    stack_oof = labelled.assign(prob=calibration.apply(oof_score, train_pattern), score=oof_score, pattern=train_pattern)
    linear = cross_val_logreg(train_features, target, folds, test_features)
    (lightgbm_oof, lightgbm_test), (logreg_oof, logreg_test) = STACK_OUTPUTS[PRIMARY_STACK], STACK_OUTPUTS["logreg_stack"]
    tables = {
        lightgbm_oof: stack_oof,
        lightgbm_test: unlabelled.assign(prob=calibration.apply(test_score, test_pattern), score=test_score, pattern=test_pattern),
        logreg_oof: labelled.assign(prob=linear.oof_probs),
        logreg_test: unlabelled.assign(prob=linear.test_probs),
        MASKED_OOF_FILE: masked,
        STACK_FEATURES_FILE: train_features.assign(image_id=train["image_id"].to_numpy()),
    }
    if feature_recipe is not None:
        tables[FAMILY_GAIN_FILE] = family_gain_scores(train, train_scores, train_images, feature_recipe, num_boost_round, seed)
    tables |= diagnosis_stack_tables(train, test, run_dir, (train_scores, test_cnn_scores), (train_images, test_images))
    auc = roc_auc(target, stack_oof["prob"])
    recipe = {
        "cnns": cnn_names(run_dir), "features": list(train_features.columns), "num_boost_round": num_boost_round, "seed": seed,
        "oof_auc": auc, "masked_copies": [c.design for c in copies], "calibration": calibration.to_json(),
        "image_features": None if feature_recipe is None else feature_recipe.to_json(),
    }
    boosters = dict(zip(sorted(train["fold"].unique()), result.models))
    return StackFit(boosters, tables, scoring_reference(train, train_scores, *_first_cnn_input(run_dir), seed=seed), recipe, auc)


def write_stack(run_dir: Path, fit: StackFit) -> None:
    """Write a fitted stack under RUN/stack (the recipe, features.json, last)."""
    layout = RunLayout(run_dir)
    layout.stack.mkdir(parents=True, exist_ok=True)
    for fold, booster in fit.boosters.items():
        atomic_write(layout.stack_booster(fold), booster.save)
    for name, frame in fit.tables.items():
        write_table(frame, layout.stack / name)
    for name in OPTIONAL_STACK_FILES:  # a stack refitted without features (or diagnoses) keeps none of an earlier fit's
        if name not in fit.tables:
            (layout.stack / name).unlink(missing_ok=True)
    write_json(fit.scoring_reference, layout.stack / SCORING_REFERENCE_FILE)
    write_json(fit.recipe, layout.stack_recipe)


def fit_run_stack(table: pd.DataFrame, run_dir: Path, num_boost_round: int = 300, seed: int = 0) -> StackFit:
    """Fit the stacker on the run's folds (nothing is written yet).

    Refuses while any (model, fold) pair that `train-cnns` declared is unfinished: a stack silently
    built without a model (or on a partial OOF table) would look like a finished run.
    """
    require_finished_cnns(Path(run_dir))
    return fit_stack(table, Path(run_dir), num_boost_round, seed)


def run_stack(table: pd.DataFrame, run_dir: Path, num_boost_round: int = 300, seed: int = 0) -> float:
    """Fit the stacker on the run's folds and write its outputs (together or, if interrupted, marked
    incomplete); return its OOF AUC."""
    fit = fit_run_stack(table, run_dir, num_boost_round, seed)
    with writing(run_dir, "stack"):
        write_stack(run_dir, fit)
    return fit.auc
