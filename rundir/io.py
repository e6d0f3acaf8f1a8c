"""Run-directory file IO shared by every stage.

Stages talk only through files, so every artifact is written atomically (temp file + rename):
a crash never leaves a half-written table that a later stage could mistake for a finished one.
The rename is durable too: the temp file is flushed to disk (`fsync`) before it, the folder after,
so a power loss cannot leave a renamed but empty file (a zero-length parquet).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from errors import RunStateError


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (a rename into it), to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, flush the temp file to disk, rename it onto `path` and flush the folder.

    The temp file keeps the target's extensions (`.tmp.weights.h5`), since some writers (Keras)
    choose the format by them; its leading dot and `.tmp` keep it from being read as an artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write a parquet table atomically."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def read_table(path: Path, what: str) -> pd.DataFrame:
    """Read a parquet table, naming the stage that should have produced it when absent."""
    path = Path(path)
    if not path.exists():
        raise RunStateError(f"{path} is missing: run `{what}` first.")
    return pd.read_parquet(path)


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it does not exist (it may vanish between a check and the read)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def write_json(obj: Any, path: Path) -> Path:
    """Write JSON atomically (pretty-printed, stable key order)."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))


def write_text(text: str, path: Path) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
