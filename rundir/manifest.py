"""RUN/manifest.json and RUN/config.json: what produced a run, so a result can be traced and repeated.

manifest.json keys:

    packages          python and the installed version of each dependency of the project
    git_commit        HEAD of the code's checkout, `-dirty` when tracked files differ from it (None outside git)
    config            each stage's resolved options (the same as RUN/config.json)
    data_fingerprint  SHA-256 of the canonical table and of every image's bytes, with row and image counts
                      (written by metadata.fingerprint)
    stage_seconds     stage -> wall seconds of its last successful run

Every stage updates both files atomically (read, change, rename). Jobs of one run on several
machines may race on them; the last writer wins, which loses nothing that matters, since they
record the same packages, code, options and data.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rundir.io import read_json, write_json
from rundir.layout import RunLayout

PROJECT = "melanoma-pipeline"
CODE_DIR = Path(__file__).resolve().parents[1]  # the repository (this file is rundir/manifest.py)
PER_STAGE_KEYS = ("config", "stage_seconds")  # stage -> entry: a stage replaces its own entry only


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


def record_stage_start(run_dir: Path, stage: str, options: dict[str, Any]) -> None:
    """Write the stage's resolved options to RUN/config.json and the manifest, with packages and commit."""
    resolved = {**_read(RunLayout(run_dir).resolved_config), stage: options}
    write_json(resolved, RunLayout(run_dir).resolved_config)
    update_manifest(run_dir, packages=package_versions(), git_commit=git_commit(), config={stage: options})


def record_stage_seconds(run_dir: Path, stage: str, seconds: float) -> None:
    update_manifest(run_dir, stage_seconds={stage: round(seconds, 3)})
