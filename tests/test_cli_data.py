"""The data-facing commands on a tiny cohort with a corrupt image: a clear stop, or a recorded skip."""

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app


@pytest.fixture()
def cohort_with_corrupt_image(tmp_path: Path) -> tuple[Path, str]:
    from metadata.synth import SynthConfig, generate_cohort

    data = tmp_path / "data"
    cohort = generate_cohort(data, SynthConfig(patients=40, image_size=16, seed=3))
    bad = cohort[cohort["split"] == "train"]["image_name"].iloc[5]
    image = data / "jpeg" / "train" / f"{bad}.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    return data, bad


def test_corrupt_image_stops_folds_with_its_id(cohort_with_corrupt_image, tmp_path: Path) -> None:
    data, bad = cohort_with_corrupt_image
    result = CliRunner().invoke(app, ["folds", "--data", str(data), "--run", str(tmp_path / "run"), "--k", "3"])
    assert result.exit_code == 2
    assert bad in result.output.replace("\n", "")
    assert not (tmp_path / "run" / "folds.parquet").exists()


def test_skip_policy_records_and_leaves_out_the_image(cohort_with_corrupt_image, tmp_path: Path) -> None:
    data, bad = cohort_with_corrupt_image
    run = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(run), "--k", "3", "--on-bad-image", "skip"])
    assert result.exit_code == 0, result.output
    skipped = pd.read_csv(run / "skipped_images.csv")
    assert skipped["image_id"].tolist() == [bad]
    assert bad not in set(pd.read_parquet(run / "folds.parquet")["image_id"])
    # Later stages read the same decision from the run directory: the stack (zero CNNs) runs and counts it.
    result = runner.invoke(app, ["stack", "--data", str(data), "--run", str(run)])
    assert result.exit_code == 0, result.output
    import json

    assert json.loads((run / "report.json").read_text())["skipped_images"] == 1


def test_train_cnns_refuses_metadata_only_data(tmp_path: Path) -> None:
    data = tmp_path / "meta"
    data.mkdir()
    pd.DataFrame(
        {"image_name": ["a", "b"], "patient_id": ["p1", "p2"], "sex": ["male", "female"], "age_approx": [40, 50],
         "anatom_site_general_challenge": ["torso", "torso"], "target": [0, 1]}
    ).to_csv(data / "ISIC_2020_Training_GroundTruth.csv", index=False)
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["folds", "--data", str(data), "--run", str(run), "--k", "2"]).exit_code == 0
    result = runner.invoke(app, ["train-cnns", "--data", str(data), "--run", str(run), "--models", "small"])
    assert result.exit_code == 2 and "metadata-only" in result.output.replace("\n", " ")


def test_diagnosis_head_on_class_folders(tmp_path: Path) -> None:
    """A multi-class head on a class-folder set: OOF keeps every class probability; prob is MEL's."""
    import keras
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for split, per_class in (("Train", 8), ("Test", 2)):
        for k, name in enumerate(("melanoma", "nevus", "basal cell carcinoma")):
            folder = data / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.clip(rng.normal(60 + 70 * k, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{split}_{k}_{i}.jpg")
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["folds", "--data", str(data), "--run", str(run), "--k", "2", "--no-dedup"]).exit_code == 0
    result = runner.invoke(
        app,
        ["train-cnns", "--data", str(data), "--run", str(run), "--models", "small:16", "--epochs", "1",
         "--target", "diagnosis", "--loss", "focal", "--label-smoothing", "0.1", "--tta", "none,rot90", "--weight-decay", "0.01"],
    )
    assert result.exit_code == 0, result.output
    trained = keras.models.load_model(run / "cnn" / "small" / "fold0" / "model.keras")
    assert trained.optimizer.weight_decay == pytest.approx(0.01)
    oof = pd.read_parquet(run / "cnn" / "small" / "oof.parquet")
    assert len(oof) == 24 and {"prob_MEL", "prob_NV", "prob_BCC"} <= set(oof.columns)
    np.testing.assert_allclose(oof["prob"], oof["prob_MEL"])
    np.testing.assert_allclose(oof[["prob_MEL", "prob_NV", "prob_BCC"]].sum(axis=1), 1, atol=1e-5)
    test = pd.read_parquet(run / "cnn" / "small" / "test.parquet")
    assert len(test) == 6 and "prob_NV" in test.columns
