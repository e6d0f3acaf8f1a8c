"""`export`: a self-contained bundle that reproduces the run, refuses tampering, and carries its operating point."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from cli import app
from ensemble.bundle import BundleError, verify_bundle
from errors import UserError
from evaluation.operating_point import choose_operating_point, sensitivity_at, specificity_at, threshold_for_sensitivity
from fusion.missingness import PATTERNS
from fusion.stack_model import StackModel
from rundir.layout import BUNDLE_MANIFEST_FILE, BundleLayout

REPO = Path(__file__).resolve().parents[1]


def test_bundle_reproduces_the_runs_test_predictions_in_a_fresh_process(
    cohort_dir: Path, pipeline_run: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    moved = shutil.copytree(bundle_dir, tmp_path / "elsewhere" / "bundle")  # nothing may point back into the run
    out = tmp_path / "out"
    command = [sys.executable, "cli.py", "predict", "--bundle", str(moved), "--data", str(cohort_dir), "--split", "test", "--out", str(out)]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    predictions = pd.read_csv(out / "predictions.csv", dtype={"image_id": str, "patient_id": str})
    expected = pd.read_parquet(pipeline_run / "stack" / "test.parquet")
    assert sorted(predictions["image_id"]) == sorted(expected["image_id"])
    merged = expected.merge(predictions, on="image_id", suffixes=("_run", ""))
    np.testing.assert_allclose(merged["melanoma_probability"], merged["prob"], rtol=0, atol=1e-6)
    assert (merged["patient_id"] == merged["patient_id_run"]).all()
    points = StackModel.load(BundleLayout(moved).stack_model.root).operating_points
    assert (predictions["alert_threshold"] == predictions["operating_point"].map(lambda name: points[name].threshold)).all()
    assert (predictions["alert"] == (predictions["melanoma_probability"] >= predictions["alert_threshold"])).all()
    assert (merged["pattern"] == merged["pattern_run"]).all()  # the same lesions, judged by the same operating points
    for _, lesions in predictions.groupby("patient_id"):
        by_risk = lesions.sort_values("melanoma_probability", ascending=False)
        assert by_risk["rank_in_patient"].iloc[0] == 1 and by_risk["rank_in_patient"].is_monotonic_increasing


def test_bundle_holds_no_pickles_and_lists_every_file(bundle_dir: Path) -> None:
    manifest = verify_bundle(bundle_dir)
    files = {p.relative_to(bundle_dir).as_posix() for p in bundle_dir.rglob("*") if p.is_file()}
    assert files - set(manifest["files"]) == {BUNDLE_MANIFEST_FILE}
    assert {Path(f).suffix for f in files} == {".json", ".keras", ".txt"}
    config = json.loads((bundle_dir / "config.json").read_text())
    assert [c["name"] for c in config["cnns"]] == ["mobilenet_v3_small", "small"]
    assert all(c["image_size"] == 32 and c["tta"] == ["none", "hflip", "vflip"] for c in config["cnns"])
    assert {"keras", "tensorflow", "lightgbm"} <= set(manifest["versions"])


@pytest.mark.parametrize("victim", ["config.json", "stack/model_fold1.txt", "cnn/small/fold0.keras"])
def test_tampered_bundle_is_refused(cohort_dir: Path, bundle_dir: Path, tmp_path: Path, victim: str) -> None:
    tampered = shutil.copytree(bundle_dir, tmp_path / "bundle")
    with open(tampered / victim, "ab") as handle:
        handle.write(b" ")
    with pytest.raises(BundleError, match="checksum differs"):
        verify_bundle(tampered)
    images = cohort_dir / "jpeg" / "test"
    result = CliRunner().invoke(app, ["predict", "--bundle", str(tampered), "--images", str(images), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and victim.split("/")[-1] in result.output.replace("\n", "")
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_bundle_missing_a_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    incomplete = shutil.copytree(bundle_dir, tmp_path / "bundle")
    (incomplete / "stack" / "model_fold0.txt").unlink()
    with pytest.raises(BundleError, match="missing"):
        verify_bundle(incomplete)


def _stack_only_run(cohort_dir: Path, pipeline_run: Path, run: Path) -> Path:
    """A run with the pipeline's folds and a zero-CNN (metadata-only) stack."""
    run.mkdir()
    shutil.copy(pipeline_run / "folds.parquet", run / "folds.parquet")
    result = CliRunner().invoke(app, ["stack", "--data", str(cohort_dir), "--run", str(run), "--rounds", "20"])
    assert result.exit_code == 0, result.output
    return run


def test_export_refuses_a_run_without_stack_or_cnns(cohort_dir: Path, pipeline_run: Path, tmp_path: Path) -> None:
    no_stack = tmp_path / "no_stack"
    shutil.copytree(pipeline_run, no_stack, ignore=shutil.ignore_patterns("stack"))
    no_cnn = _stack_only_run(cohort_dir, pipeline_run, tmp_path / "no_cnn")
    for run, advice in ((no_stack, "cli.py stack"), (no_cnn, "train-cnns")):
        result = CliRunner().invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / f"{run.name}_bundle")])
        assert result.exit_code == 2 and advice in result.output.replace("\n", ""), result.output
        assert not (tmp_path / f"{run.name}_bundle").exists()


def test_export_refuses_to_overwrite(pipeline_run: Path, bundle_dir: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--run", str(pipeline_run), "--out", str(bundle_dir)])
    assert result.exit_code == 2 and "not empty" in result.output
    verify_bundle(bundle_dir)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_is_the_highest_that_reaches_the_target_sensitivity(target: float) -> None:
    rng = np.random.default_rng(int(target * 100))
    y = (rng.random(400) < 0.15).astype(int)
    scores = np.round(rng.random(400) + y * 0.5, 2)  # rounding makes ties, as boosted trees do
    threshold = threshold_for_sensitivity(y, scores, target)
    assert sensitivity_at(y, scores, threshold) >= target
    next_higher = scores[(y == 1) & (scores > threshold)].min(initial=np.inf)
    assert not sensitivity_at(y, scores, next_higher) >= target


def test_threshold_refuses_an_impossible_target() -> None:
    with pytest.raises(UserError, match="sensitivity"):
        threshold_for_sensitivity(np.array([0, 1]), np.array([0.1, 0.9]), 1.5)
    with pytest.raises(UserError, match="no melanoma"):
        threshold_for_sensitivity(np.array([0, 0]), np.array([0.1, 0.9]), 0.95)


def test_each_bundled_operating_point_holds_on_the_oof_rows_of_its_pattern(pipeline_run: Path, bundle_dir: Path) -> None:
    stack = StackModel.load(BundleLayout(bundle_dir).stack_model.root)
    masked = pd.read_parquet(pipeline_run / "stack" / "masked_oof.parquet")
    assert set(stack.pattern_sources) == set(PATTERNS)
    for name, point in ((name, point.to_json()) for name, point in stack.operating_points.items()):
        rows = masked[masked["pattern"] == name]
        y, scores = rows["target"].to_numpy(dtype=int), rows["prob"].to_numpy()
        assert point["target_sensitivity"] == 0.95
        assert sensitivity_at(y, scores, point["threshold"]) >= 0.95, name
        assert point["oof_specificity"] == pytest.approx(specificity_at(y, scores, point["threshold"]))
        low, high = point["oof_specificity_ci"]
        assert 0 <= low < point["oof_specificity"] < high <= 1
        assert point["n_patients"] == rows["patient_id"].nunique() and point["n_images"] == len(rows)


# The tolerance below which a stack, trained on (nearly) complete metadata and scored with every
# input but the images masked, may rank under the CNN alone on the same OOF rows: tree stacks split a
# continuous score into steps, which costs a little AUC where the CNN is all they have.
MASKED_AUC_TOLERANCE = 0.02


def test_with_all_metadata_masked_the_stack_ranks_like_the_cnns_and_keeps_its_sensitivity(pipeline_run: Path, bundle_dir: Path) -> None:
    """The synthetic cohort has age for every row, sex and site for 97% and 95%: the stack learns mostly from complete rows."""
    masked = pd.read_parquet(pipeline_run / "stack" / "masked_oof.parquet")
    cnn = {p.parent.name: pd.read_parquet(p).set_index("image_id")["prob"] for p in (pipeline_run / "cnn").glob("*/oof.parquet")}
    point = StackModel.load(BundleLayout(bundle_dir).stack_model.root).operating_points["no_metadata+single_lesion"].to_json()
    rows = masked[masked["pattern"] == "no_metadata+single_lesion"]
    y = rows["target"].to_numpy(dtype=int)
    assert len(rows) == len(pd.read_parquet(pipeline_run / "stack" / "oof.parquet"))  # every OOF image, masked
    best_cnn_auc = max(roc_auc_score(y, scores.reindex(rows["image_id"])) for scores in cnn.values())
    assert roc_auc_score(y, rows["prob"]) >= best_cnn_auc - MASKED_AUC_TOLERANCE
    assert sensitivity_at(y, rows["prob"].to_numpy(), point["threshold"]) >= 0.95


def test_specificity_interval_resamples_patients() -> None:
    """Lesions of one patient move together: resampling patients must give a wider interval than images."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(60), 8)
    y = (rng.random(480) < 0.1).astype(int)
    scores = np.repeat(rng.random(60), 8) + 0.6 * y  # a patient's benign lesions share their score
    by_patient = choose_operating_point(y, scores, patients, 0.9, n_boot=300)
    by_image = choose_operating_point(y, scores, np.arange(480), 0.9, n_boot=300)
    assert by_patient.threshold == by_image.threshold
    width = lambda point: point.oof_specificity_ci[1] - point.oof_specificity_ci[0]  # noqa: E731
    assert width(by_patient) > 1.5 * width(by_image)
