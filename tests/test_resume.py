"""Crash and resume: a training killed with SIGKILL mid-fold, re-run, ends exactly where an uninterrupted one does.

Also: one (model, fold) pair per job, `stack` waiting for every declared pair, a failing pair recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from cnn.pairs import run_status

REPO = Path(__file__).resolve().parents[1]
RUNNER = CliRunner(env={"COLUMNS": "300"})


def _new_run(tiny_cohort: Path, run: Path) -> Path:
    result = RUNNER.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return run


def _train_command(tiny_cohort: Path, run: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "cli.py"), "train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small:16",
        "--epochs", "2", "--seed", "3", "--deterministic", *extra,
    ]


def _start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


def test_sigkill_mid_fold_then_rerun_matches_an_uninterrupted_run_bit_for_bit(tiny_cohort: Path, tmp_path: Path) -> None:
    fresh, killed = _new_run(tiny_cohort, tmp_path / "fresh"), _new_run(tiny_cohort, tmp_path / "killed")
    uninterrupted = _start(_train_command(tiny_cohort, fresh))
    victim = _start(_train_command(tiny_cohort, killed))
    checkpoint = killed / "cnn" / "small" / "fold0" / "checkpoint" / "state.json"
    deadline = time.time() + 240
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    # Nothing the killed attempt left can pass for finished work.
    fold0 = checkpoint.parent.parent
    assert not (fold0 / "done.json").exists() and not (killed / "cnn" / "small" / "oof.parquet").exists()
    visible = {p.relative_to(fold0).as_posix() for p in fold0.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert visible <= {"heartbeat.json", "checkpoint/state.json"} | {
        f"checkpoint/epoch{e}.{kind}" for e in (1, 2) for kind in ("weights.h5", "rng.npz")
    }, visible
    assert {(p.fold, p.state) for p in run_status(killed, time.time())} == {(0, "interrupted"), (1, "pending")}
    refused = RUNNER.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(killed)])
    assert refused.exit_code == 2 and "small (folds 0, 1)" in " ".join(refused.output.split())

    _finish(_start(_train_command(tiny_cohort, killed)))
    _finish(uninterrupted)
    assert json.loads((fold0 / "history.json").read_text())["resumed_after_epoch"] >= 1
    assert not (fold0 / "checkpoint").exists() and not (fold0 / "heartbeat.json").exists()
    resumed = pd.read_parquet(killed / "cnn" / "small" / "oof.parquet")
    reference = pd.read_parquet(fresh / "cnn" / "small" / "oof.parquet")
    assert sorted(resumed["image_id"]) == sorted(reference["image_id"]) and not resumed["image_id"].duplicated().any()
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)  # --deterministic on a CPU: bit for bit
    assert json.loads((fold0 / "history.json").read_text())["loss"] == json.loads((fresh / "cnn/small/fold0/history.json").read_text())["loss"]


def test_one_pair_per_job_and_stack_waits_for_every_declared_pair(tiny_cohort: Path, tmp_path: Path) -> None:
    run = _new_run(tiny_cohort, tmp_path / "run")
    job = ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small:16", "--epochs", "1", "--augment", "none"]
    result = RUNNER.invoke(app, [*job, "--model", "small", "--fold", "1", "--mixed-precision", "--jit", "--strategy", "mirrored"])
    assert result.exit_code == 0, result.output
    assert "still to train: small (fold 0)" in " ".join(result.output.split())
    assert json.loads((run / "cnn" / "plan.json").read_text()) == {"models": {"small": 16}, "folds": [0, 1], "epochs": 1}
    assert {(p.fold, p.state) for p in run_status(run, time.time())} == {(0, "pending"), (1, "done")}
    log = (run / "log.txt").read_text()
    assert all(f"{flag}: no GPU" in log for flag in ("--mixed-precision", "--jit", "--strategy mirrored"))
    assert "small fold 1 epoch 1/1: loss" in log and "val AUC" in log
    refused = RUNNER.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(run)])
    assert refused.exit_code == 2 and "1 of 2 declared CNN (model, fold) pairs are not done: small (fold 0)" in " ".join(
        refused.output.split()
    )
    result = RUNNER.invoke(app, [*job, "--fold", "0"])
    assert result.exit_code == 0, result.output
    oof = pd.read_parquet(run / "cnn" / "small" / "oof.parquet")
    assert set(oof["fold"]) == {0, 1} and set(oof["image_id"]) == set(pd.read_parquet(run / "folds.parquet")["image_id"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--model", "resnet50v2"], "--model 'resnet50v2' is not one of --models (small)"),
        (["--fold", "7"], "--fold 7 is not a fold of this run; folds.parquet has folds [0, 1]"),
    ],
)
def test_a_pair_outside_the_plan_is_refused(tiny_cohort: Path, tmp_path: Path, options: list[str], message: str) -> None:
    run = _new_run(tiny_cohort, tmp_path / "run")
    result = RUNNER.invoke(app, ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small:16", *options])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_a_failing_pair_records_its_error_for_status(tiny_cohort: Path, tmp_path: Path) -> None:
    run = _new_run(tiny_cohort, tmp_path / "run")
    result = RUNNER.invoke(app, ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "mobilenet_v3_small:16"])
    assert result.exit_code == 2
    failure = json.loads((run / "cnn" / "mobilenet_v3_small" / "fold0" / "failed.json").read_text())
    assert "needs images of at least 32 px" in failure["error"] and "Traceback" in failure["traceback"]
    states = {(p.fold, p.state, p.detail.split(":")[0]) for p in run_status(run, time.time())}
    assert states == {(0, "failed", "OptionError"), (1, "pending", "")}
