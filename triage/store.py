"""Uploaded images under ROOT/<first two hex digits>/<sha256><suffix>: one file per content.

A file is written to a temporary name, flushed to disk (`fsync`), renamed into place and its folder
flushed too, all before the database row that names it commits: after a power loss a committed
lesion never points at an empty image.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from rundir.io import fsync_path


class ImageStore:
    """Content-addressed, durable image files."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str, suffix: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def put(self, content: bytes, suffix: str) -> tuple[str, bool]:
        """Store `content` durably; (its sha256, whether this call created the file)."""
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.path(sha256, suffix)
        if target.exists():
            try:  # touched, so a starting instance's sweep of old unreferenced files leaves it to this upload
                os.utime(target)
                return sha256, False
            except FileNotFoundError:  # swept meanwhile: write it again
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".upload.")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            Path(temporary).unlink(missing_ok=True)
        fsync_path(target.parent)
        return sha256, True

    def stored(self) -> list[Path]:
        """Every stored image file."""
        return [p for p in self.root.glob("??/*") if p.is_file() and not p.name.startswith(".")]
