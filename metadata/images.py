"""Reading one image's bytes from wherever the canonical table says it lives."""

from __future__ import annotations

from pathlib import Path


def read_image_bytes(source: str) -> bytes:
    """The encoded bytes of an image file, or of a `FILE.hdf5#KEY` entry (ISIC 2024 layout)."""
    if ".hdf5#" not in source:
        return Path(source).read_bytes()
    import h5py

    file, key = source.rsplit("#", 1)
    with h5py.File(file, "r") as handle:
        if key not in handle:
            raise OSError(f"{file} has no entry {key!r}")
        return bytes(handle[key][()])
