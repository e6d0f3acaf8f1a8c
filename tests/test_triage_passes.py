"""Concurrent uploads share CNN passes (`triage.lesions.CombinedPasses`), and a bad image fails only its own upload."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from errors import DataError
from triage.lesions import CombinedPasses


def slow_scorer(calls: list[list[str]]):  # noqa: ANN201
    def score(sources: list[str]) -> list[dict[str, object]]:
        calls.append(list(sources))
        time.sleep(0.05)
        if any(source.startswith("bad") for source in sources):
            raise DataError("cannot decode")
        return [{"source": source} for source in sources]

    return score


def test_waiting_uploads_share_a_pass_and_each_gets_its_own_records() -> None:
    calls: list[list[str]] = []
    passes = CombinedPasses(slow_scorer(calls), threading.Lock())
    uploads = [[f"u{i}_a", f"u{i}_b"] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(passes, uploads))
    assert results == [[{"source": s} for s in upload] for upload in uploads]
    assert len(calls) < len(uploads)  # some shared a pass
    assert sorted(s for call in calls for s in call) == sorted(s for upload in uploads for s in upload)  # each image scored once


def test_a_bad_image_fails_only_its_own_upload() -> None:
    calls: list[list[str]] = []
    passes = CombinedPasses(slow_scorer(calls), threading.Lock())
    uploads = [["good_0"], ["bad_1"], ["good_2"], ["good_3"]]

    def upload(sources: list[str]) -> object:
        try:
            return passes(sources)
        except DataError as error:
            return error

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(upload, uploads))
    assert isinstance(results[1], DataError)
    assert [results[i] for i in (0, 2, 3)] == [[{"source": u[0]}] for u in (uploads[0], uploads[2], uploads[3])]


def test_a_bug_reaches_every_upload_of_the_pass() -> None:
    def broken(sources: list[str]) -> list[dict[str, object]]:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        CombinedPasses(broken, threading.Lock())(["a"])
