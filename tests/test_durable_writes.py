"""Atomic writes are durable: the temp file reaches the disk before the rename, the rename before the call returns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import rundir.io as run_io


def test_an_atomic_write_flushes_the_file_before_its_rename_and_the_folder_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_open = os.fsync, os.replace, os.open
    opened: dict[int, str] = {}

    def open_(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        handle = real_open(path, flags, *args, **kwargs)
        opened[handle] = Path(path).name
        return handle

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", lambda handle: (events.append(("fsync", opened.get(handle, "?"))), real_fsync(handle))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(b).name)), real_replace(a, b))[1])
    target = tmp_path / "runs" / "table.json"
    run_io.write_json({"a": 1}, target)

    renamed = events.index(("rename", "table.json"))
    flushed_file = [i for i, (kind, name) in enumerate(events) if kind == "fsync" and name.startswith(".table.json.")]
    assert flushed_file and flushed_file[-1] < renamed, events  # the bytes are on disk before the name points at them
    assert ("fsync", "runs") in events[renamed + 1 :], events  # and the rename itself before the call returns
    assert run_io.read_json(target) == {"a": 1}
