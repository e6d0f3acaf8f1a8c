"""Shared by the benchmarks: provenance of a result, and running CLI steps with their timings."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from cnn.options import COLOR_CONSTANCY_CHOICES

ROOT = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, object]:
    """Command line, UTC date, CPU count, platform, Python and the git commit of the checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git_commit": commit,
    }


TRAINED_WITH_KEYS = ("image_size", "epochs", "learning_rate", "weight_decay", "class_weight", "augment", "mix", "tta", "seed",
                     "color_constancy", "illuminant_augment")


def trained_with(model_dir: Path) -> dict[str, object]:
    """A CNN member's own recipe, from its first fold's history: a run may add a member in a later
    call with other options than the bench's command line says."""
    history = json.loads(sorted(model_dir.glob("fold*/history.json"))[0].read_text())
    return {key: history["config"].get(key) for key in TRAINED_WITH_KEYS}


def run_cli_steps(steps: list[list[str]]) -> dict[str, float]:
    """Run `cli.py` commands in this process, stopping at the first failure; seconds per command."""
    from cli import app

    seconds = {}
    for step in steps:
        started = time.perf_counter()
        result = CliRunner().invoke(app, step)
        seconds[step[0]] = round(time.perf_counter() - started, 1)
        if result.exit_code != 0:
            raise SystemExit(f"{step[0]} failed:\n{result.output}\n{result.exception!r}")
    return seconds


def cnn_bench_parser(description: str, dataset: str) -> argparse.ArgumentParser:
    """Options shared by the CNN benchmarks on a `../shared/data/<dataset>` folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / dataset)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / f"bench_{dataset}")
    parser.add_argument("--models", default="small:64", help="backbones with sizes, as for train-cnns")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--color-constancy", default="none", choices=COLOR_CONSTANCY_CHOICES, help="as for train-cnns")
    parser.add_argument("--illuminant-augment", action="store_true", help="as for train-cnns")
    return parser
