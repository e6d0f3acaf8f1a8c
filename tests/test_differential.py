"""The differential diagnosis reaches the user: `predict` writes each class's probability and the top diagnosis."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli import app
from metadata.metrics import prior_adjusted_probabilities

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
    outputs = cnn_fold_probabilities(member, sources, 8, lambda n: None)
    from cnn.pipeline import TTA_VIEWS, named_image_batches

    images = next(named_image_batches(sources, 16, 8))
    expected = np.mean([
        prior_adjusted_probabilities(np.mean([model.predict_on_batch(TTA_VIEWS[v](images)) for v in member.tta], axis=0), member.priors[f])
        for f, model in member.models.items()
    ], axis=0)
    np.testing.assert_allclose(outputs.diagnosis.to_numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(predictions.set_index("image_id").loc[predictions["image_id"][:5], columns].to_numpy(), expected, atol=1e-6)
