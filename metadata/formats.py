"""Published ISIC data layouts, each read into the canonical table (see `metadata.schema`).

Adding a layout is adding one `DatasetFormat` entry to `DATASET_FORMATS`; `detect_format` tries
them in order, so the more specific layouts come first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from metadata.images import hdf5_source
from metadata.schema import (
    DIAGNOSES,
    DIAGNOSIS_ALIASES,
    SEXES,
    SITE_ALIASES,
    SITES,
    DataError,
    canonical_table,
    clean_text,
    first_bad_row,
    map_vocabulary,
    parse_age,
    read_csv,
    require_columns,
    targets_from_diagnosis,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SEX_ALIASES = {s: s for s in SEXES}


@dataclass(frozen=True)
class DatasetFormat:
    """A published data layout: how to recognise it in a folder and read it canonically."""

    name: str
    description: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, Path | None], pd.DataFrame]
    has_patients: bool = False  # real patient ids (else patient_id falls back to lesion / image id)


def _first_dir(root: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def _image_paths(folder: Path | None, ids: pd.Series) -> pd.Series:
    """`folder/<id>.jpg` (or .png/.jpeg where that exists) per id; missing when the data has no images."""
    if folder is None:
        return pd.Series(pd.NA, index=ids.index, dtype="string")
    on_disk = {p.stem: str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return pd.Series([on_disk.get(i, str(folder / f"{i}.jpg")) for i in ids], index=ids.index, dtype="string")


def _frame(**columns: object) -> pd.DataFrame:
    """A canonical frame; columns not given are missing."""
    return canonical_table(columns)


def _patient(*candidates: pd.Series) -> pd.Series:
    """The first non-missing id among patient, lesion and image id."""
    result = pd.Series(pd.NA, index=candidates[0].index, dtype="string")
    for candidate in candidates:
        result = result.fillna(candidate.astype("string").where(clean_text(candidate).notna()))
    return result


def _diagnosis(values: pd.Series, file: Path, column: str) -> pd.Series:
    """Unified diagnosis codes. ISIC's "unknown" diagnosis is a class (UNK: benign, no specific
    diagnosis), not a missing value as `clean_text` would read it; empty cells stay missing."""
    text = values.astype("string").str.strip()
    return map_vocabulary(text.mask(text.str.lower() == "unknown", "UNK"), DIAGNOSIS_ALIASES, DIAGNOSES, file=file, column=column)


def _not_this_layout(root: Path, layout: str, wanted: str) -> DataError:
    """The error for `--format LAYOUT` on a folder without that layout's label file."""
    return DataError(
        f"{root}: no {wanted} found, so this is not the {layout} layout; check --data, or drop --format to auto-detect."
    )


def _optional_id(raw: pd.DataFrame, column: str) -> pd.Series:
    """An optional text column as strings, missing where absent or empty."""
    values = raw[column] if column in raw else pd.Series(pd.NA, index=raw.index)
    return values.astype("string").where(clean_text(values).notna())


def _binary_target(raw: pd.DataFrame, file: Path, split: str) -> pd.Series:
    """The 0/1 `target` column of a train CSV (refusing anything else); missing on test rows."""
    if split != "train":
        return pd.Series(pd.NA, index=raw.index, dtype="Int8")
    require_columns(raw, ("target",), file)
    bad = ~raw["target"].str.strip().isin(["0", "1", "0.0", "1.0"])
    if bad.any():
        row = first_bad_row(bad)
        raise DataError(f"{file}: row {row + 2} has target={raw['target'].iloc[row]!r}; targets must be 0 or 1.")
    return raw["target"].astype(float).astype("Int8")


# ---- SIIM-ISIC 2020 ---------------------------------------------------------------------------

def _siim2020_files(root: Path) -> dict[str, Path]:
    files = {"train": root / "train.csv", "test": root / "test.csv"}
    if not files["train"].exists():
        truth = sorted(root.glob("ISIC_2020_Training_GroundTruth*.csv"))
        files["train"] = truth[0] if truth else files["train"]
    return {split: f for split, f in files.items() if f.exists()}


def _csv_columns(file: Path) -> set[str] | None:
    """Header of a CSV; None for an empty file (so loading, not detection, reports it)."""
    try:
        return set(pd.read_csv(file, nrows=0).columns)
    except pd.errors.EmptyDataError:
        return None


def _siim2020_detect(root: Path) -> bool:
    train = _siim2020_files(root).get("train")
    columns = _csv_columns(train) if train is not None else set()
    return columns is None or "image_name" in columns


def _siim2020_load(root: Path, metadata: Path | None) -> pd.DataFrame:
    """train.csv / test.csv (or ISIC_2020_Training_GroundTruth*.csv) beside jpeg/{train,test} or {train,test}/."""
    files = _siim2020_files(root)
    if "train" not in files:
        raise _not_this_layout(root, "isic2020", "train.csv or ISIC_2020_Training_GroundTruth*.csv")
    parts = []
    for split, file in files.items():
        raw = read_csv(file, allow_no_rows=split == "test")  # an empty test list: train without a test split
        require_columns(raw, ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge"), file)
        diagnosis = (
            _diagnosis(raw["diagnosis"], file, "diagnosis")
            if "diagnosis" in raw
            else pd.Series(pd.NA, index=raw.index)
        )
        lesion = _optional_id(raw, "lesion_id")  # ISIC_2020_Training_GroundTruth_v2.csv has one
        parts.append(
            _frame(
                image_id=raw["image_name"].astype("string"),
                patient_id=_patient(raw["patient_id"], raw["image_name"]),
                lesion_id=lesion,
                split=pd.Series(split, index=raw.index),
                image_path=_image_paths(_first_dir(root, (f"jpeg/{split}", split)), raw["image_name"]),
                target=_binary_target(raw, file, split),
                diagnosis=diagnosis,
                age=parse_age(raw["age_approx"], file, "age_approx"),
                sex=map_vocabulary(raw["sex"], SEX_ALIASES, SEXES, file=file, column="sex"),
                site=map_vocabulary(raw["anatom_site_general_challenge"], SITE_ALIASES, SITES, file=file, column="anatom_site_general_challenge"),
                source=pd.Series("isic2020", index=raw.index),
            )
        )
    return pd.concat(parts, ignore_index=True)


# ---- ISIC 2019 --------------------------------------------------------------------------------

def _onehot_diagnosis(truth: pd.DataFrame, columns: tuple[str, ...], file: Path, rename: dict[str, str]) -> pd.Series:
    """The one column set to 1 in a one-hot ground truth, as a unified code; refuses 0 or 2+ ones."""
    values = truth[list(columns)].apply(pd.to_numeric, errors="coerce")
    ones = (values == 1).sum(axis=1)
    if (ones != 1).any():
        row = first_bad_row(ones != 1)
        raise DataError(f"{file}: row {row + 2} has {int(ones.iloc[row])} diagnosis columns set to 1; exactly one must be.")
    codes = values.idxmax(axis=1).map(lambda c: rename.get(c, c))
    return codes.astype(pd.CategoricalDtype(list(DIAGNOSES)))


def _isic2019_detect(root: Path) -> bool:
    return (root / "ISIC_2019_Training_GroundTruth.csv").exists()


def _contributor(lesion_id: pd.Series, dataset: str) -> pd.Series:
    """`dataset:PREFIX` from lesion ids like HAM_0000118 / BCN_0000001 / MSK4_0011169, else the dataset."""
    prefix = lesion_id.astype("string").str.extract(r"^([A-Za-z0-9]+)_", expand=False)
    return (dataset + ":" + prefix).fillna(dataset)


def _isic2019_load(root: Path, metadata: Path | None) -> pd.DataFrame:
    """ISIC_2019_Training_GroundTruth.csv (+ _Metadata.csv) beside ISIC_2019_Training_Input/ or images/."""
    truth_file = root / "ISIC_2019_Training_GroundTruth.csv"
    if not truth_file.exists():
        raise _not_this_layout(root, "isic2019", truth_file.name)
    truth = read_csv(truth_file)
    require_columns(truth, ("image", *DIAGNOSES), truth_file)
    meta_file = metadata or root / "ISIC_2019_Training_Metadata.csv"
    meta = read_csv(meta_file) if meta_file.exists() else pd.DataFrame({"image": truth["image"]})
    merged = truth.merge(meta, on="image", how="left", validate="one_to_one")
    lesion = _optional_id(merged, "lesion_id")
    diagnosis = _onehot_diagnosis(merged, DIAGNOSES, truth_file, {})
    sex_column = "sex" if "sex" in merged else "gender"
    return _frame(
        image_id=merged["image"].astype("string"),
        patient_id=_patient(lesion, merged["image"]),
        lesion_id=lesion,
        split=pd.Series("train", index=merged.index),
        image_path=_image_paths(_first_dir(root, ("ISIC_2019_Training_Input", "images", "train")), merged["image"]),
        target=targets_from_diagnosis(diagnosis),
        diagnosis=diagnosis,
        age=parse_age(merged.get("age_approx", pd.Series("", index=merged.index)), meta_file, "age_approx"),
        sex=map_vocabulary(merged.get(sex_column, pd.Series("", index=merged.index)), SEX_ALIASES, SEXES, file=meta_file, column=sex_column),
        site=map_vocabulary(
            merged.get("anatom_site_general", pd.Series("", index=merged.index)), SITE_ALIASES, SITES, file=meta_file,
            column="anatom_site_general",
        ),
        source=_contributor(lesion, "isic2019"),
    )


# ---- HAM10000 / ISIC 2018 Task 3 --------------------------------------------------------------

HAM_ONEHOT = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


def _ham_truth_file(root: Path) -> Path | None:
    found = sorted(root.glob("ISIC2018_Task3_Training_GroundTruth*.csv")) + sorted(root.glob("*GroundTruth*.csv"))
    return found[0] if found else None


def _ham_detect(root: Path) -> bool:
    if (root / "HAM10000_metadata.csv").exists():
        return True
    truth = _ham_truth_file(root)
    return truth is not None and set(HAM_ONEHOT) <= (_csv_columns(truth) or set())


def _ham_image_folder(root: Path) -> Path | None:
    return _first_dir(root, ("images", "ISIC2018_Task3_Training_Input", "HAM10000_images"))


def _ham_load(root: Path, metadata: Path | None) -> pd.DataFrame:
    """HAM10000_metadata.csv and/or the 2018 one-hot ground truth, beside an image folder.

    HAM10000 writes unknown ages as 0.0: they are read as missing.
    """
    meta_file = metadata or root / "HAM10000_metadata.csv"
    truth_file = _ham_truth_file(root)
    if not meta_file.exists() and truth_file is None:
        raise _not_this_layout(root, "ham10000", f"{meta_file.name} or ISIC2018_Task3_Training_GroundTruth*.csv")
    if meta_file.exists():
        raw = read_csv(meta_file)
        require_columns(raw, ("lesion_id", "image_id", "dx", "age", "sex", "localization"), meta_file)
        diagnosis = _diagnosis(raw["dx"], meta_file, "dx")
        ages = parse_age(raw["age"], meta_file, "age", zero_is_missing=True)
        sex = map_vocabulary(raw["sex"], SEX_ALIASES, SEXES, file=meta_file, column="sex")
        site = map_vocabulary(raw["localization"], SITE_ALIASES, SITES, file=meta_file, column="localization")
        lesion = _optional_id(raw, "lesion_id")
        ids = raw["image_id"]
    else:
        raw = read_csv(truth_file)
        require_columns(raw, ("image", *HAM_ONEHOT), truth_file)
        diagnosis = _onehot_diagnosis(raw, HAM_ONEHOT, truth_file, {"AKIEC": "AK"})
        ages = pd.Series(np.nan, index=raw.index)
        sex = site = pd.Series(pd.NA, index=raw.index)
        lesion = pd.Series(pd.NA, index=raw.index, dtype="string")
        ids = raw["image"]
    return _frame(
        image_id=ids.astype("string"),
        patient_id=_patient(lesion, ids),
        lesion_id=lesion,
        split=pd.Series("train", index=raw.index),
        image_path=_image_paths(_ham_image_folder(root), ids),
        target=targets_from_diagnosis(diagnosis),
        diagnosis=diagnosis,
        age=ages,
        sex=sex,
        site=site,
        source=pd.Series("ham10000", index=raw.index),
    )


# ---- ISIC 2024 (SLICE-3D) ---------------------------------------------------------------------

def _isic2024_detect(root: Path) -> bool:
    return (root / "train-metadata.csv").exists()


def _numeric_extras(raw: pd.DataFrame, file: Path) -> dict[str, pd.Series]:
    """The numeric `tbp_*` / `clin_*` columns as floats (empty cells missing).

    Text columns of those families (`tbp_lv_location`, `tbp_tile_type`) are left out; a column
    that is mostly numbers with a stray text cell is refused, naming the row.
    """
    extras = {}
    for column in (c for c in raw.columns if c.startswith(("tbp_", "clin_"))):
        text = raw[column].where(raw[column].str.strip() != "")
        numbers = pd.to_numeric(text, errors="coerce").astype(float)
        bad = text.notna() & numbers.isna()
        if not bad.any():
            extras[column] = numbers
        elif numbers.notna().any():
            row = first_bad_row(bad)
            raise DataError(
                f"{file}: row {row + 2} has {column}={raw[column].iloc[row]!r}, not a number; "
                "fix the cell or leave it empty to mark it missing."
            )
    return extras


def _isic2024_load(root: Path, metadata: Path | None) -> pd.DataFrame:
    """train-metadata.csv / test-metadata.csv with train-image.hdf5 (or train-image/image/*.jpg).

    Every numeric `tbp_*` / `clin_*` column is kept for the stacker; label-derived columns
    (`iddx_*`, `mel_*`, `lesion_id`) are not carried over.
    """
    if not (root / "train-metadata.csv").exists():
        raise _not_this_layout(root, "isic2024", "train-metadata.csv")
    parts = []
    for split in ("train", "test"):
        file = root / f"{split}-metadata.csv"
        if not file.exists():
            continue
        raw = read_csv(file, allow_no_rows=split == "test")  # an empty test list: train without a test split
        require_columns(raw, ("isic_id", "patient_id", "age_approx", "sex", "anatom_site_general"), file)
        hdf5 = root / f"{split}-image.hdf5"
        if hdf5.exists():
            paths = pd.Series([hdf5_source(hdf5, i) for i in raw["isic_id"]], index=raw.index, dtype="string")
        else:
            paths = _image_paths(_first_dir(root, (f"{split}-image/image", f"{split}-image")), raw["isic_id"])
        extras = _numeric_extras(raw, file)
        attribution = _optional_id(raw, "attribution")
        parts.append(
            _frame(
                image_id=raw["isic_id"].astype("string"),
                patient_id=_patient(raw["patient_id"], raw["isic_id"]),
                split=pd.Series(split, index=raw.index),
                image_path=paths,
                target=_binary_target(raw, file, split),
                diagnosis=pd.Series(pd.NA, index=raw.index),
                age=parse_age(raw["age_approx"], file, "age_approx"),
                sex=map_vocabulary(raw["sex"], SEX_ALIASES, SEXES, file=file, column="sex"),
                site=map_vocabulary(raw["anatom_site_general"], SITE_ALIASES, SITES, file=file, column="anatom_site_general"),
                source=("isic2024:" + attribution).fillna("isic2024"),
                **{k: v.astype(float) for k, v in extras.items()},
            )
        )
    return pd.concat(parts, ignore_index=True)


# ---- Class folders (the 9-class "Skin cancer ISIC" set) ---------------------------------------

def _class_folder_splits(root: Path) -> dict[str, Path]:
    return {split: root / name for split, name in (("train", "Train"), ("test", "Test")) if (root / name).is_dir()}


def _class_folders_detect(root: Path) -> bool:
    splits = _class_folder_splits(root)
    return "train" in splits and any(p.is_dir() for p in splits["train"].iterdir())


def _class_folders_load(root: Path, metadata: Path | None) -> pd.DataFrame:
    """Train/<class>/*.jpg and Test/<class>/*.jpg, optionally joined to a metadata CSV by image id.

    Some published class-folder sets hold one file name in several folders (the 9-class set has
    155, in train and test, under different classes). Every such file is kept, with its id made
    unique as `NAME~split~CLASS`; `inspect` then reports them as exact duplicates with conflicting
    labels, and `folds` keeps them together.
    """
    rows = []
    for split, folder in _class_folder_splits(root).items():
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            code = DIAGNOSIS_ALIASES.get(class_dir.name.strip().lower())
            if code is None:
                raise DataError(
                    f"{class_dir}: class folder name not in the diagnosis vocabulary {sorted(DIAGNOSIS_ALIASES)}; "
                    "rename the folder."
                )
            rows += [
                {"image_id": p.stem, "split": split, "image_path": str(p), "diagnosis": code}
                for p in sorted(class_dir.iterdir())
                if p.suffix.lower() in IMAGE_SUFFIXES
            ]
    files = pd.DataFrame(rows)
    if files.empty:
        raise DataError(f"{root}: no images in Train/<class>/ folders.")
    base_id = files["image_id"].str.replace(r"\(\d+\)$", "", regex=True)  # "ISIC_1(1)" is a copy of ISIC_1
    repeated = files["image_id"].duplicated(keep=False)
    files.loc[repeated, "image_id"] = files["image_id"] + "~" + files["split"] + "~" + files["diagnosis"]
    meta = pd.DataFrame({"image": base_id.unique()})
    if metadata is not None:
        meta = read_csv(metadata)
        require_columns(meta, ("image",), metadata)
        meta = meta.drop_duplicates("image")
    merged = files.assign(image=base_id).merge(meta, on="image", how="left")
    lesion = _optional_id(merged, "lesion_id")
    diagnosis = merged["diagnosis"].astype(pd.CategoricalDtype(list(DIAGNOSES)))
    meta_file = metadata or root
    sex_column = "sex" if "sex" in merged else "gender"
    empty = pd.Series("", index=merged.index)
    return _frame(
        image_id=merged["image_id"].astype("string"),
        patient_id=_patient(lesion, merged["image"]),
        lesion_id=lesion,
        split=merged["split"],
        image_path=merged["image_path"].astype("string"),
        target=targets_from_diagnosis(diagnosis),
        diagnosis=diagnosis,
        age=parse_age(merged.get("age_approx", empty), meta_file, "age_approx"),
        sex=map_vocabulary(merged.get(sex_column, empty), SEX_ALIASES, SEXES, file=meta_file, column=sex_column),
        site=map_vocabulary(merged.get("anatom_site_general", empty), SITE_ALIASES, SITES, file=meta_file, column="anatom_site_general"),
        source=_contributor(lesion, "isic-classes"),
    )


DATASET_FORMATS: dict[str, DatasetFormat] = {
    fmt.name: fmt
    for fmt in (
        DatasetFormat("isic2020", "train.csv/test.csv or ISIC_2020_Training_GroundTruth*.csv + jpeg/{train,test}", _siim2020_detect, _siim2020_load, has_patients=True),
        DatasetFormat("isic2024", "train-metadata.csv/test-metadata.csv + train-image.hdf5 or folder", _isic2024_detect, _isic2024_load, has_patients=True),
        DatasetFormat("isic2019", "ISIC_2019_Training_GroundTruth.csv (+ _Metadata.csv) + images", _isic2019_detect, _isic2019_load),
        DatasetFormat("ham10000", "HAM10000_metadata.csv and/or ISIC 2018 one-hot ground truth + images/", _ham_detect, _ham_load),
        DatasetFormat("class-folders", "Train/<class>/*.jpg, Test/<class>/*.jpg (+ --metadata CSV)", _class_folders_detect, _class_folders_load),
    )
}


def detect_format(root: Path) -> DatasetFormat:
    """The first registered format that recognises the folder."""
    for fmt in DATASET_FORMATS.values():
        if fmt.detect(root):
            return fmt
    known = "; ".join(f"{f.name} ({f.description})" for f in DATASET_FORMATS.values())
    raise DataError(f"{root}: no known data layout found. Known layouts: {known}.")
