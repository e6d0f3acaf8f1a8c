"""End to end on the synthetic cohort: folds -> two CNNs -> stack -> report -> submission."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from evaluation.metrics import roc_auc
from fusion.stacker import build_stack_features, cross_val_stack
from metadata.dataset import load_dataset
from metadata.folds import attach_folds

MODELS = ("small", "mobilenet_v3_small")


def test_oof_covers_every_training_image_once(cohort_dir: Path, pipeline_run: Path) -> None:
    table = load_dataset(cohort_dir).table
    train_ids = set(table.loc[table["split"] == "train", "image_id"])
    test_ids = set(table.loc[table["split"] == "test", "image_id"])
    folds = pd.read_parquet(pipeline_run / "folds.parquet").set_index("image_id")["fold"]
    for model in MODELS:
        oof = pd.read_parquet(pipeline_run / "cnn" / model / "oof.parquet")
        assert not oof["image_id"].duplicated().any() and set(oof["image_id"]) == train_ids
        assert (oof.set_index("image_id")["fold"] == folds.reindex(oof["image_id"])).all()
        assert oof["prob"].between(0, 1).all()
        test = pd.read_parquet(pipeline_run / "cnn" / model / "test.parquet")
        assert not test["image_id"].duplicated().any() and set(test["image_id"]) == test_ids
        np.testing.assert_allclose(test["prob"], test.filter(like="prob_fold").mean(axis=1))
        for fold in range(3):
            assert (pipeline_run / "cnn" / model / f"fold{fold}" / "model.keras").exists()
    stack = pd.read_parquet(pipeline_run / "stack" / "oof.parquet")
    assert set(stack["image_id"]) == train_ids and stack["prob"].notna().all()


def test_submission_has_every_test_image_once(cohort_dir: Path, pipeline_run: Path) -> None:
    table = load_dataset(cohort_dir).table
    submission = pd.read_csv(pipeline_run / "submission.csv")
    assert list(submission.columns) == ["image_name", "target"]
    assert sorted(submission["image_name"]) == sorted(table.loc[table["split"] == "test", "image_id"])
    assert submission["target"].between(0, 1).all()
    assert len(list((pipeline_run / "stack").glob("model_fold*.txt"))) == 3


def test_report_lists_every_model_and_the_stack_beats_them(pipeline_run: Path) -> None:
    report = json.loads((pipeline_run / "report.json").read_text())
    entries = {e["name"]: e for e in report["entries"]}
    assert set(entries) == {*MODELS, "mean_blend", "rank_blend", "logreg_stack", "lightgbm_stack"}
    assert {e["kind"] for e in entries.values()} == {"cnn", "blend", "stack"}
    for entry in entries.values():
        assert len(entry["fold_auc"]) == 3 and 0 <= entry["pauc_80tpr"] <= 0.2
    stack_auc = entries["lightgbm_stack"]["auc"]
    others = [e["auc"] for e in entries.values() if e["kind"] != "stack"]
    # The designed metadata + patient-context signal is recovered: the stack wins with margin.
    assert stack_auc >= max(others) + 0.02, (stack_auc, others)
    html = (pipeline_run / "report.html").read_text()
    assert "lightgbm_stack" in html and "data:image/png;base64," in html


def _stack_inputs(cohort_dir: Path, run: Path):
    from cnn.outputs import run_cnn_outputs
    from fusion.cnn_scores import CnnScales

    table = load_dataset(cohort_dir).table
    train = attach_folds(table, pd.read_parquet(run / "folds.parquet"), "folds")
    oof = run_cnn_outputs(run, "train", train["image_id"])
    features = build_stack_features(train, CnnScales.fit(oof).oof_scores(oof))
    return train, features


def test_shuffled_label_control_scores_near_chance(cohort_dir: Path, pipeline_run: Path) -> None:
    train, features = _stack_inputs(cohort_dir, pipeline_run)
    folds = train["fold"].to_numpy()
    real = train["target"].to_numpy(dtype=int)
    for seed in (0, 1):
        shuffled = np.random.default_rng(seed).permutation(real)
        result = cross_val_stack(features, shuffled, folds, features.iloc[:0], seed=seed)
        assert abs(roc_auc(shuffled, result.oof_probs) - 0.5) < 0.12
    result = cross_val_stack(features, real, folds, features.iloc[:0])
    assert roc_auc(real, result.oof_probs) > 0.75


def test_patient_context_adds_signal(cohort_dir: Path, pipeline_run: Path) -> None:
    train, features = _stack_inputs(cohort_dir, pipeline_run)
    folds, target = train["fold"].to_numpy(), train["target"].to_numpy(dtype=int)
    without = features.drop(columns=[c for c in features.columns if "patient" in c])
    auc_with = roc_auc(target, cross_val_stack(features, target, folds, features.iloc[:0]).oof_probs)
    auc_without = roc_auc(target, cross_val_stack(without, target, folds, features.iloc[:0]).oof_probs)
    assert auc_with > auc_without, (auc_with, auc_without)


def test_rerun_skips_finished_pairs(cohort_dir: Path, pipeline_run: Path) -> None:
    from cli import app

    model_file = pipeline_run / "cnn" / "small" / "fold0" / "model.keras"
    before = model_file.stat().st_mtime_ns
    oof_before = pd.read_parquet(pipeline_run / "cnn" / "small" / "oof.parquet")
    result = CliRunner().invoke(
        app, ["train-cnns", "--data", str(cohort_dir), "--run", str(pipeline_run), "--models", "small", "--image-size", "32"]
    )
    assert result.exit_code == 0, result.output
    assert model_file.stat().st_mtime_ns == before
    pd.testing.assert_frame_equal(oof_before, pd.read_parquet(pipeline_run / "cnn" / "small" / "oof.parquet"))


@pytest.mark.parametrize("command", ["synth", "folds", "train-cnns", "stack", "report", "demo"])
def test_every_command_has_help(command: str) -> None:
    from cli import app

    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--" in result.output
