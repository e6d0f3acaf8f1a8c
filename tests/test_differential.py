"""The differential diagnosis reaches the user: `predict` writes each class's probability and the top diagnosis."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli import app
from evaluation.metrics import prior_adjusted_probabilities

runner = CliRunner()


def test_predict_writes_the_differential_diagnosis_of_the_diagnosis_heads(tiny_cohort: Path, tmp_path: Path) -> None:
    data, run, bundle, out = tmp_path / "data", tmp_path / "run", tmp_path / "bundle", tmp_path / "out"
    shutil.copytree(tiny_cohort, data)
    train = pd.read_csv(data / "train.csv")
    nevi = train.index[train["diagnosis"] == "nevus"]
    train.loc[nevi[::3], "diagnosis"] = "seborrheic keratosis"  # a third class, so the heads are diagnosis heads
    train.to_csv(data / "train.csv", index=False)
    common = ["--data", str(data), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2", "--no-dedup"]).exit_code == 0
    result = runner.invoke(app, ["train-cnns", *common, "--models", "small:16", "--epochs", "1", "--target", "diagnosis", "--class-weight", "balanced"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["stack", *common, "--rounds", "20"]).exit_code == 0
    _the_diagnosis_stack_is_reported(run)
    submitted = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2019", "--data", str(data)])
    assert submitted.exit_code == 0, submitted.output
    assert "from diagnosis_stack" in " ".join(submitted.output.split())  # the multi-class formats' default where the run has it
    submission = pd.read_csv(run / "submission_isic2019.csv").set_index("image")
    stack_test = pd.read_parquet(run / "stack" / "diagnosis_test.parquet").set_index("image_id")
    adjusted = prior_adjusted_probabilities(stack_test[["prob_MEL", "prob_NV", "prob_BKL"]].to_numpy(), stack_test[["prior_MEL", "prior_NV", "prior_BKL"]].to_numpy())
    np.testing.assert_allclose(submission.loc[stack_test.index, ["MEL", "NV", "BKL"]].to_numpy(), adjusted, atol=1e-6)  # the balanced-accuracy decision
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(bundle)]).exit_code == 0
    result = runner.invoke(app, ["predict", "--bundle", str(bundle), "--data", str(data), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output

    predictions = pd.read_csv(out / "predictions.csv")
    classes = json.loads((bundle / "config.json").read_text())["cnns"][0]["classes"]
    columns = [f"prob_{c}" for c in classes]
    assert set(classes) == {"MEL", "NV", "BKL"}
    np.testing.assert_allclose(predictions[columns].sum(axis=1), 1.0, atol=1e-6)
    assert (predictions["top_diagnosis"] == np.array(classes)[predictions[columns].to_numpy().argmax(axis=1)]).all()
    # the fold models' class probabilities, prior-adjusted with each fold's training prior, then averaged (as the report)
    from ensemble.bundle import load_bundle
    from ensemble.predict import cnn_fold_probabilities

    member = load_bundle(bundle).cnns[0]
    assert member.priors is not None and len(member.priors) == 2
    sources = [str(data / "jpeg" / "test" / f"{i}.jpg") for i in predictions["image_id"][:5]]
    outputs = cnn_fold_probabilities(member, sources, batch_size=8, advance=lambda n: None)
    from cnn.pipeline import TTA_VIEWS, named_image_batches

    images = next(named_image_batches(sources, 16, 8))
    expected = np.mean([
        prior_adjusted_probabilities(np.mean([model.predict_on_batch(TTA_VIEWS[v](images)) for v in member.tta], axis=0), member.priors[f])
        for f, model in member.models.items()
    ], axis=0)
    np.testing.assert_allclose(outputs.diagnosis.to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(predictions.set_index("image_id").loc[predictions["image_id"][:5], columns].to_numpy(), expected, atol=1e-6)


def _the_diagnosis_stack_is_reported(run: Path) -> None:
    """The multi-class stack writes class probabilities with the class mix each fold model was fitted to, and the report judges it."""
    oof = pd.read_parquet(run / "stack" / "diagnosis_oof.parquet")
    probs, priors = oof[["prob_MEL", "prob_NV", "prob_BKL"]].to_numpy(), oof[["prior_MEL", "prior_NV", "prior_BKL"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(oof["prob"], oof["prob_MEL"])
    assert oof.groupby("fold")[["prior_MEL", "prior_NV", "prior_BKL"]].nunique().eq(1).all(axis=None)  # one mix per fold model
    np.testing.assert_allclose(priors.sum(axis=1), 1.0)
    report = json.loads((run / "report.json").read_text())
    entry = {e["name"]: e for e in report["multiclass"]}["diagnosis_stack"]
    assert entry["decision"] == "prior_adjusted" and entry["classes"] == ["MEL", "NV", "BKL"]
    assert "diagnosis_stack" in {e["name"] for e in report["entries"]}


def test_the_diagnosis_stack_learns_from_other_folds_only() -> None:
    """Relabelling a held-out fold's lesions changes nothing the stack says about them (no label leakage)."""
    from fusion.diagnosis_stack import cross_val_diagnosis_stack

    rng = np.random.default_rng(1)
    labels = pd.Series(rng.choice(["MEL", "NV", "BKL"], 240))
    features = pd.DataFrame({"cue": labels.map({"MEL": 0.0, "NV": 1.0, "BKL": 2.0}) + rng.normal(0, 0.5, 240), "noise": rng.normal(size=240)})
    folds = np.arange(240) % 4
    stack = cross_val_diagnosis_stack(features, labels, ("MEL", "NV", "BKL"), folds, test_features=features.iloc[:0])
    relabelled = labels.copy()
    relabelled[folds == 2] = rng.permutation(relabelled[folds == 2].to_numpy())
    again = cross_val_diagnosis_stack(features, relabelled, ("MEL", "NV", "BKL"), folds, test_features=features.iloc[:0])
    np.testing.assert_array_equal(stack.oof_probs[folds == 2], again.oof_probs[folds == 2])
    assert not np.array_equal(stack.oof_probs[folds == 0], again.oof_probs[folds == 0])  # the other folds did learn from them


def test_class_scores_of_a_run_without_test_rows(tmp_path: Path) -> None:
    """HAM10000 has no test split: the CNNs' test tables are empty and hold only `prob`."""
    from fusion.cnn_scores import cnn_class_score_table

    model = tmp_path / "cnn" / "small"
    model.mkdir(parents=True)
    oof = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["p", "q"], "fold": [0, 1], "prob": [0.2, 0.7],
                        "prob_MEL": [0.2, 0.7], "prob_NV": [0.7, 0.2], "prob_BKL": [0.1, 0.1]})
    oof.to_parquet(model / "oof.parquet")
    pd.DataFrame({"image_id": pd.Series([], dtype=str), "patient_id": pd.Series([], dtype=str), "prob": pd.Series([], dtype=float)}).to_parquet(model / "test.parquet")
    test = cnn_class_score_table(tmp_path, "test", pd.Series([], dtype=str))
    assert list(test.columns) == ["cnn_small_MEL", "cnn_small_NV", "cnn_small_BKL"] and test.empty
    train = cnn_class_score_table(tmp_path, "train", pd.Series(["b", "a"]))
    np.testing.assert_allclose(train["cnn_small_NV"], np.log([0.2, 0.7]))  # no recorded prior: the plain log-probability


def test_a_class_missing_from_a_folds_training_rows_gets_probability_and_prior_zero() -> None:
    from fusion.diagnosis_stack import cross_val_diagnosis_stack

    labels = pd.Series(["MEL", "NV"] * 30 + ["DF", "DF"])
    folds = np.array([0, 1, 2] * 20 + [2, 2])  # every dermatofibroma in fold 2: its fold model never saw one
    features = pd.DataFrame({"cue": np.arange(62) % 2 + (labels == "DF") * 3.0})
    stack = cross_val_diagnosis_stack(features, labels, ("MEL", "NV", "DF"), folds, test_features=features.iloc[:3])
    assert (stack.oof_probs[folds == 2, 2] == 0).all() and stack.fold_priors[2][2] == 0
    np.testing.assert_allclose([p.sum() for p in stack.fold_priors.values()], 1.0)
    adjusted = prior_adjusted_probabilities(stack.oof_probs[folds == 2], stack.fold_priors[2])
    assert np.isfinite(adjusted).all() and (adjusted[:, 2] == 0).all()
