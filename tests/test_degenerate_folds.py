"""A fold without a melanoma (small subsets of ISIC 2024: 0.1% melanomas): `folds` warns and says what to do,
`train-cnns` logs an undefined validation AUC, `stack` and its report finish with "undefined" where a metric needs
both classes; a run whose melanomas all sit in one fold is refused with what to do, not a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from evaluation.metrics import auc_standard_error

RUNNER = CliRunner(env={"COLUMNS": "300"})


def _cohort_with_melanomas(tiny_cohort: Path, folder: Path, keep: int) -> Path:
    """The tiny cohort with only its first `keep` melanomas (of different patients) left melanomas."""
    shutil.copytree(tiny_cohort, folder)
    train = pd.read_csv(folder / "train.csv")
    kept = train[train["target"] == 1].drop_duplicates("patient_id").index[:keep]
    benign = (train["target"] == 1) & ~train.index.isin(kept)
    train.loc[benign, ["diagnosis", "benign_malignant", "target"]] = ["nevus", "benign", 0]
    train.to_csv(folder / "train.csv", index=False)
    return folder


def _run(*args: str) -> str:
    result = RUNNER.invoke(app, list(args))
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    return output


def test_a_fold_without_a_melanoma_is_warned_about_and_every_stage_finishes(tiny_cohort: Path, tmp_path: Path) -> None:
    data, run = _cohort_with_melanomas(tiny_cohort, tmp_path / "data", keep=2), tmp_path / "run"
    common = ["--data", str(data), "--run", str(run)]
    output = _run("folds", *common, "--k", "3", "--no-dedup")
    assert "holds no melanoma (2 in all)" in output and "use --k 2 or fewer, or add melanomas" in output
    _run("train-cnns", *common, "--models", "small:16", "--epochs", "1")
    log = (run / "log.txt").read_text()
    assert "val AUC undefined" in log and "validation rows are all of one class" in log and "nan" not in log
    _run("stack", *common, "--rounds", "20")  # was: ZeroDivisionError in the report's leakage check
    report = json.loads((run / "report.json").read_text())
    small = next(e for e in report["entries"] if e["name"] == "small")
    assert sum(math.isnan(a) for a in small["fold_auc"]) == 1 and not math.isnan(small["fold_auc_sd"])
    assert "undefined" in (run / "report.md").read_text()


def test_a_run_whose_melanomas_sit_in_one_fold_is_refused_with_what_to_do(tiny_cohort: Path, tmp_path: Path) -> None:
    data, run = _cohort_with_melanomas(tiny_cohort, tmp_path / "data", keep=1), tmp_path / "run"
    common = ["--data", str(data), "--run", str(run)]
    assert "add melanomas: no split of so few puts one in every fold" in _run("folds", *common, "--k", "3", "--no-dedup")
    result = RUNNER.invoke(app, ["stack", *common, "--rounds", "20"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "holds every melanoma of the run (1)" in output and "Traceback" not in output, output


@pytest.mark.parametrize(("auc", "positive", "negative"), [(float("nan"), 0, 300), (float("nan"), 300, 0), (0.8, 0, 300)])
def test_the_standard_error_of_an_auc_of_one_class_is_undefined(auc: float, positive: int, negative: int) -> None:
    assert math.isnan(auc_standard_error(auc, positive, negative))
