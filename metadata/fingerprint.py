"""The run's data fingerprint in RUN/manifest.json: a hash of the canonical table and of every image's bytes.

A result can then be traced to the exact data that produced it, and a stage run on changed data is
noticed (logged) rather than silently mixed with outputs of the old data.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from metadata.images import ImageBytesReader
from rundir.manifest import read_manifest, update_manifest

log = logging.getLogger(__name__)


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
