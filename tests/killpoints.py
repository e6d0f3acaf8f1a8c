"""Seeded crash points of CLI commands: the run as a SIGKILL just before the command's k-th change to the file system leaves it.

`python tests/killpoints.py` is a fork server: it imports the pipeline once, then reads one JSON job per
line on stdin and runs each in a forked child, so a crash point costs the command's own work and no
start-up. In the child every `os` call of the main thread that changes the file system (create,
write-open, fsync, rename, link, unlink, mkdir, rmdir: what a crash can fall between) is counted (a
lock's heartbeat, refreshed from another thread every 30 s, would make the count depend on timing), and

- at change `kill_at` the child sends itself SIGKILL: no `finally` block, no lock release, no cleanup;
- before each change listed in `snapshots` the child copies the run folder `watch` to `snapshot_dir/at<k>`:
  exactly what a SIGKILL at that change leaves (the command changes the file system from one thread, and
  a SIGKILL loses nothing already written), so one run of the command gives many crash points.

A job without `kill_at` runs to the end and reports how many changes it made, from which a test draws its
points. Each job's answer is one JSON line on stdout: `{"killed": bool, "code": int|null, "changes": int|null}`.

Tests start it with `KillPoints()`; `run(argv, ...)` returns the answer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHANGES = ("replace", "rename", "link", "unlink", "mkdir", "rmdir", "fsync", "open")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _count_changes(job: dict) -> list[int]:
    """Wrap the `os` functions that change the file system: copy the watched run before each snapshot change,
    SIGKILL this process at change `kill_at`."""
    count, paused = [0], [False]
    snapshots = set(job.get("snapshots", ()))

    def counted(name: str, real):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            writes = name != "open" or (args[1] if len(args) > 1 else kwargs.get("flags", 0)) & WRITE_FLAGS
            if writes and not paused[0] and threading.current_thread() is threading.main_thread():
                count[0] += 1
                if count[0] in snapshots:
                    paused[0] = True  # the copy's own changes are not the command's
                    shutil.copytree(job["watch"], Path(job["snapshot_dir"]) / f"at{count[0]}", symlinks=True)
                    paused[0] = False
                if count[0] == job.get("kill_at"):
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in CHANGES:
        setattr(os, name, counted(name, getattr(os, name)))
    return count


def _child(job: dict) -> None:
    """Run one job in this (forked) process and leave with its exit status."""
    import cli

    code = 1
    try:
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        count = _count_changes(job)
        try:
            cli.app(job["argv"], prog_name="cli.py")
        except SystemExit as end:
            code = end.code if isinstance(end.code, int) else int(end.code is not None)
        Path(job["changes"]).write_text(str(count[0]))
    finally:
        os._exit(code)


def serve() -> None:
    """Answer jobs from stdin until it closes."""
    import uvicorn  # noqa: F401

    import cli  # noqa: F401  (the pipeline, imported once: each child starts warm)
    import cnn.train  # noqa: F401
    import ensemble.report  # noqa: F401
    import fusion.image_features.stage  # noqa: F401
    import fusion.stage  # noqa: F401
    import triage.http.app  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = job["reap"] if "reap" in job else os.fork()
        if pid == 0:
            _child(job)
        if job.get("background"):  # a service: the test kills it, then reaps it
            print(json.dumps({"pid": pid}), flush=True)
            continue
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        changes = Path(job["changes"])
        answer = {"killed": killed, "code": None if killed else os.waitstatus_to_exitcode(status), "changes": int(changes.read_text()) if changes.exists() else None}
        changes.unlink(missing_ok=True)
        print(json.dumps(answer), flush=True)


class KillPoints:
    """The fork server, started in a subprocess."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="killpoints."))
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "300", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__))], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.process.stdout.readline()) == {"ready": True}
        self.jobs = 0

    def run(self, argv: list[str], *, kill_at: int | None = None, snapshots: tuple[int, ...] = (), watch: Path | None = None, snapshot_dir: Path | None = None) -> dict:
        """Run `python cli.py ARGV`, killed at change `kill_at`, copying `watch` to `snapshot_dir/at<k>` before each
        change k in `snapshots`; the answer, with `output` (the command's console)."""
        self.jobs += 1
        log, changes = self.folder / f"job{self.jobs}.log", self.folder / f"job{self.jobs}.changes"
        job = {"argv": argv, "kill_at": kill_at, "snapshots": [int(k) for k in snapshots], "watch": str(watch), "snapshot_dir": str(snapshot_dir)}
        self.process.stdin.write(json.dumps({**job, "log": str(log), "changes": str(changes)}) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return {**answer, "output": log.read_text() if log.exists() else ""}

    def start(self, argv: list[str]) -> tuple[int, Path]:
        """Start `python cli.py ARGV` (a service) without waiting for it: its process id and its console's file."""
        self.jobs += 1
        log, changes = self.folder / f"job{self.jobs}.log", self.folder / f"job{self.jobs}.changes"
        self.process.stdin.write(json.dumps({"argv": argv, "background": True, "log": str(log), "changes": str(changes)}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["pid"], log

    def reap(self, pid: int) -> dict:
        """Wait for a started process to end (killed, say): the answer `run` gives."""
        self.process.stdin.write(json.dumps({"reap": pid, "changes": str(self.folder / f"reap{pid}")}) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    serve()
