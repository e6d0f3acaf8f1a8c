"""Reading image bytes from wherever the canonical table says they live."""

from __future__ import annotations

import io
from pathlib import Path
from types import TracebackType
from typing import Any

from PIL import Image

HDF5_MARK = ".hdf5#"  # `FILE.hdf5#KEY`: the entry KEY of an HDF5 file (the ISIC 2024 layout)


def hdf5_source(file: str | Path, key: str) -> str:
    """The image source of entry `key` of HDF5 file `file`.

    >>> hdf5_source("train-image.hdf5", "ISIC_0015670"), split_hdf5_source("train-image.hdf5#ISIC_0015670")
    ('train-image.hdf5#ISIC_0015670', ('train-image.hdf5', 'ISIC_0015670'))
    """
    return f"{file}#{key}"


def is_hdf5_source(source: str) -> bool:
    return HDF5_MARK in source


def split_hdf5_source(source: str) -> tuple[str, str]:
    """(file, key) of an HDF5 image source."""
    file, key = source.rsplit("#", 1)
    return file, key


class ImageBytesReader:
    """Reads image files or `FILE.hdf5#KEY` entries (ISIC 2024 layout), opening each HDF5 file once.

    Use it as a context manager around a loop over many images; HDF5 handles close on exit.
    """

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def read(self, source: str) -> bytes:
        """The encoded bytes of one image."""
        if not is_hdf5_source(source):
            return Path(source).read_bytes()
        import h5py

        file, key = split_hdf5_source(source)
        if file not in self._handles:
            self._handles[file] = h5py.File(file, "r")
        if key not in self._handles[file]:
            raise OSError(f"{file} has no entry {key!r}")
        return bytes(self._handles[file][key][()])

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> ImageBytesReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


EXIF_ORIENTATION_TAG = 0x0112


def exif_orientation(encoded: bytes) -> int:
    """The EXIF orientation (1-8) of an encoded image, 1 when it has none (read from the header only).

    Phones and clinical cameras store the sensor's pixels and say in this tag how to turn them; every
    viewer applies it, so the pipeline does too (training, prediction, Grad-CAM, duplicate scan).
    """
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # not an image PIL knows: the decoder says so, with the file's name
        return 1
    return int(orientation) if orientation in range(1, 9) else 1


def read_image_bytes(source: str) -> bytes:
    """The encoded bytes of a single image (for loops, hold one `ImageBytesReader` instead)."""
    with ImageBytesReader() as reader:
        return reader.read(source)
