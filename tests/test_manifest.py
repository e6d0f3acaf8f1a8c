"""What a run records about itself (manifest, resolved config, log) and that the same seed repeats it exactly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from metadata.dataset import load_dataset
from metadata.fingerprint import images_fingerprint, table_fingerprint
from rundir.manifest import package_versions

SHA256 = re.compile(r"[0-9a-f]{64}")


def _folds_and_stack(tiny_cohort: Path, run: Path, seed: int) -> None:
    runner = CliRunner()
    for args in (
        ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "3", "--seed", str(seed)],
        ["stack", "--data", str(tiny_cohort), "--run", str(run), "--seed", str(seed), "--rounds", "60"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def two_runs(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same folds + (zero-CNN) stack twice with one seed."""
    runs = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        _folds_and_stack(tiny_cohort, runs / name, seed=11)
    return runs / "a", runs / "b"


def test_manifest_records_packages_commit_config_data_and_stage_times(two_runs: tuple[Path, Path]) -> None:
    run = two_runs[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert {"packages", "git_commit", "config", "data_fingerprint", "stage_seconds"} <= set(manifest)
    assert {"python", "tensorflow", "lightgbm", "pandas"} <= set(manifest["packages"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:
        assert manifest["git_commit"].removesuffix("-dirty") == head.stdout.strip()
    assert manifest["config"] == json.loads((run / "config.json").read_text())
    assert manifest["config"]["folds"]["k"] == 3 and manifest["config"]["stack"]["rounds"] == 60
    fingerprint = manifest["data_fingerprint"]
    assert SHA256.fullmatch(fingerprint["table_sha256"]) and SHA256.fullmatch(fingerprint["images_sha256"])
    assert fingerprint["rows"] == fingerprint["images"] > 0
    assert set(manifest["stage_seconds"]) == {"folds", "stack"} and all(s > 0 for s in manifest["stage_seconds"].values())
    log = (run / "log.txt").read_text()
    assert all(f"{stage} {event}" in log for stage in ("folds", "stack") for event in ("started", "finished"))


def test_same_seed_gives_identical_folds_and_stack_predictions(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    for table in ("folds.parquet", "stack/oof.parquet", "stack/test.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / table), pd.read_parquet(b / table), check_exact=True)
    assert (a / "submission.csv").read_bytes() == (b / "submission.csv").read_bytes()


def test_fingerprint_follows_content_not_location_or_row_order(tiny_cohort: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_cohort, copy)
    table = load_dataset(tiny_cohort).table
    moved = load_dataset(copy).table.sample(frac=1.0, random_state=0)
    assert (table_fingerprint(moved), images_fingerprint(moved)) == (table_fingerprint(table), images_fingerprint(table))
    image = Path(moved["image_path"].iloc[0])
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF
    image.write_bytes(bytes(data))
    assert images_fingerprint(moved) != images_fingerprint(table)
    assert table_fingerprint(moved.assign(age=moved["age"] + 1)) != table_fingerprint(table)


def test_refused_stage_is_logged_with_its_reason_and_not_timed(tiny_cohort: Path, tmp_path: Path) -> None:
    from cnn.pairs import write_plan

    run = tmp_path / "run"
    write_plan(run, {"small": 32}, [0, 1], epochs=2)
    result = CliRunner().invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(run)])
    assert result.exit_code == 2
    assert re.search(r"stack stopped: 2 of 2 declared CNN .* small \(folds 0, 1\)", (run / "log.txt").read_text())
    assert "stack" not in json.loads((run / "manifest.json").read_text()).get("stage_seconds", {})


def test_package_versions_cover_the_declared_dependencies() -> None:
    versions = package_versions()
    assert versions["numpy"] == __import__("numpy").__version__
    assert "not installed" not in versions.values()
