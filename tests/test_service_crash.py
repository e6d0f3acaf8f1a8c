"""The triage service killed with SIGKILL at seeded moments while clients upload, then started again on what the
crash left (its SQLite database and image folder): every upload answered 200 is there with its image readable,
and so is the image of every lesion the database holds.

`python cli.py serve` runs in a child of the fork server of `tests/killpoints.py` (warm: a life costs the
bundle's loading, not Python's start-up), on loopback, `KILLS` times in a row, with a bundle of one small CNN
(the session's bundle takes three times as long to load and warm up, and a crash test needs many lives).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from killpoints import KillPoints
from PIL import Image

KILLS = 20
CLIENTS = 4  # uploading at once, two to each patient
PATIENTS = ("crash-a", "crash-b")
SEED = 28
LONGEST_LIFE_AFTER_FIRST_ANSWER = 0.8  # seconds: each kill falls at a seeded moment within this of the life's first answered upload
SECRET = "crash-" + "x" * 30
AUTH = {"Authorization": f"Bearer {SECRET}"}


@pytest.fixture(scope="module")
def small_bundle(killpoints: KillPoints, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort's run (one CNN of 16 px on 2 folds, one epoch) exported."""
    run = tmp_path_factory.mktemp("service_crash") / "run"
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    for step in (
        ["folds", *common, "--k", "2", "--no-dedup"],
        ["train-cnns", *common, "--models", "small:16", "--epochs", "1", "--tta", "none"],
        ["stack", *common, "--rounds", "20"],
        ["export", "--run", str(run), "--out", str(run / "bundle")],
    ):
        answer = killpoints.run(step)
        assert answer["code"] == 0, answer["output"]
    return run / "bundle"


@pytest.fixture(scope="module")
def lesion_images(tiny_cohort: Path) -> Iterator[bytes]:
    """Cohort images, each made unique (bytes after the JPEG's end): every upload stores a file of its own."""
    names = pd.read_csv(tiny_cohort / "train.csv")["image_name"][:20]
    images = [(tiny_cohort / "jpeg" / "train" / f"{name}.jpg").read_bytes() for name in names]
    return (image + f"upload {n}".encode() for n, image in enumerate(itertools.cycle(images)))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(killpoints: KillPoints, bundle_dir: Path, folder: Path) -> tuple[int, str]:
    """Start the service on the folder's database and images; its process id and address, once it is ready."""
    port = _free_port()
    pid, log = killpoints.start([
        "serve", "--bundle", str(bundle_dir), "--database", f"sqlite:///{folder / 'triage.db'}", "--store", str(folder / "images"),
        "--token", f"crash={SECRET}", "--host", "127.0.0.1", "--port", str(port),
    ])
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return pid, url
        except httpx.TransportError:
            time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"the service did not start on what the crash left:\n{log.read_text()[-3000:]}")


def _upload_until_killed(url: str, patient: str, images: Iterator[bytes], lock: threading.Lock, answers: dict[str, list], first: threading.Event) -> None:
    """Upload one lesion at a time until the service is gone; record the image of every upload answered 200 (and any
    other answer: there should be none)."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        while True:
            with lock:
                content = next(images)
            try:
                answer = client.post(f"/api/v1/patients/{patient}/lesions", files=[("files", ("lesion.jpg", content, "image/jpeg"))])
            except httpx.TransportError:
                return
            if answer.status_code != 200:
                answers["other"].append((answer.status_code, answer.text))
                return
            answers["200"].append((patient, hashlib.sha256(content).hexdigest()))
            first.set()


def _check(url: str, answered: list[tuple[str, str]]) -> int:
    """Every answered upload is a lesion of its patient; every lesion's image is there and decodes. The lesions seen."""
    lesions = 0
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
        for patient in PATIENTS:
            found = client.get(f"/api/v1/patients/{patient}")
            stored = found.json()["lesions"] if found.status_code == 200 else []
            missing = {sha for p, sha in answered if p == patient} - {lesion["image_sha256"] for lesion in stored}
            assert not missing, f"{len(missing)} upload(s) of {patient} answered 200 are gone after the crash"
            for lesion in stored:
                image = client.get(f"/api/v1/lesions/{lesion['lesion_id']}/image")
                assert image.status_code == 200 and hashlib.sha256(image.content).hexdigest() == lesion["image_sha256"], lesion
                Image.open(io.BytesIO(image.content)).load()
            lesions += len(stored)
    return lesions


def test_uploads_answered_before_a_kill_survive_it_with_their_images(killpoints: KillPoints, small_bundle: Path, lesion_images: Iterator[bytes], tmp_path: Path) -> None:
    rng = np.random.default_rng(SEED)
    answers: dict[str, list] = {"200": [], "other": []}
    lock = threading.Lock()
    for life in range(KILLS + 1):
        pid, url = _start(killpoints, small_bundle, tmp_path)
        assert _check(url, answers["200"]) >= len(answers["200"])
        if life == KILLS:
            break
        first = threading.Event()
        clients = [
            threading.Thread(target=_upload_until_killed, args=(url, PATIENTS[i % 2], lesion_images, lock, answers, first), daemon=True)
            for i in range(CLIENTS)
        ]
        for client in clients:
            client.start()
        assert first.wait(120), f"no upload was answered: {answers['other'][:1]}"
        time.sleep(rng.uniform(0, LONGEST_LIFE_AFTER_FIRST_ANSWER))
        os.kill(pid, signal.SIGKILL)
        assert killpoints.reap(pid)["killed"]
        for client in clients:
            client.join(60)
        assert not answers["other"], answers["other"][:3]
    os.kill(pid, signal.SIGTERM)
    killpoints.reap(pid)
    assert len(answers["200"]) >= KILLS
