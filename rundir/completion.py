"""Stage outputs that appear together or not at all, and readers that refuse them when incomplete or stale.

A stage writes several files (`stack`: boosters, OOF and test tables, features, the submission, the
report); an interruption between two of them would leave a run mixing the old call's outputs with the
new one's. `writing(run, stage)` leaves `RUN/.incomplete/<stage>.json` for as long as the stage writes
(an interrupted stage leaves it behind) and, once every output is written, records the finished
outputs in `RUN/.complete/<stage>.json`: when, an id, and the ids of the outputs of the stages it
`reads` (the report: the stack it describes). `require_complete(run, ...)` refuses a stage that was
interrupted, or whose outputs describe another version of a stage they read (a report older than its
stack is stale), naming the command that repairs it.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> try:
...     with writing(run, "stack"):
...         raise KeyboardInterrupt
... except KeyboardInterrupt:
...     pass
>>> incomplete_stages(run)
['stack']
>>> with writing(run, "stack"):
...     pass
>>> with writing(run, "report", reads=("stack",)):
...     pass
>>> with writing(run, "stack"):
...     pass
>>> stage_problem(run, "report").split(":")[0]
'`report` is stale'
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import RunStateError
from rundir.io import read_json, write_json
from rundir.layout import RunLayout
from rundir.lock import live_writers

# The command that (re)writes each stage's outputs, where it is not the stage's own name.
REPAIRED_BY = {"report": "report (or stack)"}


class IncompleteRunError(RunStateError):
    """A stage of the run was interrupted while writing its outputs, or describes outputs that changed since."""


def _outputs_id(run_dir: Path, stage: str) -> str | None:
    """The id of a stage's outputs as they are now: those it is writing (its marker), else its last finished ones."""
    layout = RunLayout(run_dir)
    found = read_json(layout.incomplete(stage)) or read_json(layout.complete(stage))
    return None if found is None else found.get("id")


@contextmanager
def writing(run_dir: Path, stage: str, *, reads: tuple[str, ...] = ()) -> Iterator[None]:
    """Mark `stage` as writing for the duration of the block, then record its finished outputs with the ids of
    the `reads` stages' outputs; the mark stays if the block does not finish."""
    layout = RunLayout(run_dir)
    outputs = {"stage": stage, "id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    write_json({**outputs, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, layout.incomplete(stage))
    yield
    read = {name: _outputs_id(run_dir, name) for name in reads}
    write_json({**outputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "reads": read}, layout.complete(stage))
    layout.incomplete(stage).unlink(missing_ok=True)


def incomplete_stages(run_dir: Path) -> list[str]:
    """Stages of the run that were interrupted while writing (sorted)."""
    folder = RunLayout(run_dir).incomplete_dir
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def _command(stage: str) -> str:
    name = stage.split(".")[0]
    return f"`python cli.py {REPAIRED_BY.get(name, name)}`"


def stage_problem(run_dir: Path, stage: str) -> str | None:
    """Why a reader cannot use a stage's outputs as they are (being written, interrupted, stale), or None."""
    layout = RunLayout(run_dir)
    marker = read_json(layout.incomplete(stage))
    if marker is not None:
        writers = [w for w in live_writers(run_dir) if w.command == stage.split(".")[0]]
        if writers:
            return f"`{stage}` is being written now by {writers[0].describe(time.time())}; read the run when it has finished"
        return (
            f"`{stage}` was interrupted (started {marker.get('started', '?')}) before all its outputs were written, so the run "
            f"may mix old and new ones; run {_command(stage)} on this run again"
        )
    finished = read_json(layout.complete(stage)) or {}
    changed = [name for name, described in finished.get("reads", {}).items() if _outputs_id(run_dir, name) != described]
    if changed:
        return (
            f"`{stage}` is stale: it describes the outputs `{changed[0]}` had when it finished ({finished['finished']}), and "
            f"`{changed[0]}` {_since(run_dir, changed[0])}; run {_command(stage)} on this run again"
        )
    return None


def _since(run_dir: Path, stage: str) -> str:
    """What became of a stage's outputs that another stage's outputs describe."""
    layout = RunLayout(run_dir)
    if layout.incomplete(stage).exists():
        return "is being written again, or was interrupted"
    current = read_json(layout.complete(stage))
    return "has no finished outputs now" if current is None else f"ran again (finished {current['finished']})"


def stage_states(run_dir: Path) -> dict[str, str]:
    """Each stage that has written the run: `complete (finished ...)`, or why a reader would refuse it."""
    layout = RunLayout(run_dir)
    stages = sorted({p.stem for folder in (layout.incomplete_dir, layout.complete_dir) if folder.is_dir() for p in folder.glob("*.json")})
    return {stage: stage_problem(run_dir, stage) or f"complete (finished {read_json(layout.complete(stage))['finished']})" for stage in stages}


def require_complete(run_dir: Path, *stages: str) -> None:
    """Refuse a run in which any of `stages` is being written, was interrupted while writing its outputs, or is
    stale (`train-cnns`: the assembly of any CNN, marked `train-cnns.<model>`)."""
    if "train-cnns" in stages:
        stages = (*[s for s in stages if s != "train-cnns"], *[s for s in incomplete_stages(run_dir) if s.startswith("train-cnns.")])
    for stage in stages:
        problem = stage_problem(run_dir, stage)
        if problem is not None:
            raise IncompleteRunError(f"{run_dir}: {problem}.")
