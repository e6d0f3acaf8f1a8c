"""The ISIC 2024 layout end to end: synth -> inspect -> folds -> train-cnns -> stack -> submit -> export -> predict."""

import json
from pathlib import Path

import h5py
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from fusion.stack_model import StackModel
from metadata.synth import SynthConfig, generate_cohort


@pytest.fixture(scope="module")
def cohort_2024(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("isic2024")
    generate_cohort(out, SynthConfig(layout="isic2024", images=600, image_size=16, seed=5, prevalence=0.06))
    return out


def test_synth_writes_the_isic2024_layout(cohort_2024: Path) -> None:
    train = pd.read_csv(cohort_2024 / "train-metadata.csv")
    test = pd.read_csv(cohort_2024 / "test-metadata.csv")
    assert len(train) == 600 and "target" not in test.columns
    assert list(train.columns[:6]) == ["isic_id", "patient_id", "age_approx", "sex", "anatom_site_general", "target"]
    assert sum(c.startswith("tbp_lv_") for c in train.columns) == 5
    assert not set(train["patient_id"]) & set(test["patient_id"])
    with h5py.File(cohort_2024 / "train-image.hdf5") as images:
        assert set(images) == set(train["isic_id"]) and bytes(images[train["isic_id"][0]][()])[:2] == b"\xff\xd8"  # JPEG
    counts = train.groupby("patient_id").size()
    assert counts.max() > 4 * counts.median()  # heavy-tailed lesions per patient
    melanoma_area = train.loc[train["target"] == 1, "tbp_lv_areaMM2"].median()
    assert melanoma_area > train.loc[train["target"] == 0, "tbp_lv_areaMM2"].median()  # tbp columns carry signal


def test_synth_prevalence_and_image_count_are_what_was_asked(tmp_path: Path) -> None:
    cohort = generate_cohort(tmp_path, SynthConfig(layout="isic2024", images=3000, image_size=8, seed=1, prevalence=0.05))
    train = cohort[cohort["split"] == "train"]
    assert len(train) == 3000 and 0.03 < train["target"].mean() < 0.07


def test_isic2024_round_trip(cohort_2024: Path, tmp_path: Path) -> None:
    run, bundle, runner = tmp_path / "run", tmp_path / "bundle", CliRunner()
    common = ["--data", str(cohort_2024), "--run", str(run)]
    steps = [
        ["inspect", "--data", str(cohort_2024)],
        ["folds", *common, "--k", "3"],
        ["train-cnns", *common, "--models", "small", "--image-size", "16", "--epochs", "1", "--negatives-per-patient", "20"],
        ["stack", *common],
        ["submit", "--run", str(run), "--submission-format", "isic2024"],
        ["export", "--run", str(run), "--out", str(bundle)],
        ["predict", "--bundle", str(bundle), "--data", str(cohort_2024), "--split", "test", "--out", str(tmp_path / "pred")],
    ]
    for step in steps:
        result = runner.invoke(app, step)
        assert result.exit_code == 0, f"{step[0]}:\n{result.output}\n{result.exception!r}"
    test_ids = pd.read_csv(cohort_2024 / "test-metadata.csv")["isic_id"]
    submission = pd.read_csv(run / "submission.csv")
    assert list(submission.columns) == ["isic_id", "target"] and sorted(submission["isic_id"]) == sorted(test_ids)
    assert (run / "submission_isic2024.csv").read_text() == (run / "submission.csv").read_text()
    predictions = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert sorted(predictions["image_id"]) == sorted(test_ids)
    features = StackModel.load(run / "stack").features
    assert "tbp_lv_areaMM2" in features
    history = json.loads((run / "cnn" / "small" / "fold0" / "history.json").read_text())
    assert history["sampling"]["negatives_per_patient"] == 20
