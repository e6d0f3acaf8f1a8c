"""Pair states read from a run directory's files: what `status` shows and what `stack` waits for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from cnn.pairs import claimed, pair_dir, require_finished_cnns, run_status, write_plan
from errors import UserError
from rundir.layout import HEARTBEAT_FILE
from rundir.lock import STALE_AFTER_SECONDS, Holder, acquire, holding


def _write(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _beat(pid: int, updated: float, host: str | None = None) -> dict:
    return {"host": host or socket.gethostname(), "pid": pid, "started": updated, "updated": updated}


@pytest.fixture()
def run_with_every_state(tmp_path: Path) -> Path:
    """small: fold 0 done, fold 1 running, fold 2 interrupted; mobilenet_v3_small: fold 0 failed, folds 1-2 pending."""
    run = tmp_path / "run"
    write_plan(run, {"small": 32, "mobilenet_v3_small": 64}, [0, 1, 2], epochs=4)
    now = time.time()
    done = pair_dir(run, "small", 0)
    _write(done / "history.json", {"val_auc": [0.6, 0.8, 0.7], "config": {"epochs": 3}, "seconds": 12.0})
    _write(done / "done.json", {"finished": "now"})
    running = pair_dir(run, "small", 1)
    _write(running / "checkpoint" / "state.json", {"epochs_done": 1, "val_auc": [0.55], "config": {"epochs": 4}})
    _write(running / HEARTBEAT_FILE, _beat(os.getpid(), now))
    killed = pair_dir(run, "small", 2)
    _write(killed / "checkpoint" / "state.json", {"epochs_done": 2, "val_auc": [0.5, float("nan")], "config": {"epochs": 4}})
    _write(killed / HEARTBEAT_FILE, _beat(_dead_pid(), now))  # recent, but its process is gone
    _write(pair_dir(run, "mobilenet_v3_small", 0) / "failed.json", {"error": "ValueError: images too small\nmore", "traceback": ""})
    return run


def test_each_pair_state_best_auc_and_epochs(run_with_every_state: Path) -> None:
    pairs = {(p.model, p.fold): p for p in run_status(run_with_every_state, time.time())}
    assert {key: p.state for key, p in pairs.items()} == {
        ("small", 0): "done",
        ("small", 1): "running",
        ("small", 2): "interrupted",
        ("mobilenet_v3_small", 0): "failed",
        ("mobilenet_v3_small", 1): "pending",
        ("mobilenet_v3_small", 2): "pending",
    }
    assert (pairs["small", 0].best_val_auc, pairs["small", 0].epochs_done, pairs["small", 0].epochs) == (0.8, 3, 3)
    assert (pairs["small", 1].best_val_auc, pairs["small", 1].epochs_done) == (0.55, 1)
    assert (pairs["small", 2].best_val_auc, pairs["small", 2].detail) == (0.5, "resumes at epoch 3")  # NaN never best
    assert pairs["mobilenet_v3_small", 0].detail == "ValueError: images too small"
    assert (pairs["mobilenet_v3_small", 1].best_val_auc, pairs["mobilenet_v3_small", 1].epochs) == (None, 4)


def test_a_heartbeat_goes_stale_with_time(run_with_every_state: Path) -> None:
    later = time.time() + STALE_AFTER_SECONDS + 1
    pairs = {(p.model, p.fold): p.state for p in run_status(run_with_every_state, later)}
    assert pairs["small", 1] == "interrupted"


def test_status_command_lists_every_pair(run_with_every_state: Path) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["status", "--run", str(run_with_every_state)])
    assert result.exit_code == 0, result.output
    for word in ("done", "running", "interrupted", "failed", "pending", "0.8000", "images too small"):
        assert word in result.output
    assert "2 pending" in result.output


def test_status_of_a_run_without_cnns_says_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["status", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "train-cnns" in result.output


def test_stack_refuses_and_lists_the_unfinished_pairs(run_with_every_state: Path) -> None:
    with pytest.raises(UserError, match=r"5 of 6 declared.*small \(folds 1, 2\), mobilenet_v3_small \(folds 0, 1, 2\)"):
        require_finished_cnns(run_with_every_state)


def test_finished_pairs_are_assembled_when_their_job_died_before_assembling(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_plan(run, {"small": 32}, [0, 1], epochs=1)
    for fold in (0, 1):
        folder = pair_dir(run, "small", fold)
        folder.mkdir(parents=True)
        ids = [f"img{fold}{i}" for i in range(3)]
        pd.DataFrame({"image_id": ids, "patient_id": "p", "target": [0, 1, 0], "fold": fold, "prob": 0.1 * (fold + 1)}).to_parquet(
            folder / "oof.parquet"
        )
        pd.DataFrame({"image_id": ["t0", "t1"], "patient_id": "q", "prob": [0.2 * (fold + 1)] * 2}).to_parquet(folder / "test.parquet")
        _write(folder / "done.json", {})
    require_finished_cnns(run)
    oof = pd.read_parquet(run / "cnn" / "small" / "oof.parquet")
    assert len(oof) == 6 and set(oof["fold"]) == {0, 1}
    test = pd.read_parquet(run / "cnn" / "small" / "test.parquet")
    assert test["prob"].tolist() == pytest.approx([0.3, 0.3])


def test_only_another_live_process_owns_a_pair(tmp_path: Path) -> None:
    folder = tmp_path / "fold0"
    now = time.time()
    notes: list[str] = []
    for beat, owned in (
        (_beat(os.getppid(), now), True),  # a live process on this host
        (_beat(_dead_pid(), now), False),  # a dead process on this host
        (_beat(1, now, host="gpu-node-7"), True),  # another machine, recent
        (_beat(1, now - STALE_AFTER_SECONDS - 1, host="gpu-node-7"), False),  # another machine, silent too long
    ):
        _write(folder / HEARTBEAT_FILE, beat)
        with claimed(folder, notes.append) as owner:
            assert (owner is not None) == owned, beat
            assert (Holder.read(folder / HEARTBEAT_FILE).pid == os.getpid()) != owned
        assert (folder / HEARTBEAT_FILE).exists() == owned  # a claim is removed when its block ends, another's stays
    assert len(notes) == 2 and all("took over" in n for n in notes), notes


def test_a_claim_refreshes_its_heartbeat_while_held_and_is_removed_after(tmp_path: Path) -> None:
    path = tmp_path / HEARTBEAT_FILE
    holder = Holder.this_process("train-cnns")
    assert acquire(path, holder, print) is None
    with holding(path, holder, interval=0.05):
        first = json.loads(path.read_text())["updated"]
        time.sleep(0.3)
        assert json.loads(path.read_text())["updated"] > first
    assert not path.exists()
