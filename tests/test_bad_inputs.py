"""Messy or hostile inputs get one clear message (or a recorded, counted skip), never a silent wrong result or a traceback."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def _copy(cohort: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    return data


def _flat(output: str) -> str:
    """The output as one line, without the frame rich draws around usage errors."""
    return " ".join(output.replace("│", " ").split())


def _jpeg_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes(), quality=100)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_every_viewer_does(orientation: int, tmp_path: Path) -> None:
    import tensorflow as tf

    from cnn.pipeline import decode_image
    from metadata.duplicates import _fingerprint_one
    from metadata.images import ImageBytesReader

    landscape = np.zeros((20, 40, 3), np.uint8)
    landscape[:, :10] = 255
    landscape[:5, :, 1] = 255  # no symmetry left: every orientation looks different
    encoded = _jpeg_with_orientation(landscape, orientation)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))).convert("RGB")
    expected = np.asarray(upright.resize((16, 16), Image.BILINEAR), dtype=float)
    assert np.abs(decode_image(tf.constant(encoded), 16).numpy() - expected).mean() < 4
    # the duplicate scan hashes the upright image too: a photo and its upright copy are duplicates
    (tmp_path / "tagged.jpg").write_bytes(encoded)
    upright.save(tmp_path / "upright.png")
    with ImageBytesReader() as reader:
        tagged, plain = (_fingerprint_one(n, str(tmp_path / n), reader) for n in ("tagged.jpg", "upright.png"))
    assert tagged.phash == plain.phash


@pytest.mark.parametrize("age", ["-5", "300"])
def test_an_impossible_age_is_refused_naming_the_row(tiny_cohort: Path, tmp_path: Path, age: str) -> None:
    data = _copy(tiny_cohort, tmp_path)
    train = pd.read_csv(data / "train.csv", dtype=str)
    train.loc[3, "age_approx"] = age
    train.to_csv(data / "train.csv", index=False)
    result = runner.invoke(app, ["inspect", "--data", str(data)])
    assert result.exit_code != 0 and "row 5 has age_approx=" in _flat(result.output) and "outside 0-120 years" in _flat(result.output)
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(tmp_path / "run"), "--no-dedup"])
    assert result.exit_code == 2 and "outside 0-120 years" in _flat(result.output) and "Traceback" not in result.output


def test_a_single_class_training_set_is_refused_at_folds(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    train = pd.read_csv(data / "train.csv", dtype=str)
    train = train.assign(target="0", diagnosis="nevus", benign_malignant="benign")
    train.to_csv(data / "train.csv", index=False)
    run = tmp_path / "run"
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(run), "--no-dedup"])
    assert result.exit_code == 2 and "only target 0 (no melanoma)" in _flat(result.output) and "add images of both classes" in _flat(result.output)
    assert not (run / "folds.parquet").exists()


def test_a_run_that_is_a_file_is_refused_before_any_work(tiny_cohort: Path, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "run.txt"
    not_a_folder.write_text("x")
    for command in (["folds", "--data", str(tiny_cohort)], ["stack", "--data", str(tiny_cohort)], ["status"], ["submit", "--submission-format", "isic2020"]):
        result = runner.invoke(app, [*command, "--run", str(not_a_folder)])
        assert result.exit_code == 2 and "is a file; name a folder" in _flat(result.output), (command, result.output)


def test_one_patient_larger_than_a_fold_is_said_plainly(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    train = pd.read_csv(data / "train.csv", dtype=str)
    train.loc[: int(len(train) * 0.6), "patient_id"] = "IP_BIG"
    train.to_csv(data / "train.csv", index=False)
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(tmp_path / "run"), "--k", "3", "--no-dedup"])
    assert result.exit_code == 0, result.output
    output = _flat(result.output)
    assert "patient 'IP_BIG' holds" in output and "more than a fold's share" in output and "--no-dedup" not in output


def test_a_test_list_without_rows_trains_without_a_test_split(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    header = pd.read_csv(data / "test.csv", dtype=str).iloc[:0]
    header.to_csv(data / "test.csv", index=False)
    run = tmp_path / "run"
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(run), "--k", "2", "--no-dedup"])
    assert result.exit_code == 0 and "lists no images: training without a test split" in _flat(result.output), result.output
    result = runner.invoke(app, ["stack", "--data", str(data), "--run", str(run), "--rounds", "10"])
    assert result.exit_code == 0 and "(no test rows)" in result.output, result.output


def test_predict_says_what_it_did_not_score_in_sub_folders(tmp_path: Path) -> None:
    from ensemble.predict import files_not_scored, image_folder_rows

    folder = tmp_path / "images"
    (folder / "visit2").mkdir(parents=True)
    for name in ("a.jpg", "visit2/b.jpg"):
        Image.new("RGB", (8, 8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    assert list(image_folder_rows(folder)["image_id"]) == ["a"]
    assert files_not_scored(folder) == ["notes.txt", "visit2/b.jpg"]
    assert sorted(image_folder_rows(folder, recursive=True)["image_id"]) == ["a", "b"]
    assert files_not_scored(folder, recursive=True) == ["notes.txt"]


def test_an_image_broken_after_folds_is_named_or_skipped_by_train_cnns(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    run = tmp_path / "run"
    common = ["--data", str(data), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2", "--no-dedup"]).exit_code == 0
    victim = sorted((data / "jpeg" / "train").glob("*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8 not a jpeg any more")
    train = ["train-cnns", *common, "--models", "small:16", "--epochs", "1"]
    result = runner.invoke(app, train)
    unwrapped = "".join(result.output.split())  # the console wraps long paths
    assert result.exit_code == 2 and f"image{victim.stem!r}at{victim}" in unwrapped and "--on-bad-imageskip" in unwrapped
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*train, "--on-bad-image", "skip"])
    assert result.exit_code == 0 and "skipped 1 unreadable image(s)" in result.output, result.output
    assert victim.stem in pd.read_csv(run / "skipped_images.csv")["image_id"].tolist()
    assert victim.stem not in pd.read_parquet(run / "cnn" / "small" / "oof.parquet")["image_id"].tolist()


def test_a_user_error_is_one_message_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = ["stack", "--data", str(tmp_path / "nowhere"), "--run", str(tmp_path / "run")]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "is not a folder" in _flat(result.output) and "Traceback" not in result.output
    result = runner.invoke(app, ["--debug", *missing])
    assert result.exit_code != 0 and result.exception is not None and "is not a folder" in str(result.exception)


def test_ctrl_c_ends_with_a_short_message(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metadata.run_folds

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(metadata.run_folds, "triple_stratified_folds", interrupted)
    result = runner.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(tmp_path / "run"), "--no-dedup"])
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "folds stopped: KeyboardInterrupt" in log
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())  # the run's record is intact


def test_a_zero_byte_image_names_the_flag_not_the_python_argument(tiny_cohort: Path, tmp_path: Path) -> None:
    data = _copy(tiny_cohort, tmp_path)
    victim = sorted((data / "jpeg" / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"")
    result = runner.invoke(app, ["folds", "--data", str(data), "--run", str(tmp_path / "run"), "--no-dedup"])
    output = _flat(result.output)
    assert result.exit_code == 2 and victim.stem in output and "--on-bad-image skip" in output and "on_error" not in output


def test_a_bug_shows_its_traceback_and_a_users_mistake_does_not(tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal KeyError is a bug to report, not a message to act on; a missing stage output is the user's to fix."""
    import metadata.run_folds

    runner = CliRunner(env={"COLUMNS": "300"})
    mistake = runner.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(tmp_path / "fresh")])
    assert mistake.exit_code == 2 and "Traceback" not in mistake.output and "run `folds` first" in _flat(mistake.output), mistake.output

    def internal_error(*args: object, **kwargs: object) -> None:
        raise KeyError("prob_MEL")

    monkeypatch.setattr(metadata.run_folds, "triple_stratified_folds", internal_error)
    bug = runner.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(tmp_path / "run")])
    assert bug.exit_code == 1 and "Traceback" in bug.output and "this is a bug" in _flat(bug.output), bug.output
