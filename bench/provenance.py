"""What every benchmark result records so anyone can re-run it: command, date, machine, commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def provenance() -> dict[str, object]:
    """Command line, UTC date, CPU count, platform, Python and the git commit of the checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "git_commit": commit,
    }
