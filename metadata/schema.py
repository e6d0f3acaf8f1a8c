"""The canonical table's columns and vocabularies, and the checks every data layout goes through.

One row per image:

- `image_id`: the image's id (file stem), unique over train and test; never a path
- `patient_id`: the patient, else the lesion id, else the image id (what folds group by)
- `lesion_id`: the lesion where the layout gives one, else missing
- `split`: "train" or "test"
- `image_path`: the image file, `FILE.hdf5#KEY` for images inside HDF5, missing for metadata-only data
- `target`: 1 melanoma, 0 not; missing on unlabelled test rows
- `diagnosis`: unified code in `DIAGNOSES` (a label: never a feature)
- `age`: float years, missing kept missing
- `sex`: "female" / "male" / missing
- `site`: anatomic site in `SITES` (ISIC `anatom_site_general` plus 2020's coarse "torso"), or missing
- `source`: the dataset, and the contributing site when the metadata names one
- any further numeric columns of the layout (e.g. ISIC 2024's `tbp_lv_*`), kept for the stacker
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from errors import DataError

DIAGNOSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
SITES: tuple[str, ...] = (
    "head/neck",
    "upper extremity",
    "lower extremity",
    "anterior torso",
    "posterior torso",
    "lateral torso",
    "torso",
    "palms/soles",
    "oral/genital",
)
SEXES: tuple[str, ...] = ("female", "male")
# The dtype of each canonical column, which a column a layout (or an upload) lacks takes, all missing.
CANONICAL_DTYPES: dict[str, object] = {
    "image_id": "string",
    "patient_id": "string",
    "lesion_id": "string",
    "split": "string",
    "image_path": "string",
    "target": "Int8",
    "diagnosis": pd.CategoricalDtype(list(DIAGNOSES)),
    "age": "float64",
    "sex": pd.CategoricalDtype(list(SEXES)),
    "site": pd.CategoricalDtype(list(SITES)),
    "source": "string",
}
CANONICAL_COLUMNS: tuple[str, ...] = tuple(CANONICAL_DTYPES)
MISSING_TEXT = frozenset({"", "unknown", "nan", "none", "na", "n/a", "<na>"})

# Spellings of the published layouts mapped onto `SITES` (keys lower-case).
SITE_ALIASES: dict[str, str] = {
    **{site: site for site in SITES},
    # HAM10000 `localization`
    "scalp": "head/neck", "face": "head/neck", "ear": "head/neck", "neck": "head/neck",
    "back": "posterior torso", "chest": "anterior torso", "abdomen": "anterior torso", "trunk": "torso",
    "upper extremity": "upper extremity", "hand": "upper extremity",
    "lower extremity": "lower extremity", "foot": "lower extremity",
    "acral": "palms/soles", "genital": "oral/genital",
}

# Diagnosis spellings (HAM `dx`, 2018/2019 one-hot columns, 2020 `diagnosis`, class-folder names).
DIAGNOSIS_ALIASES: dict[str, str] = {
    **{code.lower(): code for code in DIAGNOSES},
    "mel": "MEL", "melanoma": "MEL",
    "nv": "NV", "nevus": "NV",
    "bcc": "BCC", "basal cell carcinoma": "BCC",
    "akiec": "AK", "actinic keratosis": "AK",
    "bkl": "BKL", "seborrheic keratosis": "BKL", "pigmented benign keratosis": "BKL",
    "lentigo nos": "BKL", "lichenoid keratosis": "BKL", "solar lentigo": "BKL",
    "df": "DF", "dermatofibroma": "DF",
    "vasc": "VASC", "vascular lesion": "VASC",
    "scc": "SCC", "squamous cell carcinoma": "SCC",
    "unknown": "UNK", "atypical melanocytic proliferation": "UNK", "cafe-au-lait macule": "UNK",
}


def canonical_table(columns: dict[str, object], index: pd.Index | None = None) -> pd.DataFrame:
    """The canonical table from the columns a layout, a folder of images or an upload has: the canonical
    columns first (each one not given all missing, in its canonical dtype), then any further columns.

    The one builder of the table, so a missing value is the same missing value wherever rows come from.

    >>> table = canonical_table({"image_id": pd.Series(["a", "b"]), "age": [40.0, None]})
    >>> table.columns.tolist()[:3], str(table["sex"].dtype), table["patient_id"].isna().all()
    (['image_id', 'patient_id', 'lesion_id'], 'category', np.True_)
    """
    if index is None:
        index = next((v.index for v in columns.values() if isinstance(v, pd.Series)), None)
    if index is None:
        index = pd.RangeIndex(len(next(iter(columns.values()))))

    def column(name: str) -> object:
        if name in columns:
            value = columns[name]
            return value if isinstance(value, pd.Series) else pd.Series(value, index=index)
        return pd.Series(pd.NA if CANONICAL_DTYPES[name] in ("string", "Int8") else None, index=index, dtype=CANONICAL_DTYPES[name])

    extras = {name: value for name, value in columns.items() if name not in CANONICAL_DTYPES}
    return pd.DataFrame({**{name: column(name) for name in CANONICAL_COLUMNS}, **extras}, index=index)


def first_bad_row(mask: pd.Series) -> int:
    """Position of the first True in `mask`."""
    return int(np.flatnonzero(mask.to_numpy())[0])


def clean_text(values: pd.Series) -> pd.Series:
    """Lower-cased, stripped strings with the usual spellings of 'missing' turned into NA."""
    text = values.astype("string").str.strip().str.lower()
    return text.mask(text.isna() | text.isin(MISSING_TEXT))


def map_vocabulary(
    values: pd.Series, aliases: dict[str, str], vocabulary: tuple[str, ...], *, file: Path, column: str
) -> pd.Series:
    """Map spellings onto a vocabulary; refuse unknown values, naming the file, row and value."""
    text = clean_text(values)
    mapped = text.map(aliases)
    unknown = text.notna() & mapped.isna()
    if unknown.any():
        row = first_bad_row(unknown)
        raise DataError(
            f"{file}: row {row + 2} has {column}={values.iloc[row]!r}, not a known value "
            f"({sorted(set(aliases))}); fix it or leave the cell empty to mark it missing."
        )
    return mapped.astype(pd.CategoricalDtype(categories=list(vocabulary)))


MAX_AGE = 120  # years: an age outside 0..MAX_AGE is a typo or a code, never a patient's age


def parse_age(values: pd.Series, file: Path, column: str, zero_is_missing: bool = False) -> pd.Series:
    """Ages as floats; text that is not a number, or an age outside 0-120 years, is refused naming the
    row (the stack would learn from it as an age); empty cells stay missing."""
    text = clean_text(values)
    ages = pd.to_numeric(text, errors="coerce").astype(float)
    bad = text.notna() & ages.isna()
    if bad.any():
        row = first_bad_row(bad)
        raise DataError(
            f"{file}: row {row + 2} has {column}={values.iloc[row]!r}, not a number; "
            "write the age in years or leave the cell empty."
        )
    impossible = ages.notna() & ~ages.between(0, MAX_AGE)
    if impossible.any():
        row = first_bad_row(impossible)
        raise DataError(
            f"{file}: row {row + 2} has {column}={values.iloc[row]!r}, outside 0-{MAX_AGE} years "
            f"({int(impossible.sum())} such row(s)); correct the age or leave the cell empty (missing)."
        )
    return ages.mask(ages <= 0) if zero_is_missing else ages


def require_columns(frame: pd.DataFrame, columns: tuple[str, ...], file: Path) -> None:
    """Refuse a table without the columns its layout requires."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{file}: missing required column(s) {missing}; found {list(frame.columns)}.")


def read_csv(file: Path, allow_no_rows: bool = False) -> pd.DataFrame:
    """Read a CSV as text columns (ids keep leading zeros); refuse empty files (and, unless
    `allow_no_rows`, a header without rows)."""
    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError as error:
        raise DataError(f"{file} is empty: expected a header row and one row per image.") from error
    if frame.empty and not allow_no_rows:
        raise DataError(f"{file} has a header but no rows: add the rows or remove the file.")
    return frame


def targets_from_diagnosis(diagnosis: pd.Series) -> pd.Series:
    """Binary melanoma target from the unified diagnosis (missing stays missing)."""
    return diagnosis.astype("string").eq("MEL").astype("Int8").mask(diagnosis.isna())


def validate_canonical(table: pd.DataFrame, root: Path, has_patients: bool = True) -> None:
    """Refuse tables the pipeline would silently mistrain on.

    The same patient in train and test is refused only where the layout has real patient ids; in
    layouts without them the same image in both splits shows up as a cross-split duplicate instead.
    """
    ids = table["image_id"].astype("string")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"{root}: image id {duplicated.iloc[0]!r} appears more than once; ids must be unique.")
    path_like = ids.str.contains(r"[/\\]", regex=True) | ids.isin([".", ".."]) | ids.str.startswith("~")
    if path_like.any():
        raise DataError(f"{root}: image id {ids[path_like].iloc[0]!r} looks like a path; ids must be plain names.")
    train_patients = set(table.loc[table["split"] == "train", "patient_id"].dropna())
    test_patients = set(table.loc[table["split"] == "test", "patient_id"].dropna())
    shared = sorted(train_patients & test_patients) if has_patients else []
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
