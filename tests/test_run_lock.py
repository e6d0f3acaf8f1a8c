"""One writer per run: a second writer refuses naming the holder or waits with --wait, a dead holder's lock is
taken over, train-cnns jobs share the run, and two jobs never claim one (model, fold) pair."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from rundir.layout import RunLayout
from rundir.lock import STALE_AFTER_SECONDS, RunLockedError, run_lock

REPO = Path(__file__).resolve().parents[1]
RUNNER = CliRunner(env={"COLUMNS": "300"})
# A process that holds a lock until a line arrives on its stdin: another command, alive, on this host.
HOLD = """
import sys
from pathlib import Path
from rundir.lock import run_lock
with run_lock(Path(sys.argv[1]), sys.argv[2], shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def held_by_another_process(run: Path, command: str, *, shared: bool = False) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), command, "shared" if shared else "alone"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    try:
        yield process
    finally:
        if process.poll() is None:
            process.communicate("\n", timeout=30)


def _output(result) -> str:  # noqa: ANN001
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def folded_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("locked") / "run"
    assert RUNNER.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "3", "--no-dedup"]).exit_code == 0
    return run


def test_a_second_stack_while_one_runs_refuses_naming_it_and_the_run_holds_the_first_ones_outputs(folded_run: Path, tiny_cohort: Path) -> None:
    """Two `stack` calls on one run used to both succeed, leaving the second's config.json beside the first's stack and report."""
    from ensemble.report import read_report
    from rundir.completion import require_complete

    first = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), "stack", "--data", str(tiny_cohort), "--run", str(folded_run), "--rounds", "20", "--seed", "1"],
        cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log, deadline = folded_run / "log.txt", time.time() + 120
    while f"[{first.pid}] cli INFO: stack started" not in log.read_text() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = RUNNER.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(folded_run), "--rounds", "30", "--seed", "2"])
    output = _output(second)
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert second.exit_code == 2, output
    assert f"being written by `stack` (pid {first.pid} on {socket.gethostname()}, started " in output and "--wait" in output
    assert json.loads((folded_run / "config.json").read_text())["stack"]["seed"] == 1  # the second wrote nothing, not even its options
    require_complete(folded_run, "stack")
    assert read_report(folded_run)["entries"]
    assert not RunLayout(folded_run).writer_lock.exists()  # released when the first ended


def test_with_wait_a_writer_starts_when_the_holder_finishes(folded_run: Path, tiny_cohort: Path) -> None:
    with held_by_another_process(folded_run, "folds") as holder:
        threading.Timer(1.5, holder.communicate, args=("\n",)).start()
        started = time.perf_counter()
        result = RUNNER.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(folded_run), "--rounds", "20", "--wait"])
        assert result.exit_code == 0, result.output
        assert time.perf_counter() - started > 1.0 and f"waiting for `folds` (pid {holder.pid}" in _output(result)
        holder.wait(timeout=30)
    recorded = json.loads((folded_run / "config.json").read_text())["stack"]
    assert recorded["rounds"] == 20 and "wait" not in recorded  # --wait says how the command ran, not what it computed


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_note(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run, "stack") as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert RunLayout(run).writer_lock.exists()  # a SIGKILL leaves it behind
        result = RUNNER.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "2", "--no-dedup"])
    output = _output(result)
    assert result.exit_code == 0, output
    assert f"took over the lock {RunLayout(run).writer_lock} of `stack` (pid {holder.pid}" in output and "is gone" in output
    assert not RunLayout(run).writer_lock.exists()


def test_a_lock_of_another_machine_is_taken_over_once_its_heartbeat_is_old(tmp_path: Path) -> None:
    """On a network file system the PID of another machine's process means nothing: only the heartbeat's age."""
    lock = RunLayout(tmp_path).writer_lock
    lock.parent.mkdir(parents=True)
    now = time.time()
    for age, taken in ((10, False), (STALE_AFTER_SECONDS + 5, True)):
        lock.write_text(json.dumps({"command": "stack", "host": "gpu-node-7", "pid": 1, "started": now - 600, "updated": now - age, "token": "t"}))
        notes: list[str] = []
        if taken:
            with run_lock(tmp_path, "report", note=notes.append):
                pass
            assert "its heartbeat stopped" in notes[0] and "gpu-node-7" in notes[0]
        else:
            with pytest.raises(RunLockedError, match="being written by `stack` \\(pid 1 on gpu-node-7"):
                with run_lock(tmp_path, "report", note=notes.append):
                    pass


def test_train_cnns_jobs_share_the_run_and_keep_every_other_writer_out(tmp_path: Path) -> None:
    with held_by_another_process(tmp_path, "train-cnns", shared=True) as job:
        with run_lock(tmp_path, "train-cnns", shared=True):  # a second job on the same run
            pass
        with pytest.raises(RunLockedError, match=f"`train-cnns` \\(pid {job.pid}"):
            with run_lock(tmp_path, "folds"):
                pass
    with run_lock(tmp_path, "folds"):
        with pytest.raises(RunLockedError, match="`folds`"):
            with run_lock(tmp_path, "train-cnns", shared=True):
                pass


RACE = """
import sys, time
from pathlib import Path
from rundir.lock import RunLockedError, run_lock
run, log, start, kind, wait = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5] == "wait"
time.sleep(max(0.0, start - time.time()))
try:
    with run_lock(run, "train-cnns" if kind == "shared" else "stack", shared=kind == "shared", wait=wait, note=lambda _: None):
        began = time.time()
        time.sleep(0.3)
        with open(log, "a") as out:
            out.write(f"{kind} {began} {time.time()}\\n")
except RunLockedError:
    with open(log, "a") as out:
        out.write("refused\\n")
"""


@pytest.mark.parametrize("wait", [False, True])
def test_writers_started_together_never_hold_the_run_at_once(tmp_path: Path, wait: bool) -> None:
    """Safety: only train-cnns jobs hold the run together. Without --wait a writer that meets another may refuse (two
    of different kinds meeting may both refuse); with --wait every one of them writes, in turn."""
    log, start = tmp_path / "held.txt", time.time() + 3.0
    kinds = ["alone"] * 4 + ["shared"] * 3
    processes = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "run"), str(log), str(start), kind, "wait" if wait else "refuse"], cwd=REPO)
        for kind in kinds
    ]
    assert all(p.wait(timeout=120) == 0 for p in processes)
    lines = log.read_text().split("\n")[:-1]
    held = [(kind, float(a), float(b)) for kind, a, b in (line.split() for line in lines if line != "refused")]
    assert len(lines) == len(kinds) and (len(held) == len(kinds) or not wait), lines
    for i, (kind, began, ended) in enumerate(held):
        for other, other_began, other_ended in held[i + 1 :]:
            overlap = began < other_ended and other_began < ended
            assert not overlap or kind == other == "shared", held  # only train-cnns jobs share


CLAIM = """
import sys, time
from pathlib import Path
from cnn.pairs import claimed
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
with claimed(folder, print) as owner:
    print("claimed" if owner is None else "skipped", flush=True)
    if owner is None:
        sys.stdin.readline()  # held until every job has tried
"""


def test_jobs_started_together_claim_a_pair_once(tmp_path: Path) -> None:
    """The heartbeat used to be checked, then written: two jobs could both train a pair. The claim is one atomic step."""
    start = time.time() + 3.0
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM, str(tmp_path / "fold0"), str(start)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outcomes = [p.stdout.readline().strip() for p in processes]
    for process in processes:
        process.communicate("\n", timeout=60)
    assert sorted(outcomes) == ["claimed"] + ["skipped"] * 5, outcomes


def test_a_job_skips_a_pair_another_live_job_has_claimed(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert RUNNER.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "2", "--no-dedup"]).exit_code == 0
    claim = RunLayout(run).fold_dir("small", 0) / "heartbeat.json"
    claim.parent.mkdir(parents=True)
    now = time.time()
    claim.write_text(json.dumps({"command": "train-cnns", "host": "gpu-node-7", "pid": 1, "started": now, "updated": now, "token": "t"}))
    job = ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small:16", "--epochs", "1", "--fold", "0"]
    result = RUNNER.invoke(app, job)
    assert result.exit_code == 0, result.output
    assert "skipped, `train-cnns` (pid 1 on gpu-node-7" in (run / "log.txt").read_text()
    assert not (claim.parent / "done.json").exists() and json.loads(claim.read_text())["host"] == "gpu-node-7"
    assert not os.listdir(RunLayout(run).lock_dir)  # the job's share of the run lock is released
