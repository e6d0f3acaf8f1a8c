"""The `stack` stage: fit the stack model (`fusion.stack_model`) on the run's folds and write its results.

`fit_stack` computes everything on in-memory inputs (`StackInputs`); `read_stack_inputs` reads
those from a run and `write_stack` writes the results, so the stage is a reader, a pure fit and a
writer. Written under RUN/stack: the fitted stack model (`model_fold<k>.txt`, `stack_model.json`),
`oof.parquet` and `test.parquet` (the test rows scored by the same model `predict` loads), the OOF
scores of every masked copy (`masked_oof.parquet`: one row per image and missingness pattern, what
`export` chooses the alert thresholds on), the scoring reference `predict` compares new batches
with (`scoring_reference.json`), the logistic-regression baseline on the same features and folds
(`logreg_{oof,test}.parquet`), the features themselves (`oof_features.parquet`, so the report can
score each one alone) and the stage's recipe (`features.json`, last). With the run's dermoscopy
features they are a third input family, and `family_gain.parquet` holds the OOF scores of the stack
without each family (`fusion.family_gain`). With diagnoses on every training row (3+ classes), the
differential-diagnosis stack (`fusion.diagnosis_stack`) writes `diagnosis_{oof,test}.parquet`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cnn.outputs import cnn_names, read_cnn_outputs, run_cnn_outputs
from cnn.pairs import require_finished_cnns
from errors import DataError
from fusion.cnn_scores import cnn_class_score_table
from fusion.diagnosis_stack import cross_val_diagnosis_stack, diagnosis_classes, diagnosis_tables
from fusion.family_gain import family_gain_scores
from fusion.image_features.stage import FeatureRecipe, finished_recipe, read_run_features
from fusion.logreg_stack import cross_val_logreg
from fusion.missingness import METADATA_FIELDS
from fusion.shift import REFERENCE_SAMPLE, concat_statistics, image_statistics, moments
from fusion.stack_model import KEYS, StackModel
from fusion.stacker import build_stack_features
from metadata.folds import attach_folds
from rundir.completion import writing
from rundir.io import read_table, write_json, write_table
from rundir.layout import FAMILY_GAIN_FILE, MASKED_OOF_FILE, PRIMARY_STACK, SCORING_REFERENCE_FILE, STACK_FEATURES_FILE, STACK_OUTPUTS, RunLayout

DIAGNOSIS_STACK = "diagnosis_stack"
# written only by some runs (with dermoscopy features; with diagnoses): a refit without them removes the old ones
OPTIONAL_STACK_FILES = (FAMILY_GAIN_FILE, *STACK_OUTPUTS[DIAGNOSIS_STACK])


@dataclass(frozen=True)
class StackInputs:
    """What the stack is fitted on, in memory: the run's training rows (with `fold`) and test rows, each
    CNN's OOF table as written (`image_id`, `fold`, `prob`) and test table aligned with the test rows
    (`prob_fold<k>`), the diagnosis heads' class scores (`fusion.cnn_scores.cnn_class_score_table`),
    and the dermoscopy features."""

    train: pd.DataFrame
    test: pd.DataFrame
    cnn_oof: dict[str, pd.DataFrame] = field(default_factory=dict)
    cnn_test: dict[str, pd.DataFrame] = field(default_factory=dict)
    class_scores: tuple[pd.DataFrame, pd.DataFrame] | None = None  # (train, test); None: no CNN has a diagnosis head
    train_images: pd.DataFrame | None = None
    test_images: pd.DataFrame | None = None
    feature_recipe: FeatureRecipe | None = None


@dataclass
class StackFit:
    """Everything `stack` writes under RUN/stack, computed before any of it is written."""

    model: StackModel
    tables: dict[str, pd.DataFrame]  # file name under RUN/stack -> table
    recipe: dict[str, Any]  # RUN/stack/features.json
    auc: float  # OOF melanoma AUC of the calibrated LightGBM stack
    scoring_reference: dict[str, Any] = field(default_factory=dict)


def require_learnable_folds(train: pd.DataFrame) -> None:
    """Refuse a fold whose training rows (the other folds) are all of one class: no stack learns melanoma from them
    (every melanoma of the run is in that fold)."""
    target, folds = train["target"].to_numpy(dtype=int), train["fold"].to_numpy()
    for fold in sorted(set(folds)):
        if len(set(target[folds != fold])) < 2:
            raise DataError(
                f"fold {fold} holds every melanoma of the run ({int(target.sum())}), so the stack of fold {fold} would learn from "
                "rows without one: add melanomas, or run `folds` again (another --seed, a smaller --k) so that two folds or more hold one."
            )


def fit_stack(inputs: StackInputs, *, num_boost_round: int = 300, seed: int = 0) -> StackFit:
    """Fit the LightGBM stack model (calibrated per missingness pattern), score the test rows with it,
    and fit the logistic-regression baseline, the feature families' gains and the diagnosis stack on
    the same folds.

    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> n = 120
    >>> train = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 4}" for k in range(n)],
    ...     "age": 50.0, "sex": "male", "site": "torso", "target": (rng.random(n) < 0.3).astype(int), "fold": np.arange(n) % 3})
    >>> test = train.head(4).drop(columns=["target", "fold"]).assign(image_id=["t0", "t1", "t2", "t3"], patient_id="q")
    >>> cnn_oof = {"small": train[["image_id", "fold"]].assign(prob=np.clip(0.4 * train["target"] + 0.6 * rng.random(n), 0.01, 0.99))}
    >>> cnn_test = {"small": pd.DataFrame({f"prob_fold{k}": [0.9, 0.1, 0.5, 0.3] for k in range(3)}, index=test.index)}
    >>> fit = fit_stack(StackInputs(train, test, cnn_oof, cnn_test), num_boost_round=20)
    >>> sorted(fit.tables), fit.tables["test.parquet"].columns.tolist()
    (['logreg_oof.parquet', 'logreg_test.parquet', 'masked_oof.parquet', 'oof.parquet', 'oof_features.parquet', 'test.parquet'], ['image_id', 'patient_id', 'prob', 'score', 'pattern'])
    """
    train, test = inputs.train, inputs.test
    require_learnable_folds(train)
    model = StackModel(num_boost_round=num_boost_round, seed=seed).fit(
        train, cnn_oof=inputs.cnn_oof, image_features=inputs.train_images, feature_recipe=inputs.feature_recipe
    )
    scored = model.predict(test, cnn_outputs=inputs.cnn_test, image_features=inputs.test_images)
    train_features = model.training_features_
    train_scores = train_features[model.cnn_columns]
    test_features = build_stack_features(test, scored.cnn_scores, inputs.test_images)
    target, folds = train["target"].to_numpy(dtype=int), train["fold"].to_numpy()
    linear = cross_val_logreg(train_features, target, folds, test_features)
    (lightgbm_oof, lightgbm_test), (logreg_oof, logreg_test) = STACK_OUTPUTS[PRIMARY_STACK], STACK_OUTPUTS["logreg_stack"]
    labelled, unlabelled = train[KEYS], test[["image_id", "patient_id"]]
    tables = {
        lightgbm_oof: model.oof_,
        lightgbm_test: unlabelled.assign(**{c: scored.table[c].to_numpy() for c in ("prob", "score", "pattern")}),
        logreg_oof: labelled.assign(prob=linear.oof_probs),
        logreg_test: unlabelled.assign(prob=linear.test_probs),
        MASKED_OOF_FILE: model.masked_oof_,
        STACK_FEATURES_FILE: train_features.assign(image_id=train["image_id"].to_numpy()),
    }
    if inputs.feature_recipe is not None:
        tables[FAMILY_GAIN_FILE] = family_gain_scores(train, train_scores, inputs.train_images, inputs.feature_recipe, num_boost_round=num_boost_round, seed=seed)
    tables |= diagnosis_stack_tables(inputs, (train_scores, scored.cnn_scores))
    recipe = {
        "cnns": model.cnn_names, "num_boost_round": num_boost_round, "seed": seed, "oof_auc": model.oof_auc_,
        "masked_copies": model.masked_designs_, "image_features": None if inputs.feature_recipe is None else inputs.feature_recipe.to_json(),
    }
    return StackFit(model, tables, recipe, model.oof_auc_)


def diagnosis_stack_tables(inputs: StackInputs, scores: tuple[pd.DataFrame, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The diagnosis stack's OOF and test tables (`fusion.diagnosis_stack`), or none when the training
    rows lack diagnoses: its inputs are the CNN `scores` (train, test) and each CNN's class scores,
    metadata, patient context and the dermoscopy features."""
    train, test = inputs.train, inputs.test
    classes = diagnosis_classes(train)
    if classes is None:
        return {}
    class_scores = inputs.class_scores or (pd.DataFrame(index=train.index), pd.DataFrame(index=test.index))
    train_features, test_features = (
        build_stack_features(rows, pd.concat([cnn, by_class], axis=1), images)
        for rows, cnn, by_class, images in zip((train, test), scores, class_scores, (inputs.train_images, inputs.test_images))
    )
    stack = cross_val_diagnosis_stack(train_features, train["diagnosis"], classes, train["fold"].to_numpy(), test_features=test_features)
    oof, test_table = diagnosis_tables(train[KEYS], test[["image_id", "patient_id"]], stack)
    return dict(zip(STACK_OUTPUTS[DIAGNOSIS_STACK], (oof, test_table)))


# --- reading the inputs and the reference from a run ---------------------------------------------


def read_stack_inputs(table: pd.DataFrame, run_dir: Path) -> StackInputs:
    """The stack's inputs from a run: its folds, every CNN's outputs, the dermoscopy features (if the
    `features` stage ran); refuses images without a prediction or features."""
    folds_file = RunLayout(run_dir).folds
    train = attach_folds(table, read_table(folds_file, "folds"), str(folds_file))
    test = table[table["split"] == "test"].reset_index(drop=True)
    return StackInputs(
        train, test, {name: read_cnn_outputs(run_dir, name)[0] for name in cnn_names(run_dir)}, run_cnn_outputs(run_dir, "test", test["image_id"]),
        (cnn_class_score_table(run_dir, "train", train["image_id"]), cnn_class_score_table(run_dir, "test", test["image_id"])),
        read_run_features(run_dir, train["image_id"]), read_run_features(run_dir, test["image_id"]), finished_recipe(run_dir),
    )


def scoring_reference(
    train: pd.DataFrame, cnn_scores: pd.DataFrame, image_size: int | None, *, color_constancy: str = "none", seed: int = 0
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


# --- the stage ------------------------------------------------------------------------------------


def fit_run_stack(table: pd.DataFrame, run_dir: Path, *, num_boost_round: int = 300, seed: int = 0) -> StackFit:
    """Fit the stack on the run's folds (nothing is written yet).

    Refuses while any (model, fold) pair that `train-cnns` declared is unfinished: a stack silently
    built without a model (or on a partial OOF table) would look like a finished run.
    """
    run_dir = Path(run_dir)
    require_finished_cnns(run_dir)
    inputs = read_stack_inputs(table, run_dir)
    fit = fit_stack(inputs, num_boost_round=num_boost_round, seed=seed)
    train_scores = fit.model.training_features_[fit.model.cnn_columns]
    image_size, color_constancy = _first_cnn_input(run_dir)
    fit.scoring_reference = scoring_reference(inputs.train, train_scores, image_size, color_constancy=color_constancy, seed=seed)
    return fit


def write_stack(run_dir: Path, fit: StackFit) -> None:
    """Write a fitted stack under RUN/stack (the recipe, features.json, last)."""
    layout = RunLayout(run_dir)
    fit.model.save(layout.stack)
    for name, frame in fit.tables.items():
        write_table(frame, layout.stack / name)
    for name in OPTIONAL_STACK_FILES:  # a stack refitted without features (or diagnoses) keeps none of an earlier fit's
        if name not in fit.tables:
            (layout.stack / name).unlink(missing_ok=True)
    write_json(fit.scoring_reference, layout.stack / SCORING_REFERENCE_FILE)
    write_json(fit.recipe, layout.stack_recipe)


def run_stack(table: pd.DataFrame, run_dir: Path, *, num_boost_round: int = 300, seed: int = 0) -> float:
    """Fit the stacker on the run's folds and write its outputs (together or, if interrupted, marked
    incomplete); return its OOF AUC. The run's report then describes an older stack: it is stale until
    `report` runs (the `stack` command writes both)."""
    fit = fit_run_stack(table, run_dir, num_boost_round=num_boost_round, seed=seed)
    with writing(run_dir, "stack"):
        write_stack(run_dir, fit)
    return fit.auc
