"""Where a run's numbers come from: the run manifest when the run has one, else what the report can still tell.

`RUN/manifest.json` (`rundir.manifest`: packages, git commit, config, data fingerprint, wall time
per stage) is written by the stages themselves. A run from before the manifest existed gets the
versions and commit of the code writing the report, plus the settings and training seconds the
stages left in their own files, and the report says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from rundir.layout import HISTORY_FILE, MANIFEST_FILE, RunLayout
from rundir.manifest import git_commit, package_versions, read_manifest


def _stage_records(run_dir: Path) -> dict[str, object]:
    """Each CNN's config and summed training seconds (history.json) and the stack's settings (features.json)."""
    cnn_configs: dict[str, object] = {}
    cnn_seconds = 0.0
    for history_file in sorted(RunLayout(run_dir).cnn.glob(f"*/fold*/{HISTORY_FILE}")):
        history = json.loads(history_file.read_text())
        cnn_configs[history["model"]] = history["config"]
        cnn_seconds += history["seconds"]
    config: dict[str, object] = {"train-cnns": cnn_configs}
    stack_file = RunLayout(run_dir).stack_recipe
    if stack_file.exists():
        config["stack"] = {k: v for k, v in json.loads(stack_file.read_text()).items() if k != "features"}
    return {"config": config, "stage_seconds": {"train-cnns (fitting only, from history.json)": round(cnn_seconds, 1)}}


def run_provenance(run_dir: Path) -> dict[str, object]:
    """The run manifest if present; otherwise versions and commit now, plus the stages' own records."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if manifest:
        return {"source": str(run_dir / MANIFEST_FILE), **manifest}
    return {
        "source": f"no {MANIFEST_FILE} in the run: packages and commit of the code that wrote this report",
        "packages": package_versions(),
        "git_commit": git_commit(),
        **_stage_records(run_dir),
    }
