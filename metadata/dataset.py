"""Read any supported layout into the canonical table, applying the bad-image policy.

Every stage reads data only through `load_dataset`. A listed image whose file is missing or
cannot be decoded is an error by default (`on_bad_image="raise"`); with `"skip"` its row is
dropped and recorded in `LoadedDataset.skipped`, which the CLI writes to the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from errors import DataError
from metadata.fingerprint import record_data_fingerprint
from metadata.formats import DATASET_FORMATS, IMAGE_SUFFIXES, detect_format
from metadata.images import HDF5_MARK, is_hdf5_source
from metadata.schema import validate_canonical
from rundir.io import atomic_write
from rundir.layout import RunLayout

BAD_IMAGE_POLICIES = ("raise", "skip")
SPLITS = ("all", "train", "test")  # the rows of a data folder a command can take


@dataclass
class LoadedDataset:
    """The canonical table, the layout it came from, and what was skipped or left unlisted."""

    table: pd.DataFrame
    format_name: str
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["image_id", "reason"]))
    unlisted_images: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a user should be told about how the data was read


TEST_LISTS = ("test.csv", "test-metadata.csv")  # the competition layouts' test-split files


def _image_folders(table: pd.DataFrame) -> set[Path]:
    paths = table["image_path"].dropna()
    return {Path(p).parent for p in paths if not is_hdf5_source(p)}


def _hdf5_keys_missing(table: pd.DataFrame) -> pd.Series:
    """True for rows whose `FILE.hdf5#KEY` source has no such key (or no such file)."""
    import h5py

    sources = table["image_path"].dropna()
    sources = sources[sources.str.contains(HDF5_MARK, regex=False)]
    missing = pd.Series(False, index=table.index)
    if sources.empty:
        return missing
    file_and_key = sources.str.rsplit("#", n=1)  # split_hdf5_source, vectorised
    for file, rows in file_and_key.groupby(file_and_key.str[0]):
        if not Path(file).exists():
            missing[rows.index] = True
            continue
        with h5py.File(file, "r") as handle:
            keys = set(handle.keys())
        missing[rows.index] = ~rows.str[1].isin(keys)
    return missing


def missing_image_rows(table: pd.DataFrame) -> pd.Series:
    """True for rows that list an image whose file (or HDF5 key) does not exist."""
    paths = table["image_path"]
    is_file = paths.notna() & ~paths.fillna("").str.contains(HDF5_MARK, regex=False)
    missing = pd.Series([not Path(p).exists() for p in paths[is_file]], index=paths[is_file].index, dtype=bool)
    return missing.reindex(table.index, fill_value=False) | _hdf5_keys_missing(table)


def unlisted_images(table: pd.DataFrame) -> list[str]:
    """Image files in the data's image folders that no row lists (often a sign of a stale CSV)."""
    listed = set(table["image_path"].dropna())
    return sorted(
        str(p)
        for folder in _image_folders(table)
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and str(p) not in listed
    )


def load_dataset(
    root: Path, format_name: str | None = None, metadata: Path | None = None, on_bad_image: str = "raise"
) -> LoadedDataset:
    """Read `root` into the canonical table (auto-detecting its layout unless named)."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"--on-bad-image {on_bad_image!r}: choose one of {BAD_IMAGE_POLICIES}.")
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    if metadata is not None and not Path(metadata).is_file():
        raise DataError(f"--metadata {metadata}: no such file.")
    if format_name is None:
        fmt = detect_format(root)
    elif format_name in DATASET_FORMATS:
        fmt = DATASET_FORMATS[format_name]
    else:
        raise DataError(f"unknown format {format_name!r}; choose one of {sorted(DATASET_FORMATS)}.")
    table = fmt.load(root, Path(metadata) if metadata else None).reset_index(drop=True)
    validate_canonical(table, root, has_patients=fmt.has_patients)
    missing = missing_image_rows(table)
    skipped = pd.DataFrame({"image_id": table.loc[missing, "image_id"], "reason": "image file missing"})
    if missing.any() and on_bad_image == "raise":
        first = table[missing].iloc[0]
        raise DataError(
            f"{root}: {int(missing.sum())} listed image(s) have no file (first: {first['image_id']} at "
            f"{first['image_path']}); add the files, remove their rows, or pass --on-bad-image skip."
        )
    no_test = not (table["split"] == "test").any()
    notes = [f"{root / name} lists no images: training without a test split (no submission)" for name in TEST_LISTS if no_test and (root / name).is_file()]
    return LoadedDataset(
        table=table[~missing].reset_index(drop=True),
        format_name=fmt.name,
        notes=notes,
        skipped=skipped.reset_index(drop=True),
        unlisted_images=unlisted_images(table),
    )




def record_skipped(run_dir: Path, skipped: pd.DataFrame) -> pd.DataFrame:
    """Add skipped images to RUN/skipped_images.csv (image_id, reason); return the whole list."""
    path = RunLayout(run_dir).skipped
    previous = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame(columns=["image_id", "reason"])
    merged = pd.concat([previous, skipped[["image_id", "reason"]].astype(str)]).drop_duplicates("image_id")
    atomic_write(path, lambda tmp: merged.to_csv(tmp, index=False))
    return merged


@dataclass(frozen=True)
class RunData:
    """The data as one run uses it."""

    table: pd.DataFrame  # canonical rows, without the images the run skipped
    format_name: str  # the data's layout
    newly_skipped: int  # images found missing now (added to RUN/skipped_images.csv)
    notes: list[str] = field(default_factory=list)


def run_data(data: Path, run_dir: Path, *, fmt: str | None = None, metadata: Path | None = None, on_bad_image: str = "raise") -> RunData:
    """The canonical table of `data` as the run in `run_dir` uses it.

    Images with no file are skipped (with `on_bad_image="skip"`) and recorded; images the run skipped
    before (e.g. unreadable ones found by `folds`) stay out; the data's fingerprint goes to the
    manifest, so a later stage on other data is caught.
    """
    loaded = load_dataset(data, fmt, metadata, on_bad_image)
    if len(loaded.skipped):
        record_skipped(run_dir, loaded.skipped)
    table = drop_skipped(loaded.table, run_dir)
    record_data_fingerprint(run_dir, table)
    return RunData(table=table, format_name=loaded.format_name, newly_skipped=len(loaded.skipped), notes=loaded.notes)


def drop_skipped(table: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """The table without the images a run decided to skip (listed in RUN/skipped_images.csv)."""
    path = RunLayout(run_dir).skipped
    if not path.exists():
        return table
    skipped = set(pd.read_csv(path, dtype=str)["image_id"])
    return table[~table["image_id"].isin(skipped)].reset_index(drop=True)
