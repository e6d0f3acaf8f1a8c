"""`predict`: new patients from a folder of images, with partial or no metadata; Grad-CAM explanations."""

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from cnn.gradcam import GradCam, gradcam_map
from ensemble.bundle import Bundle, load_bundle
from ensemble.explain import ensemble_heatmaps, overlay_name, patient_page_name
from ensemble.predict import image_folder_rows, missing_metadata, rank_within_patient, score_patients
from errors import DataError


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def test_rows(cohort_dir: Path) -> pd.DataFrame:
    """The cohort's test.csv: SIIM-ISIC 2020 headers (image_name, patient_id, age_approx, ...)."""
    return pd.read_csv(cohort_dir / "test.csv", dtype=str)


def _image_folder(cohort_dir: Path, image_ids: list[str], folder: Path) -> Path:
    folder.mkdir()
    for image_id in image_ids:
        shutil.copy(cohort_dir / "jpeg" / "test" / f"{image_id}.jpg", folder)
    return folder


def _no_op(_: int) -> None:
    """A progress callback for scoring outside the CLI."""


def test_predict_images_without_metadata(cohort_dir: Path, bundle_dir: Path, test_rows: pd.DataFrame, tmp_path: Path) -> None:
    images = _image_folder(cohort_dir, test_rows["image_name"].head(12).tolist(), tmp_path / "images")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", "--bundle", str(bundle_dir), "--images", str(images), "--out", str(out)])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    predictions = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False)
    assert sorted(predictions["image_id"]) == sorted(test_rows["image_name"].head(12))
    assert (predictions["patient_id"] == predictions["image_id"]).all()  # each image its own patient
    assert (predictions["rank_in_patient"] == "1").all()
    assert (predictions["missing_metadata"] == "age sex site").all()
    assert predictions["melanoma_probability"].astype(float).between(0, 1).all()
    assert "12 of 12 image(s) have no age" in result.output and "scored as missing" in result.output.replace("\n", " ")


def test_metadata_csv_restores_the_runs_predictions(
    cohort_dir: Path, pipeline_run: Path, bundle: Bundle, test_rows: pd.DataFrame
) -> None:
    """Images plus the cohort's own metadata CSV score exactly as the run's test set: patients, ages, sites joined."""
    rows = image_folder_rows(cohort_dir / "jpeg" / "test", cohort_dir / "test.csv")
    scored = score_patients(bundle, rows, batch_size=32, advance=_no_op).predictions
    expected = pd.read_parquet(pipeline_run / "stack" / "test.parquet").merge(scored, on="image_id")
    assert len(expected) == len(test_rows)
    np.testing.assert_allclose(expected["melanoma_probability"], expected["prob"], rtol=0, atol=1e-6)
    assert (expected["patient_id_x"] == expected["patient_id_y"].astype(str)).all()


def test_partial_metadata_is_used_where_given_and_flagged_where_not(
    cohort_dir: Path, test_rows: pd.DataFrame, tmp_path: Path
) -> None:
    csv = tmp_path / "metadata.csv"
    given = test_rows.iloc[::2]
    given.to_csv(csv, index=False)
    rows = image_folder_rows(cohort_dir / "jpeg" / "test", csv)
    flagged = missing_metadata(rows.set_index("image_id"))
    with_csv = rows["image_id"].isin(given["image_name"]).to_numpy()
    patient_in_csv = given.set_index("image_name")["patient_id"]
    assert (rows.loc[with_csv, "patient_id"].to_numpy() == patient_in_csv.loc[rows.loc[with_csv, "image_id"]].to_numpy()).all()
    assert (rows.loc[~with_csv, "patient_id"] == rows.loc[~with_csv, "image_id"]).all()
    assert (flagged[~with_csv] == "age sex site").all()
    assert not flagged[with_csv].str.contains("age").any()


def test_metadata_csv_that_names_no_image_is_refused(cohort_dir: Path, tmp_path: Path) -> None:
    csv = tmp_path / "metadata.csv"
    pd.DataFrame({"image_name": ["ISIC_0000000.jpg"], "age_approx": ["40"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="no row names an image"):
        image_folder_rows(cohort_dir / "jpeg" / "test", csv)
    pd.DataFrame({"file": ["x"]}).to_csv(csv, index=False)
    with pytest.raises(DataError, match="no image id column"):
        image_folder_rows(cohort_dir / "jpeg" / "test", csv)


def test_undecodable_image_is_named(cohort_dir: Path, bundle: Bundle, test_rows: pd.DataFrame, tmp_path: Path) -> None:
    images = _image_folder(cohort_dir, test_rows["image_name"].head(3).tolist(), tmp_path / "images")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg: cannot be read or decoded"):
        score_patients(bundle, image_folder_rows(images), batch_size=2, advance=_no_op)


def test_rank_within_patient_counts_from_the_riskiest() -> None:
    patients = pd.Series(["a", "b", "a", "a", "b"])
    probability = pd.Series([0.2, 0.1, 0.9, 0.5, 0.3])
    assert rank_within_patient(patients, probability).tolist() == [3, 2, 1, 2, 1]


def test_gradcam_map_points_at_the_evidence() -> None:
    feature_map = np.zeros((4, 4, 2))
    feature_map[1, 2, 0] = 3.0  # channel 0 (positive gradient) fires at one position
    feature_map[:, :, 1] = 1.0
    gradients = np.stack([np.full((4, 4), 0.5), np.full((4, 4), -0.1)], axis=-1)
    heat = gradcam_map(feature_map, gradients)
    assert heat[1, 2] == 1.0 and np.unravel_index(heat.argmax(), heat.shape) == (1, 2)
    assert heat.min() == 0.0


def test_gradcam_has_the_images_size_and_is_not_constant(cohort_dir: Path, bundle: Bundle, test_rows: pd.DataFrame, tmp_path: Path) -> None:
    """Every fold model of both backbone kinds (compact CNN, keras.applications) explains a non-square image."""
    source = Image.open(cohort_dir / "jpeg" / "test" / f"{test_rows['image_name'].iloc[0]}.jpg")
    odd = tmp_path / "odd.png"
    source.resize((56, 40)).save(odd)
    encoded = odd.read_bytes()
    for member in bundle.cnns:
        gradcams = [((member.image_size, member.color_constancy), GradCam(model, member.target.classes.index("MEL"))) for model in member.models.values()]
        [(image, heat)] = ensemble_heatmaps(gradcams, [encoded])
        assert image.shape == (40, 56, 3) and heat.shape == (40, 56), member.name
        assert heat.max() - heat.min() > 0.1, member.name
        assert 0 <= heat.min() and heat.max() <= 1


def test_explain_writes_an_overlay_per_alert_and_a_page_per_patient(
    cohort_dir: Path, bundle_dir: Path, test_rows: pd.DataFrame, tmp_path: Path
) -> None:
    patients = test_rows["patient_id"].unique()[:3]
    chosen = test_rows[test_rows["patient_id"].isin(patients)]
    images = _image_folder(cohort_dir, chosen["image_name"].tolist(), tmp_path / "images")
    csv = tmp_path / "metadata.csv"
    chosen.to_csv(csv, index=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["predict", "--bundle", str(bundle_dir), "--images", str(images), "--metadata", str(csv), "--out", str(out), "--explain"]
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str, "patient_id": str})
    alerted = predictions.loc[predictions["alert"] == 1, "image_id"]
    assert len(alerted), "the 95%-sensitivity threshold alerts some of these lesions"
    overlays = {p.name for p in (out / "explain").glob("*.png")}
    assert overlays == {overlay_name(i) for i in alerted}
    for image_id in alerted:
        assert Image.open(out / "explain" / overlay_name(image_id)).size == Image.open(images / f"{image_id}.jpg").size
    for patient_id, lesions in predictions.groupby("patient_id"):
        page = (out / "explain" / patient_page_name(patient_id)).read_text()
        listed = re.findall(r"<td>(ISIC_\d+)</td>", page)
        assert listed == lesions.sort_values("melanoma_probability", ascending=False)["image_id"].tolist()
        assert page.count("<img ") == int(lesions["alert"].sum())
    index = (out / "explain" / "index.html").read_text()
    assert all(patient_page_name(p) in index for p in patients)


@pytest.mark.parametrize("command", ["export", "predict"])
def test_commands_have_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--out" in result.output
