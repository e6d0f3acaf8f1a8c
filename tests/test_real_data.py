"""Smoke tests on the real ISIC data in ../shared/data (skipped when it is absent; CI has it)."""

from pathlib import Path

import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

from metadata.inspect import inspect_dataset

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real ISIC data not found at {SHARED_DATA}")


def test_ham10000() -> None:
    summary = inspect_dataset(SHARED_DATA / "ham10000")
    assert summary["format"] == "ham10000"
    assert summary["rows"] == {"train": 5984}
    assert summary["diagnosis_counts"]["MEL"] == 491 and summary["melanoma"]["train"] == 491
    assert summary["unreadable_images"] == [] and summary["images_listed_but_missing"] == []
    assert summary["trainable"]


def test_isic9_class_folders() -> None:
    summary = inspect_dataset(SHARED_DATA / "isic9")
    assert summary["format"] == "class-folders"
    copies = [p for p in summary["duplicate_pairs"]["pairs"] if "(1)" in p["image_id_b"] or "(1)" in p["image_id_a"]]
    assert len(copies) == 2 and all(p["kind"] == "exact" for p in copies)
    assert sum(summary["rows"].values()) - len(copies) == 2357
    # 9 class folders; seborrheic keratosis and pigmented benign keratosis are both BKL in the unified vocabulary.
    assert len(summary["diagnosis_counts"]) == 8
    # The published set ships some files in train AND test: reported, not hidden.
    assert summary["duplicate_pairs"]["across_train_test"]


def test_isic2020_metadata_only() -> None:
    summary = inspect_dataset(SHARED_DATA / "isic2020")
    assert summary["format"] == "isic2020" and summary["metadata_only"]
    assert summary["rows"] == {"train": 33126}
    assert summary["patients"] == 2056 and summary["melanoma"]["train"] == 584


def test_isic2019_metadata_only() -> None:
    summary = inspect_dataset(SHARED_DATA / "isic2019")
    assert summary["format"] == "isic2019" and summary["metadata_only"]
    assert summary["rows"] == {"train": 25331}
    assert summary["diagnosis_counts"]["MEL"] == 4522


def test_stack_with_zero_cnns_on_isic2020(tmp_path: Path) -> None:
    import json

    from cli import app

    runner = CliRunner()
    data = str(SHARED_DATA / "isic2020")
    for args in (["folds", "--data", data, "--run", str(tmp_path), "--k", "5"], ["stack", "--data", data, "--run", str(tmp_path)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    stack = next(e for e in report["entries"] if e["name"] == "lightgbm_stack")
    assert stack["kind"] == "stack" and len(stack["fold_auc"]) == 5
    # Metadata + patient context only; a simple LightGBM reaches about 0.756 here.
    assert stack["auc"] > 0.74, stack
