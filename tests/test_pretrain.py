"""Self-supervised pretraining (`pretrain`) and fine-tuning from it (`train-cnns --weights BACKBONE`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from rundir.layout import CHECKPOINT_STATE, BackboneLayout

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ["--model", "small:16", "--batch-size", "32", "--deterministic", "--seed", "5"]


def pretrain_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *RECIPE]


def h5_arrays(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return found


@pytest.fixture(scope="module")
def backbone(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small:16 backbone pretrained for 3 epochs on the tiny cohort, uninterrupted."""
    out = tmp_path_factory.mktemp("pretrained") / "backbone"
    result = CliRunner().invoke(app, pretrain_args(tiny_cohort, out, 3))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


def test_the_backbone_records_what_it_was_pretrained_on(backbone: Path, tiny_cohort: Path) -> None:
    record = json.loads(BackboneLayout(backbone).record.read_text())
    n_images = sum(1 for _ in (tiny_cohort / "jpeg").rglob("*.jpg"))  # train and test images alike
    assert record["backbone"] == "small" and record["image_size"] == 16 and record["images"] == n_images
    assert record["pretrained_on"] == [{"data": str(tiny_cohort), "format": "isic2020", "metadata": None, "images": n_images}]
    assert len(record["loss"]) == 3 and all(np.isfinite(record["loss"]))
    assert not BackboneLayout(backbone).checkpoint.exists()  # a finished backbone keeps no checkpoint


def test_pretrain_resumes_after_sigkill_as_if_never_stopped(backbone: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    command = [sys.executable, "cli.py", *pretrain_args(tiny_cohort, out, 3)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = BackboneLayout(out).checkpoint / CHECKPOINT_STATE
    deadline = time.monotonic() + 300
    while not state_file.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert state_file.exists() and not BackboneLayout(out).record.exists(), "the call was not stopped mid-way; lower the poll interval"
    killed_after = json.loads(state_file.read_text())["epochs_done"]
    assert 1 <= killed_after < 3
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, uninterrupted = h5_arrays(BackboneLayout(out).weights), h5_arrays(BackboneLayout(backbone).weights)
    assert resumed.keys() == uninterrupted.keys()
    for name, array in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name], array, err_msg=name)
    assert json.loads(BackboneLayout(out).record.read_text())["loss"] == json.loads(BackboneLayout(backbone).record.read_text())["loss"]


def test_the_classifier_starts_from_the_pretrained_weights(backbone: Path) -> None:
    from cnn.backbones import build_classifier

    model = build_classifier("small", 16, str(backbone))
    features = next(layer for layer in model.layers if hasattr(layer, "get_layer") and any(sub.name == "stem_conv" for sub in layer.layers))
    first_kernel = features.get_layer("stem_conv").kernel.numpy()
    np.testing.assert_array_equal(first_kernel, h5_arrays(BackboneLayout(backbone).weights)["layers/conv2d/vars/0"])
    fresh = build_classifier("small", 16)
    assert not np.array_equal(fresh.get_weights()[0], first_kernel)


def test_train_cnns_fine_tunes_from_a_backbone_and_refuses_a_mismatched_one(backbone: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    assert runner.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "2"]).exit_code == 0
    for models in ("small:32", "compact_resnet18:16"):
        result = runner.invoke(app, ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", models, "--epochs", "1", "--weights", str(backbone)])
        assert result.exit_code == 2 and "pretrained at 16 px cannot start" in result.output, result.output
        assert not (run / "cnn").exists()  # refused before any pair started
    result = runner.invoke(app, ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small:16", "--epochs", "1", "--weights", str(backbone)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "cnn" / "small" / "fold0" / "history.json").read_text())["config"]["weights"] == str(backbone)


def test_pretrain_reads_hdf5_and_tfrecord_shards(tmp_path: Path) -> None:
    runner = CliRunner()
    data, run = tmp_path / "isic2024", tmp_path / "run"
    assert runner.invoke(app, ["synth", "--out", str(data), "--layout", "isic2024", "--patients", "12", "--image-size", "16"]).exit_code == 0
    assert runner.invoke(app, ["tfrecords", "--data", str(data), "--run", str(run)]).exit_code == 0
    counts = []
    for source in (data, run / "tfrecords"):
        result = runner.invoke(app, pretrain_args(source, tmp_path / source.name / "backbone", 1))
        assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
        counts.append(json.loads(BackboneLayout(tmp_path / source.name / "backbone").record.read_text())["pretrained_on"][0])
    assert counts[0]["format"] == "isic2024" and counts[1]["format"] == "tfrecords" and counts[0]["images"] == counts[1]["images"] > 0


def test_pretrain_options_are_checked(tiny_cohort: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    for extra, message in ((["--augment", "none"], "two identical views"), (["--batch-size", "1"], "at least 2 images")):
        result = runner.invoke(app, [*pretrain_args(tiny_cohort, tmp_path / "b", 1), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(app, ["pretrain", "--data", str(tiny_cohort), "--out", str(tmp_path / "b"), "--model", "small:16@1"])
    assert result.exit_code == 2 and "name one backbone" in result.output
