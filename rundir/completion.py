"""Stage outputs that appear together or not at all: a marker while a stage writes, checked by every reader.

A stage writes several files (`stack`: boosters, OOF and test tables, features, the submission); an
interruption between two of them would leave a run mixing the old call's outputs with the new one's.
`writing(run, stage)` leaves `RUN/.incomplete/<stage>.json` for as long as the stage writes (an
interrupted stage leaves it behind), and `require_complete(run, ...)` refuses a run whose stage
was interrupted, with the command that repairs it.

>>> import tempfile
>>> run = Path(tempfile.mkdtemp())
>>> try:
...     with writing(run, "stack"):
...         raise KeyboardInterrupt
... except KeyboardInterrupt:
...     pass
>>> incomplete_stages(run)
['stack']
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from errors import RunStateError
from rundir.io import read_json, write_json
from rundir.layout import RunLayout


class IncompleteRunError(RunStateError):
    """A stage of the run was interrupted while writing its outputs."""


@contextmanager
def writing(run_dir: Path, stage: str) -> Iterator[None]:
    """Mark `stage` as writing for the duration of the block; the mark stays if the block does not finish."""
    marker = RunLayout(run_dir).incomplete(stage)
    write_json({"stage": stage, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid()}, marker)
    yield
    marker.unlink(missing_ok=True)


def incomplete_stages(run_dir: Path) -> list[str]:
    """Stages of the run that were interrupted while writing (sorted)."""
    folder = RunLayout(run_dir).incomplete_dir
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def require_complete(run_dir: Path, *stages: str) -> None:
    """Refuse a run in which any of `stages` was interrupted while writing its outputs (`train-cnns`:
    the assembly of any CNN, marked `train-cnns.<model>`)."""
    if "train-cnns" in stages:
        stages = (*[s for s in stages if s != "train-cnns"], *[s for s in incomplete_stages(run_dir) if s.startswith("train-cnns.")])
    for stage in stages:
        marker = read_json(RunLayout(run_dir).incomplete(stage))
        if marker is not None:
            raise IncompleteRunError(
                f"{run_dir}: `{stage}` was interrupted (started {marker.get('started', '?')}) before all its outputs were "
                f"written, so the run may mix old and new ones; run `python cli.py {stage.split('.')[0]}` on this run again."
            )
