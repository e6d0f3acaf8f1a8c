"""The canonical table: one row per image, whatever layout the data came in.

Every stage reads data only through `load_dataset`, so supporting a new published layout means
adding one entry to `DATASET_FORMATS`. Columns of the canonical table:

- `image_id`: the image's id (file stem), unique over train and test
- `patient_id`: patient (or the lesion / image id when the layout has no patients)
- `split`: "train" or "test"
- `image_path`: absolute path of the image file, or missing for metadata-only data
- `target`: 1 melanoma, 0 not, missing on test rows
- `diagnosis`: the diagnosis text where the layout gives one (never a feature)
- `age`: float, missing kept missing
- `sex`: "male" / "female" / missing
- `site`: anatomic site in `SITES`, or missing
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SITES: tuple[str, ...] = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "torso",
    "palms/soles",
    "oral/genital",
)
SEXES: tuple[str, ...] = ("female", "male")
CANONICAL_COLUMNS: tuple[str, ...] = (
    "image_id",
    "patient_id",
    "split",
    "image_path",
    "target",
    "diagnosis",
    "age",
    "sex",
    "site",
)
_MISSING_TEXT = {"", "unknown", "nan", "none", "na", "n/a"}


class DataError(ValueError):
    """Input data the pipeline cannot use; the message names the file, the row and the fix."""


@dataclass(frozen=True)
class DatasetFormat:
    """A published data layout: how to recognise it in a folder and read it canonically."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], pd.DataFrame]


def _clean_category(values: pd.Series, vocabulary: tuple[str, ...], file: Path, column: str) -> pd.Series:
    """Lower-case, map missing spellings to NA, and refuse values outside the vocabulary."""
    text = values.astype("string").str.strip().str.lower()
    text = text.mask(text.isna() | text.isin(_MISSING_TEXT))
    unknown = text.notna() & ~text.isin(vocabulary)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise DataError(
            f"{file}: row {row + 2} has {column}={values.iloc[row]!r}, not one of {list(vocabulary)}; "
            "fix the value or leave the cell empty to mark it missing."
        )
    return text.astype(pd.CategoricalDtype(categories=list(vocabulary)))


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], file: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{file}: missing required column(s) {missing}; found {list(frame.columns)}.")


def _read_csv(file: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(file, dtype={"image_name": "string", "patient_id": "string"})
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{file} is empty: expected a header row and one row per image.") from error
    if frame.empty:
        raise DataError(f"{file} has a header but no rows.")
    return frame


def _siim2020_detect(root: Path) -> bool:
    return (root / "train.csv").exists() and (root / "jpeg").is_dir()


def _siim2020_load(root: Path) -> pd.DataFrame:
    """SIIM-ISIC 2020: train.csv / test.csv beside jpeg/train and jpeg/test."""
    parts = []
    for split in ("train", "test"):
        file = root / f"{split}.csv"
        if not file.exists():
            if split == "train":
                raise DataError(f"{file} is missing.")
            continue
        raw = _read_csv(file)
        required = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge")
        _require_columns(raw, required + (("target",) if split == "train" else ()), file)
        image_dir = root / "jpeg" / split
        ages = pd.to_numeric(raw["age_approx"], errors="coerce")
        bad_age = raw["age_approx"].notna() & ages.isna()
        if bad_age.any():
            row = int(np.flatnonzero(bad_age.to_numpy())[0])
            raise DataError(
                f"{file}: row {row + 2} has age_approx={raw['age_approx'].iloc[row]!r}, not a number; "
                "write the age in years or leave the cell empty."
            )
        frame = pd.DataFrame(
            {
                "image_id": raw["image_name"].astype("string"),
                "patient_id": raw["patient_id"].astype("string"),
                "split": split,
                "image_path": [str(image_dir / f"{name}.jpg") for name in raw["image_name"]],
                "target": (
                    pd.to_numeric(raw["target"], errors="raise").astype("Int8")
                    if split == "train"
                    else pd.array([pd.NA] * len(raw), dtype="Int8")
                ),
                "diagnosis": raw.get("diagnosis", pd.Series(pd.NA, index=raw.index)).astype("string"),
                "age": ages.astype(float),
                "sex": _clean_category(raw["sex"], SEXES, file, "sex"),
                "site": _clean_category(raw["anatom_site_general_challenge"], SITES, file, "site"),
            }
        )
        parts.append(frame)
    return pd.concat(parts, ignore_index=True)


DATASET_FORMATS: dict[str, DatasetFormat] = {
    fmt.name: fmt
    for fmt in (
        DatasetFormat(
            "siim-isic-2020",
            "SIIM-ISIC 2020: train.csv, test.csv, jpeg/train/*.jpg, jpeg/test/*.jpg",
            _siim2020_detect,
            _siim2020_load,
        ),
    )
}


def detect_format(root: Path) -> DatasetFormat:
    """The first registered format that recognises the folder."""
    for fmt in DATASET_FORMATS.values():
        if fmt.detect(root):
            return fmt
    known = "; ".join(f"{f.name} ({f.description})" for f in DATASET_FORMATS.values())
    raise DataError(f"{root}: no known data layout found. Known layouts: {known}.")


def validate_canonical(table: pd.DataFrame, root: Path) -> None:
    """Refuse tables the pipeline would silently mistrain on."""
    duplicated = table["image_id"][table["image_id"].duplicated()]
    if len(duplicated):
        raise DataError(f"{root}: image id {duplicated.iloc[0]!r} appears more than once; ids must be unique.")
    bad_ids = table["image_id"].str.contains(r"[/\\]|^\.\.?$", regex=True)
    if bad_ids.any():
        raise DataError(f"{root}: image id {table['image_id'][bad_ids].iloc[0]!r} looks like a path; refused.")
    train_patients = set(table.loc[table["split"] == "train", "patient_id"].dropna())
    test_patients = set(table.loc[table["split"] == "test", "patient_id"].dropna())
    shared = sorted(train_patients & test_patients)
    if shared:
        raise DataError(
            f"{root}: {len(shared)} patient(s) appear in both train and test (first: {shared[0]!r}); "
            "a patient's lesions must all be on one side."
        )
    train = table[table["split"] == "train"]
    bad_target = train["target"].isna() | ~train["target"].isin([0, 1])
    if bad_target.any():
        raise DataError(
            f"{root}: train image {train['image_id'][bad_target].iloc[0]!r} has target "
            f"{train['target'][bad_target].iloc[0]!r}; targets must be 0 or 1."
        )
    has_path = table["image_path"].notna()
    missing = [p for p in table.loc[has_path, "image_path"] if not Path(p).exists()]
    if missing:
        raise DataError(
            f"{root}: {len(missing)} listed image(s) have no file (first: {missing[0]}); "
            "add the files or remove their rows."
        )


def load_dataset(root: Path, format_name: str | None = None) -> pd.DataFrame:
    """Read `root` into the canonical table (auto-detecting its layout unless named)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder.")
    if format_name is None:
        fmt = detect_format(root)
    elif format_name in DATASET_FORMATS:
        fmt = DATASET_FORMATS[format_name]
    else:
        raise DataError(f"unknown format {format_name!r}; choose one of {sorted(DATASET_FORMATS)}.")
    table = fmt.load(root)[list(CANONICAL_COLUMNS)]
    validate_canonical(table, root)
    return table.reset_index(drop=True)
