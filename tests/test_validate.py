"""`validate` measures a bundle's promise on labelled data it never saw; `predict` says which promise each lesion got."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cli import app
from ensemble.bundle import Bundle, load_bundle
from ensemble.predict import image_folder_rows, score_patients, scoring_rows
from fusion.stack_model import StackModel
from rundir.layout import BundleLayout


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def unseen_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Labelled patients the run never saw: the generator of the run's cohort, another seed."""
    from metadata.synth import SynthConfig, generate_cohort

    out = tmp_path_factory.mktemp("unseen")
    generate_cohort(out, SynthConfig(patients=60, image_size=32, seed=21))
    return out


def _no_op(_: int) -> None:
    """A progress callback for scoring outside the CLI."""


def _validate(bundle_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(
        app, ["validate", "--bundle", str(bundle_dir), "--data", str(data), "--split", "train", "--out", str(out), "--bootstrap", "200", *extra]
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert (out / "validation.md").read_text().startswith("# External validation")
    return json.loads((out / "validation.json").read_text())


def test_validation_figures_equal_a_by_hand_computation(bundle_dir: Path, bundle: Bundle, unseen_cohort: Path, tmp_path: Path) -> None:
    report = _validate(bundle_dir, unseen_cohort, tmp_path / "val")
    rows = scoring_rows(unseen_cohort, None, split="train")
    patients = score_patients(bundle, rows, batch_size=32, advance=_no_op)
    scored = patients.predictions.merge(rows[["image_id", "target"]], on="image_id")
    y, p, alert = scored["target"].to_numpy(int), scored["melanoma_probability"].to_numpy(), scored["alert"].to_numpy()
    assert report["n_images"] == len(rows) and report["n_melanoma"] == y.sum()
    assert report["mel_auc"] == pytest.approx(roc_auc_score(y, p))
    assert report["alert_rate"] == pytest.approx(alert.mean())
    member_scores = patients.cnn_scores.reindex(scored["image_id"])
    assert report["mel_auc_per_cnn"] == pytest.approx({m.name: roc_auc_score(y, member_scores[f"cnn_{m.name}"]) for m in bundle.cnns})
    assert len(report["mel_auc_per_cnn"]) == len(bundle.cnns) >= 1
    assert report["mel_auc_cnn_only"] == pytest.approx(roc_auc_score(y, member_scores.mean(axis=1)))
    assert report["sensitivity_at_alert"] == pytest.approx(alert[y == 1].mean())
    assert report["specificity_at_alert"] == pytest.approx(1 - alert[y == 0].mean())
    bins = np.minimum((p * 10).astype(int), 9)
    ece = sum(abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).sum() for b in np.unique(bins)) / len(p)
    assert report["ece"] == pytest.approx(ece)
    for point in report["operating_points"]:
        lesions = scored[scored["operating_point"] == point["pattern"]]
        promised = bundle.operating_points[point["pattern"]]
        assert point["threshold"] == promised.threshold and point["promised_sensitivity"] == promised.oof_sensitivity
        assert point["n_images"] == len(lesions)
        assert point["sensitivity"] == pytest.approx(lesions.loc[lesions["target"] == 1, "alert"].mean())
    assert set(report) >= {"mel_auc", "ece", "alert_rate", "n_images", "n_melanoma", "operating_points"}


def test_validation_warns_when_the_promise_breaks(bundle_dir: Path, unseen_cohort: Path, tmp_path: Path) -> None:
    """With the labels shuffled the alerts catch melanomas at the alert rate only: far below the promised sensitivity."""
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "jpeg").symlink_to(unseen_cohort / "jpeg")
    shutil.copy(unseen_cohort / "test.csv", shuffled / "test.csv")
    train = pd.read_csv(unseen_cohort / "train.csv", dtype=str)
    train.assign(target=train["target"].sample(frac=1, random_state=0).to_numpy()).to_csv(shuffled / "train.csv", index=False)
    honest = _validate(bundle_dir, unseen_cohort, tmp_path / "honest")
    broken = _validate(bundle_dir, shuffled, tmp_path / "broken")
    assert broken["warnings"] and all("below the promised" in w for w in broken["warnings"])
    assert broken["sensitivity_at_alert"] < honest["sensitivity_at_alert"]
    assert "warning" in (tmp_path / "broken" / "validation.md").read_text()


def test_validation_without_metadata_judges_every_lesion_as_alone_and_unknown(bundle_dir: Path, unseen_cohort: Path, tmp_path: Path) -> None:
    report = _validate(bundle_dir, unseen_cohort, tmp_path / "none", "--metadata-mode", "none")
    assert [p["pattern"] for p in report["operating_points"]] == ["no_metadata+single_lesion"]
    assert report["n_patients"] == report["n_images"]


def test_predict_records_the_operating_point_of_each_lesion(bundle_dir: Path, bundle: Bundle, unseen_cohort: Path) -> None:
    rows = scoring_rows(unseen_cohort, None, split="train")
    rows.loc[rows.index[:5], "age"] = np.nan
    alone = rows["patient_id"].iloc[5]
    rows.loc[rows["patient_id"] == alone, "patient_id"] = rows["image_id"]  # that patient's lesions, each alone
    predictions = score_patients(bundle, rows, batch_size=32, advance=_no_op).predictions.set_index("image_id")
    stack = StackModel.load(BundleLayout(bundle_dir).stack_model.root)
    n_missing = rows[["age", "sex", "site"]].isna().sum(axis=1).to_numpy()
    assert (n_missing[:5] >= 1).all()
    expected = pd.Series(np.select([n_missing == 0, n_missing == 3], ["complete", "no_metadata"], "partial"), index=rows["image_id"])
    expected[rows.loc[rows["patient_id"] == rows["image_id"], "image_id"]] += "+single_lesion"
    assert (predictions["pattern"] == expected.reindex(predictions.index)).all()
    source = expected.map(stack.pattern_sources).reindex(predictions.index)
    assert (predictions["operating_point"] == source).all()
    thresholds = source.map(lambda name: stack.operating_points[name].threshold)
    assert (predictions["alert_threshold"] == thresholds).all()
    assert (predictions["alert"] == (predictions["melanoma_probability"] >= thresholds).astype(int)).all()


def test_shift_warning_fires_on_images_from_another_camera_only(bundle: Bundle, unseen_cohort: Path, tmp_path: Path) -> None:
    from metadata.synth import SynthConfig, generate_cohort

    cast = generate_cohort(tmp_path / "cast", SynthConfig(patients=20, image_size=32, seed=22, colour_cast=(1.35, 1.0, 0.7)))
    assert len(cast) >= 40
    same_camera = image_folder_rows(unseen_cohort / "jpeg" / "train", unseen_cohort / "train.csv")
    other_camera = image_folder_rows(tmp_path / "cast" / "jpeg" / "train", tmp_path / "cast" / "train.csv")
    assert score_patients(bundle, same_camera, batch_size=32, advance=_no_op).shift_warnings == []
    warnings = score_patients(bundle, other_camera, batch_size=32, advance=_no_op).shift_warnings
    assert any(w.startswith("red:") for w in warnings) and any(w.startswith("blue:") for w in warnings)
