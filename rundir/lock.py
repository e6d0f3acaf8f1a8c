"""One writer per run: lock files that name their holder, taken atomically, taken over when their holder died.

Every command that writes a run holds its lock while it writes:

    RUN/.lock/writer.json           the one command writing the run (folds, tfrecords, features, stack, report, submit)
    RUN/.lock/shared-<token>.json   each `train-cnns` job: jobs share the run, each claiming its own (model, fold)
                                    pairs (`cnn.pairs`), and keep every other writer out while they train

A second writer refuses at once, naming the holder (command, process, host, start time), or with
`wait=True` waits for it. A lock file is created whole or not at all (written under a temporary name,
then hard-linked into place, which fails when the name exists: atomic on local and network file
systems alike), and its holder refreshes its heartbeat every `HEARTBEAT_SECONDS`. A holder is dead
when, on its own host, its process is gone, or, on any host, its heartbeat is older than
`STALE_AFTER_SECONDS` (on a network file system another machine's PID means nothing); the next
command takes a dead holder's lock over with a note.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> with run_lock(run, "stack"):
...     try:
...         with run_lock(run, "report"):
...             pass
...     except RunLockedError as error:
...         print("refused:", "being written by `stack` (pid" in str(error))
refused: True
>>> with run_lock(run, "report"):  # released when the block ends
...     pass
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from errors import RunStateError
from rundir.io import fsync_path, read_json, write_json
from rundir.layout import RunLayout

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 4 * HEARTBEAT_SECONDS  # a heartbeat older than this belongs to a dead or stuck process
WAIT_POLL_SECONDS = 1.0
Note = Callable[[str], None]


def process_alive(pid: int) -> bool:
    """Whether a process of this host has that id (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: the command, its process and host, when it started and when it last showed it is alive."""

    command: str
    host: str
    pid: int
    started: float
    updated: float
    token: str  # tells this holding apart from any other, of the same process too

    @classmethod
    def this_process(cls, command: str) -> Holder:
        now = time.time()
        return cls(command, socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder a lock file names; None when there is none (a heartbeat of an earlier version counts, as `train-cnns`)."""
        found = read_json(path)
        if found is None:
            return None
        return cls(found.get("command", "train-cnns"), found["host"], int(found["pid"]), found["started"], found["updated"], found.get("token", ""))

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"`{self.command}` (pid {self.pid} on {self.host}, started {started}, heartbeat {now - self.updated:.0f} s ago)"

    def dead_because(self, now: float) -> str | None:
        """Why the holder can no longer be at work, or None while it may be."""
        if now - self.updated > STALE_AFTER_SECONDS:
            return f"its heartbeat stopped {now - self.updated:.0f} s ago"
        if self.host == socket.gethostname() and not process_alive(self.pid):
            return f"its process {self.pid} is gone"
        return None


def _create(path: Path, holder: Holder) -> bool:
    """Make `path` name `holder` if no file has that name (the whole content appears at once); whether it did."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{holder.token}.tmp")
    temporary.write_text(json.dumps(asdict(holder)))
    fsync_path(temporary)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(path.parent)
    return True


def _take_over(path: Path, dead: Holder) -> bool:
    """Remove a dead holder's lock file, unless it changed hands after it was judged dead (then it is put back)."""
    grave = path.with_name(f".{path.name}.{uuid.uuid4().hex}.dead")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return False  # another command took it over first
    try:
        moved = Holder.read(grave)
        if moved is None or moved.token != dead.token:
            with suppress(FileExistsError):
                os.link(grave, path)
            return False
        return True
    finally:
        grave.unlink(missing_ok=True)


def live_holder(path: Path, note: Note) -> Holder | None:
    """The live holder of a lock file; a dead holder's file is taken over (with a note) and None returned."""
    while (holder := Holder.read(path)) is not None:
        now = time.time()
        why = holder.dead_because(now)
        if why is None:
            return holder
        if _take_over(path, holder):
            note(f"took over the lock {path} of {holder.describe(now)}: {why}")
    return None


def acquire(path: Path, holder: Holder, note: Note) -> Holder | None:
    """Create the lock file `path` for `holder`, taking over a dead holder's; the live holder in the way, if any."""
    while not _create(path, holder):
        in_the_way = live_holder(path, note)
        if in_the_way is not None:
            return in_the_way
    return None


def release(path: Path, holder: Holder) -> None:
    """Remove the lock file if it is still `holder`'s."""
    current = Holder.read(path)
    if current is not None and current.token == holder.token:
        path.unlink(missing_ok=True)


@contextmanager
def holding(path: Path, holder: Holder, interval: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Keep an acquired lock file's heartbeat fresh from a thread while the block runs; release it after.

    A thread rather than a beat per step of work, since one step (an epoch of a large model, a
    report's bootstrap) can outlast any sensible staleness limit.
    """
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(interval):
            current = Holder.read(path)
            if current is None or current.token != holder.token:
                log.warning("the lock %s was taken from %s: another command judged it dead", path, holder.describe(time.time()))
                return
            write_json(asdict(replace(holder, updated=time.time())), path)

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        release(path, holder)


class RunLockedError(RunStateError):
    """Another command is writing the run."""


def _lock_run(layout: RunLayout, holder: Holder, *, shared: bool, note: Note) -> Holder | None:
    """One try at the run's lock: the writer's file, or with `shared` a file of this job's own that only the
    writer's keeps out. Both kinds create their file first and then look for the other kind, so of two
    commands starting together at least one sees the other; the one that does backs off. Returns the
    holder in the way, if any."""
    mine = layout.shared_lock(holder.token) if shared else layout.writer_lock
    in_the_way = acquire(mine, holder, note)  # a shared file's name is this job's own: always created
    if in_the_way is not None:
        return in_the_way
    others = [layout.writer_lock] if shared else layout.shared_locks
    in_the_way = next((h for p in others if (h := live_holder(p, note)) is not None), None)
    if in_the_way is not None:
        release(mine, holder)
    return in_the_way


@contextmanager
def run_lock(run_dir: Path, command: str, *, shared: bool = False, wait: bool = False, note: Note = log.warning) -> Iterator[None]:
    """Hold the run's lock while the block writes it (`shared`: alongside other holders that share it, as
    `train-cnns` jobs do); refuse at once, naming the holder, or with `wait` wait for it."""
    layout = RunLayout(run_dir)
    holder = Holder.this_process(command)
    waiting_for = None
    while (in_the_way := _lock_run(layout, holder, shared=shared, note=note)) is not None:
        now = time.time()
        if not wait:
            raise RunLockedError(
                f"{run_dir}: the run is being written by {in_the_way.describe(now)}; wait for it to finish, or add --wait to start "
                f"when it does. A lock whose process died is taken over by the next command (at once on its host, elsewhere "
                f"once its heartbeat is {STALE_AFTER_SECONDS:.0f} s old; the lock files are in {layout.lock_dir})."
            )
        if in_the_way.token != waiting_for:
            note(f"waiting for {in_the_way.describe(now)} to finish writing {run_dir} (--wait)")
            waiting_for = in_the_way.token
        time.sleep(WAIT_POLL_SECONDS * random.uniform(0.5, 1.5))  # jittered: two waiting commands do not retry in step
    with holding(layout.shared_lock(holder.token) if shared else layout.writer_lock, holder):
        yield


def live_writers(run_dir: Path) -> list[Holder]:
    """The commands writing the run now (read only: nothing is taken over)."""
    layout = RunLayout(run_dir)
    now = time.time()
    found = [Holder.read(p) for p in (layout.writer_lock, *layout.shared_locks)]
    return [h for h in found if h is not None and h.dead_because(now) is None]
