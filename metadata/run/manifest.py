"""RUN/manifest.json and RUN/config.json: what produced a run, so a result can be traced and repeated.

manifest.json keys:

    packages          python and the installed version of each dependency of the project
    git_commit        HEAD of the code's checkout, `-dirty` when tracked files differ from it (None outside git)
    config            each stage's resolved options (the same as RUN/config.json)
    data_fingerprint  SHA-256 of the canonical table and of every image's bytes, with row and image counts
    stage_seconds     stage -> wall seconds of its last successful run

Every stage updates both files atomically (read, change, rename). Jobs of one run on several
machines may race on them; the last writer wins, which loses nothing that matters, since they
record the same packages, code, options and data.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from metadata.images import ImageBytesReader
from metadata.run.io import read_json, write_json
from metadata.run.layout import RunLayout

PROJECT = "melanoma-pipeline"
CODE_DIR = Path(__file__).resolve().parents[2]  # the repository (this file is metadata/run/manifest.py)
PER_STAGE_KEYS = ("config", "stage_seconds")  # stage -> entry: a stage replaces its own entry only

log = logging.getLogger(__name__)


def _read(path: Path) -> dict[str, Any]:
    return read_json(path) or {}


def read_manifest(run_dir: Path) -> dict[str, Any]:
    return _read(RunLayout(run_dir).manifest)


def update_manifest(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """Set top-level keys of the manifest (for PER_STAGE_KEYS, the given stages' entries) and write it atomically."""
    manifest = read_manifest(run_dir)
    for key, value in changes.items():
        manifest[key] = {**manifest.get(key, {}), **value} if key in PER_STAGE_KEYS else value
    write_json(manifest, RunLayout(run_dir).manifest)
    return manifest


def declared_dependencies() -> list[str]:
    """The project's declared (non-extra) dependencies; empty in a checkout that was never pip-installed."""
    try:
        requirements = importlib.metadata.requires(PROJECT) or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    return [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in requirements if "extra ==" not in r]


def package_versions(names: Sequence[str] | None = None) -> dict[str, str]:
    """Python and the installed version of each package (default: the project's declared dependencies)."""
    names = declared_dependencies() if names is None else names
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(repo: Path = CODE_DIR) -> str | None:
    """HEAD's commit, `-dirty` when tracked files differ from it; None outside a git checkout."""
    git = ["git", "-C", str(repo)]
    quiet = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: never refresh the index
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True, env=quiet)
        changes = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True, env=quiet
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if changes.stdout.strip() else "")


def table_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 of the canonical table, rows by image id and columns by name.

    Image paths are left out: the same data mounted elsewhere (another machine) is the same data.
    """
    canonical = table.drop(columns=["image_path"]).sort_values("image_id").reset_index(drop=True)
    return hashlib.sha256(canonical[sorted(canonical.columns)].to_csv(index=False).encode()).hexdigest()


def images_fingerprint(table: pd.DataFrame) -> str:
    """SHA-256 over every image's id, length and bytes in image id order, one image in memory at a time."""
    digest = hashlib.sha256()
    rows = table[table["image_path"].notna()].sort_values("image_id")
    with ImageBytesReader() as reader:
        for image_id, source in zip(rows["image_id"], rows["image_path"]):
            data = reader.read(source)
            digest.update(f"{image_id}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def record_data_fingerprint(run_dir: Path, table: pd.DataFrame) -> dict[str, Any]:
    """Fingerprint the run's data. The image bytes are hashed only when the table's hash is new,
    so each stage pays for one cheap table hash rather than reading every image again."""
    table_hash = table_fingerprint(table)
    known = read_manifest(run_dir).get("data_fingerprint")
    if known and known["table_sha256"] == table_hash:
        return known
    if known:
        log.warning("the data differ from those an earlier stage of %s recorded; its outputs may not match them", run_dir)
    fingerprint = {
        "table_sha256": table_hash,
        "images_sha256": images_fingerprint(table),
        "rows": len(table),
        "images": int(table["image_path"].notna().sum()),
    }
    update_manifest(run_dir, data_fingerprint=fingerprint)
    return fingerprint


def record_stage_start(run_dir: Path, stage: str, options: dict[str, Any]) -> None:
    """Write the stage's resolved options to RUN/config.json and the manifest, with packages and commit."""
    resolved = {**_read(RunLayout(run_dir).resolved_config), stage: options}
    write_json(resolved, RunLayout(run_dir).resolved_config)
    update_manifest(run_dir, packages=package_versions(), git_commit=git_commit(), config={stage: options})


def record_stage_seconds(run_dir: Path, stage: str, seconds: float) -> None:
    update_manifest(run_dir, stage_seconds={stage: round(seconds, 3)})
