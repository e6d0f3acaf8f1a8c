"""Submission CSVs: official columns and order, validation before writing, atomic writes, and `cli.py submit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ensemble.run_files import load_run_predictions
from ensemble.submission import build_submission, validate_submission, write_submission
from ensemble.submission_formats import ISIC2019_CLASSES, SUBMISSION_FORMATS
from errors import UserError
from metadata.dataset import load_dataset
from rundir.io import write_table

ISIC2019_TRAINING_CLASSES = [c for c in ISIC2019_CLASSES if c != "UNK"]  # ISIC 2019 has no UNK training images


def _test_predictions(ids: list[str], classes: list[str], seed: int = 0) -> pd.DataFrame:
    """Test predictions of a diagnosis head (softmax over `classes`), indexed by image id."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(ids), len(classes)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes], index=pd.Index(ids, name="image_id"))
    return frame.assign(prob=frame["prob_MEL"])


def test_multiclass_formats_follow_the_challenge_column_order() -> None:
    ids = ["ISIC_1", "ISIC_2", "ISIC_3"]
    test = _test_predictions(ids, ISIC2019_TRAINING_CLASSES)
    frame, notes = build_submission(SUBMISSION_FORMATS["isic2019"], "small", test)
    assert list(frame.columns) == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert (frame["UNK"] == 0).all() and notes == ["small has no UNK output: the column is 0 for every image."]
    np.testing.assert_allclose(frame["SCC"], test["prob_SCC"])
    ham = _test_predictions(ids, ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"])
    frame, notes = build_submission(SUBMISSION_FORMATS["isic2018"], "small", ham)
    assert list(frame.columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"] and notes == []
    np.testing.assert_allclose(frame["AKIEC"], ham["prob_AK"])  # the unified AK is 2018's AKIEC


def test_binary_formats_and_what_cannot_be_submitted() -> None:
    ids = ["ISIC_1", "ISIC_2"]
    binary = pd.DataFrame({"prob": [0.2, 0.9]}, index=pd.Index(ids, name="image_id"))
    assert list(build_submission(SUBMISSION_FORMATS["isic2020"], "stack", binary)[0].columns) == ["image_name", "target"]
    assert list(build_submission(SUBMISSION_FORMATS["isic2024"], "stack", binary)[0].columns) == ["isic_id", "target"]
    with pytest.raises(UserError, match="predicts melanoma only.*--target diagnosis"):
        build_submission(SUBMISSION_FORMATS["isic2019"], "stack", binary)
    with pytest.raises(UserError, match=r"predicts \['prob_SCC'\], which ISIC 2018"):
        build_submission(SUBMISSION_FORMATS["isic2018"], "small", _test_predictions(ids, ISIC2019_TRAINING_CLASSES))


def test_multiclass_submission_is_prior_adjusted_when_the_training_prior_is_known() -> None:
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC"]
    rows = [[0.30, 0.60, 0.03, 0.02, 0.03, 0.01, 0.01], [0.05, 0.85, 0.02, 0.02, 0.04, 0.01, 0.01]]
    test = pd.DataFrame(rows, columns=[f"prob_{c}" for c in classes], index=pd.Index(["ISIC_1", "ISIC_2"], name="image_id"))
    # a model fitted to HAM10000's natural mix: NV two-thirds of the images, MEL one in nine
    prior = pd.Series([0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02], index=classes)
    fmt = SUBMISSION_FORMATS["isic2018"]
    raw, raw_notes = build_submission(fmt, "small", test)
    adjusted, notes = build_submission(fmt, "small", test, prior)
    assert raw_notes == [] and "divided by its training class prior" in notes[0]
    np.testing.assert_allclose(raw["MEL"], [0.30, 0.05])  # without a prior: as predicted
    by_hand = test[[f"prob_{c}" for c in classes]].to_numpy() / prior.to_numpy()
    by_hand /= by_hand.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adjusted[["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]].to_numpy(), by_hand)
    np.testing.assert_allclose(adjusted.iloc[:, 1:].sum(axis=1), 1.0)
    # the first image's melanoma probability is three times its prior: the balanced decision is MEL; the second stays NV
    assert raw.set_index("image").idxmax(axis=1).tolist() == ["NV", "NV"]
    assert adjusted.set_index("image").idxmax(axis=1).tolist() == ["MEL", "NV"]
    uniform = pd.Series(1 / 7, index=classes)  # a balanced-weight model: nothing to adjust
    np.testing.assert_allclose(build_submission(fmt, "small", test, uniform)[0]["MEL"], raw["MEL"])
    binary = pd.DataFrame({"prob": [0.2, 0.9]}, index=pd.Index(["a", "b"], name="image_id"))
    np.testing.assert_allclose(build_submission(SUBMISSION_FORMATS["isic2020"], "stack", binary, prior)[0]["target"], [0.2, 0.9])


def _isic2020(ids: list[str], probs: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"image_name": ids, "target": probs})


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_isic2020(["a", "b"], [0.1, 0.2])[["target", "image_name"]], r"needs exactly \['image_name', 'target'\]"),
        (_isic2020(["a", "a", "b"], [0.1, 0.1, 0.2]), "id 'a' appears more than once"),
        (_isic2020(["a"], [0.1]), r"1 test id\(s\) missing \(e.g. \['b'\]\), 0 extra"),
        (_isic2020(["a", "b", "c"], [0.1, 0.2, 0.3]), r"0 test id\(s\) missing .* 1 extra \(e.g. \['c'\]\)"),
        (_isic2020(["a", "b"], [0.1, float("nan")]), "id 'b' has target=nan, not a probability"),
        (_isic2020(["a", "b"], [1.2, 0.5]), "id 'a' has target=1.2, not a probability"),
        (_isic2020(["a", "b"], [-0.01, 0.5]), "id 'a' has target=-0.01"),
    ],
)
def test_validation_names_the_problem(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(UserError, match=message):
        validate_submission(frame, SUBMISSION_FORMATS["isic2020"], ["a", "b"])


def test_a_refused_or_crashed_write_leaves_the_previous_submission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "submission.csv"
    fmt = SUBMISSION_FORMATS["isic2020"]
    write_submission(_isic2020(["a", "b"], [0.1, 0.2]), fmt, ["a", "b"], path)
    before = path.read_bytes()
    with pytest.raises(UserError):
        write_submission(_isic2020(["a", "b"], [0.1, 7.0]), fmt, ["a", "b"], path)
    assert path.read_bytes() == before

    def crash_halfway(frame: pd.DataFrame, target: Path, **_: object) -> None:
        Path(target).write_text("image_name,target\na,0.9\n")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        write_submission(_isic2020(["a", "b"], [0.9, 0.8]), fmt, ["a", "b"], path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def _cnn_outputs(run: Path, name: str, table: pd.DataFrame, classes: list[str], seed: int) -> None:
    """The OOF and test files of one diagnosis-head CNN, for the cohort's train and test images."""
    for split, file in (("train", "oof.parquet"), ("test", "test.parquet")):
        rows = table[table["split"] == split]
        predictions = _test_predictions(rows["image_id"].tolist(), classes, seed).reset_index()
        extra = {"fold": np.arange(len(rows)) % 3, "target": rows["target"].to_numpy()} if split == "train" else {}
        write_table(predictions.assign(patient_id=rows["patient_id"].to_numpy(), **extra), run / "cnn" / name / file)


def _said(output: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(output.split())


def test_submit_command(cohort_dir: Path, tmp_path: Path) -> None:
    from cli import app

    table = load_dataset(cohort_dir).table
    test_ids = sorted(table.loc[table["split"] == "test", "image_id"])
    run = tmp_path / "run"
    for seed, name in enumerate(("small", "mobilenet_v3_small")):
        _cnn_outputs(run, name, table, ISIC2019_TRAINING_CLASSES, seed)
    runner = CliRunner()

    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2019", "--data", str(cohort_dir)])
    assert result.exit_code == 0, result.output
    submission = pd.read_csv(run / "submission_isic2019.csv")
    assert list(submission.columns) == ["image", *ISIC2019_CLASSES] and sorted(submission["image"]) == test_ids
    probs = [pd.read_parquet(run / "cnn" / n / "test.parquet").set_index("image_id") for n in ("small", "mobilenet_v3_small")]
    expected_mel = (probs[0]["prob_MEL"] + probs[1]["prob_MEL"]) / 2  # the default: mean_blend
    np.testing.assert_allclose(submission.set_index("image")["MEL"], expected_mel.reindex(submission["image"]))
    assert "no UNK output" in _said(result.output) and "training class prior" not in _said(result.output)

    # With each fold model's training prior recorded, the blend is adjusted by its members' fold-averaged priors.
    rng = np.random.default_rng(7)
    fold_priors = {}
    for name in ("small", "mobilenet_v3_small"):
        for fold in range(3):
            prior = rng.dirichlet(np.ones(len(ISIC2019_TRAINING_CLASSES)))
            fold_priors[name, fold] = prior
            history = {"classes": ISIC2019_TRAINING_CLASSES, "training_prior": prior.tolist()}
            (run / "cnn" / name / f"fold{fold}").mkdir(parents=True)
            (run / "cnn" / name / f"fold{fold}" / "history.json").write_text(json.dumps(history))
    loaded = load_run_predictions(run)
    members = [loaded.model(n).class_prior for n in ("small", "mobilenet_v3_small")]
    pd.testing.assert_frame_equal(loaded.model("mean_blend").class_prior, (members[0] + members[1]) / 2)
    assert loaded.model("rank_blend").class_prior is None  # ranks are not probabilities: no prior to divide by
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2019"])
    assert result.exit_code == 0 and "mean_blend's probabilities are divided by its training class prior" in _said(result.output)
    blend_prior = np.mean(list(fold_priors.values()), axis=0)
    columns = [f"prob_{c}" for c in ISIC2019_TRAINING_CLASSES]
    blended = (probs[0][columns] + probs[1][columns]).to_numpy() / 2 / blend_prior
    expected = pd.DataFrame(blended / blended.sum(axis=1, keepdims=True), index=probs[0].index, columns=ISIC2019_TRAINING_CLASSES)
    adjusted = pd.read_csv(run / "submission_isic2019.csv").set_index("image")
    np.testing.assert_allclose(adjusted[ISIC2019_TRAINING_CLASSES], expected.reindex(adjusted.index), rtol=1e-6)
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2019", "--raw-probabilities"])
    assert result.exit_code == 0
    np.testing.assert_allclose(pd.read_csv(run / "submission_isic2019.csv")["MEL"], submission["MEL"])

    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2020"])
    assert result.exit_code == 2 and "no model 'lightgbm_stack'" in _said(result.output) and "--model" in result.output
    out = tmp_path / "small.csv"
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2020", "--model", "small", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out).columns.tolist() == ["image_name", "target"]

    # A model whose test predictions are from other data is refused, with or without --data.
    stale = pd.read_parquet(run / "cnn" / "small" / "test.parquet").iloc[1:]
    write_table(stale, run / "cnn" / "small" / "test.parquet")
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2020", "--model", "mobilenet_v3_small"])
    assert result.exit_code == 2 and "predicted different test images" in _said(result.output)
    with_data = ["--data", str(cohort_dir)]
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2020", "--model", "small", *with_data])
    assert result.exit_code == 2 and "1 test id(s) missing" in _said(result.output)
    result = runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "kaggle"])
    said = _said(result.output)
    assert result.exit_code == 2 and "'kaggle' is not one of" in said and all(f"'{name}'" in said for name in SUBMISSION_FORMATS)
