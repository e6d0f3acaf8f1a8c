"""`inspect`: missing, unlisted, unreadable and duplicate images, and the trainable verdict."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

import cli
from metadata.inspect import inspect_dataset


def _jpeg_bytes(seed: int, size: int = 32) -> bytes:
    """A JPEG of random pixels: a different picture (and perceptual hash) per seed."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _class_folders(root: Path, flawed: bool) -> Path:
    """Train/Test class folders; `flawed` adds a train/test exact duplicate and a truncated JPEG."""
    _put(root / "Train" / "melanoma" / "m1.jpg", _jpeg_bytes(1))
    _put(root / "Train" / "nevus" / "n1.jpg", _jpeg_bytes(2))
    _put(root / "Train" / "nevus" / "n2.jpg", _jpeg_bytes(3))
    _put(root / "Test" / "melanoma" / "t1.jpg", _jpeg_bytes(4))
    if flawed:
        _put(root / "Test" / "melanoma" / "t1.jpg", _jpeg_bytes(2))  # the bytes of Train/nevus/n1.jpg
        whole = _jpeg_bytes(5, size=64)
        _put(root / "Test" / "nevus" / "t2.jpg", whole[: len(whole) // 2])
    return root


def _siim2020(root: Path) -> Path:
    """A clean SIIM-ISIC 2020 folder: train.csv / test.csv and jpeg/{train,test}."""
    train = pd.DataFrame(
        {
            "image_name": ["ISIC_1", "ISIC_2", "ISIC_3"],
            "patient_id": ["IP_1", "IP_1", "IP_2"],
            "sex": ["male", "male", "female"],
            "age_approx": [45.0, 45.0, 60.0],
            "anatom_site_general_challenge": ["torso", "head/neck", ""],
            "target": [0, 1, 0],
        }
    )
    test = train.drop(columns="target").assign(image_name=["ISIC_4", "ISIC_5", "ISIC_6"], patient_id="IP_3")
    for split, frame in (("train", train), ("test", test)):
        frame.to_csv(root / f"{split}.csv", index=False)
        for seed, name in enumerate(frame["image_name"], start=10 if split == "train" else 20):
            _put(root / "jpeg" / split / f"{name}.jpg", _jpeg_bytes(seed))
    return root


def test_clean_data_is_trainable(tmp_path: Path) -> None:
    summary = inspect_dataset(_siim2020(tmp_path))
    assert summary["format"] == "isic2020"
    assert summary["trainable"] is True and summary["errors"] == []
    assert summary["rows"] == {"test": 3, "train": 3}
    assert summary["melanoma"] == {"train": 1}
    assert summary["images_listed_but_missing"] == []
    assert summary["images_present_but_not_listed"] == []
    assert summary["unreadable_images"] == []
    assert summary["duplicate_pairs"]["exact"] == 0 and summary["duplicate_pairs"]["across_train_test"] == []
    json.dumps(summary)  # JSON-ready as it is


def test_clean_class_folders_are_trainable(tmp_path: Path) -> None:
    summary = inspect_dataset(_class_folders(tmp_path, flawed=False))
    assert summary["format"] == "class-folders"
    assert summary["trainable"] is True, summary["errors"]
    assert summary["duplicate_pairs"]["pairs"] == []


def test_duplicates_across_splits_and_truncated_images(tmp_path: Path) -> None:
    summary = inspect_dataset(_class_folders(tmp_path, flawed=True))
    assert [u["image_id"] for u in summary["unreadable_images"]] == ["t2"]
    assert "t2.jpg" in summary["unreadable_images"][0]["error"]
    duplicates = summary["duplicate_pairs"]
    assert duplicates["exact"] == 1
    pair = {"image_id_a": "n1", "image_id_b": "t1", "kind": "exact", "distance": 0}
    assert duplicates["across_train_test"] == [pair]
    assert duplicates["conflicting_diagnosis"] == [pair]  # NV in train, MEL in test
    assert summary["trainable"] is False
    assert any("cannot be decoded" in e for e in summary["errors"])
    json.dumps(summary)


def test_listed_but_missing_and_unlisted_images(tmp_path: Path) -> None:
    root = _siim2020(tmp_path)
    (root / "jpeg" / "train" / "ISIC_3.jpg").unlink()
    _put(root / "jpeg" / "train" / "ISIC_99.jpg", _jpeg_bytes(99))
    (root / "jpeg" / "train" / "notes.txt").write_text("not an image")
    summary = inspect_dataset(root)
    assert summary["images_listed_but_missing"] == ["ISIC_3"]
    assert summary["images_present_but_not_listed"] == [str(root.resolve() / "jpeg" / "train" / "ISIC_99.jpg")]
    assert summary["trainable"] is False
    assert summary["errors"] == ["1 listed image(s) have no file"]


def test_unknown_layout_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("id,label\nx,1\n")
    summary = inspect_dataset(tmp_path)
    assert summary["trainable"] is False
    assert "no known data layout" in summary["errors"][0]


# ---- CLI --------------------------------------------------------------------------------------

@pytest.fixture
def run_inspect(monkeypatch: pytest.MonkeyPatch):
    """`cli inspect ARGS` with a console wide enough that messages are not wrapped."""
    monkeypatch.setattr(cli, "console", Console(width=400, no_color=True))
    return lambda *args: CliRunner().invoke(cli.app, ["inspect", *args])


def test_cli_inspect_clean_data_writes_json(tmp_path: Path, run_inspect) -> None:
    (tmp_path / "data").mkdir()
    out = tmp_path / "report" / "inspect.json"
    result = run_inspect("--data", str(_siim2020(tmp_path / "data")), "--json", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["trainable"] is True and summary["format"] == "isic2020"
    assert "isic2020" in result.output


def test_cli_inspect_untrainable_data_exits_1(tmp_path: Path, run_inspect) -> None:
    data = _class_folders(tmp_path / "data", flawed=True)
    out = tmp_path / "inspect.json"
    result = run_inspect("--data", str(data), "--json", str(out))
    assert result.exit_code == 1, result.output
    assert "cannot be decoded" in result.output
    summary = json.loads(out.read_text())
    assert summary["trainable"] is False
    assert summary["duplicate_pairs"]["across_train_test"][0]["distance"] == 0


def test_cli_inspect_unknown_layout_fails_with_the_message(tmp_path: Path, run_inspect) -> None:
    (tmp_path / "labels.csv").write_text("id,label\nx,1\n")
    result = run_inspect("--data", str(tmp_path))
    assert result.exit_code != 0
    assert "no known data layout" in result.output
