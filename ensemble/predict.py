"""Score new patients with an exported bundle: every fold's CNNs, the stacker's features, the alert.

The CNN scores, dermoscopy features, patient-context features and stack are computed exactly as `stack` computed them
for the run's test set, so a bundle reproduces the run's test predictions. Images are streamed in
batches (memory bounded by the batch size, not the number of images), each decoded once per CNN
and passed through every fold model and test-time view of that CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.outputs import class_column, fold_column
from cnn.pipeline import named_image_batches, predict_tta
from ensemble.bundle import Bundle, CnnMember
from errors import DataError, OptionError
from evaluation.metrics import prior_adjusted_probabilities
from fusion.image_features.stage import compute_image_features
from fusion.missingness import METADATA_FIELDS
from fusion.shift import alert_rate_warning, concat_statistics, image_statistics, missing_rate_warnings, shift_warnings
from fusion.stack_model import StackModel, StackPrediction
from metadata.dataset import SPLITS, load_dataset
from metadata.formats import IMAGE_SUFFIXES, SEX_ALIASES
from metadata.schema import SEXES, SITE_ALIASES, SITES, canonical_table, clean_text, map_vocabulary, parse_age, read_csv
from rundir.io import atomic_write, write_json

Advance = Callable[[int], None]
# Accepted headers of a `--metadata` CSV for `--images`, per canonical column (the layouts' spellings).
METADATA_HEADERS: dict[str, tuple[str, ...]] = {
    "image_id": ("image_id", "image_name", "isic_id", "image"),
    "patient_id": ("patient_id",),
    "age": ("age", "age_approx"),
    "sex": ("sex", "gender"),
    "site": ("site", "anatom_site_general", "anatom_site_general_challenge", "localization"),
}


def _header(raw: pd.DataFrame, column: str) -> str | None:
    return next((h for h in METADATA_HEADERS[column] if h in raw.columns), None)


def _metadata_table(file: Path) -> pd.DataFrame:
    """A `--metadata` CSV as image_id plus whichever of patient_id, age, sex, site it has (canonical values)."""
    raw = read_csv(file)
    id_header = _header(raw, "image_id")
    if id_header is None:
        raise DataError(f"{file}: no image id column; name one of {list(METADATA_HEADERS['image_id'])}.")
    ids = raw[id_header].astype("string")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"{file}: row {duplicated.index[0] + 2} repeats image id {duplicated.iloc[0]!r}; ids must be unique.")
    parsers: dict[str, Callable[[pd.Series, str], pd.Series]] = {
        "patient_id": lambda values, _: values.astype("string").where(clean_text(values).notna()),
        "age": lambda values, header: parse_age(values, file, header),
        "sex": lambda values, header: map_vocabulary(values, SEX_ALIASES, SEXES, file=file, column=header),
        "site": lambda values, header: map_vocabulary(values, SITE_ALIASES, SITES, file=file, column=header),
    }
    columns = {"image_id": ids}
    for column, parse in parsers.items():
        header = _header(raw, column)
        if header is not None:
            columns[column] = parse(raw[header], header)
    return pd.DataFrame(columns)


def _folder_files(images: Path, recursive: bool) -> list[Path]:
    return sorted(p for p in (images.rglob("*") if recursive else images.iterdir()) if p.is_file())


def files_not_scored(images: Path, recursive: bool = False) -> list[str]:
    """What `--images` leaves out: files that are not images, and (without `recursive`) every file in a sub-folder."""
    images = Path(images)
    skipped = [p for p in _folder_files(images, True) if p.suffix.lower() not in IMAGE_SUFFIXES or (not recursive and p.parent != images)]
    return [str(p.relative_to(images)) for p in skipped]


def image_folder_rows(images: Path, metadata: Path | None = None, recursive: bool = False) -> pd.DataFrame:
    """Canonical rows for every image in a folder (and its sub-folders with `recursive`), metadata
    joined by image id (the file name without extension) where a CSV gives it.

    Without a patient id an image is its own patient (no patient context to compare it with).
    """
    images = Path(images)
    if not images.is_dir():
        raise DataError(f"--images {images}: not a folder.")
    files = [p for p in _folder_files(images, recursive) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        inside = " (images in sub-folders are scored with --recursive)" if not recursive and files_not_scored(images) else ""
        raise DataError(f"--images {images}: no {'/'.join(IMAGE_SUFFIXES)} files{inside}.")
    ids = pd.Series([p.stem for p in files], dtype="string")
    if ids.duplicated().any():
        raise DataError(f"--images {images}: two files share the name {ids[ids.duplicated()].iloc[0]!r}; rename one.")
    rows = pd.DataFrame({"image_id": ids, "image_path": pd.Series([str(p) for p in files], dtype="string")})
    if metadata is not None:
        table = _metadata_table(Path(metadata))
        if not ids.isin(table["image_id"]).any():
            raise DataError(
                f"--metadata {metadata}: no row names an image in {images} (ids like {table['image_id'].iloc[0]!r}, "
                f"images like {ids.iloc[0]!r}); the id column must hold the file names without extension."
            )
        rows = rows.merge(table, on="image_id", how="left")
    table = canonical_table({c: rows[c] for c in rows.columns}, rows.index)
    return table.assign(split="test", patient_id=table["patient_id"].fillna(table["image_id"]))


def scoring_rows(
    data: Path | None, images: Path | None, *, metadata: Path | None = None, fmt: str | None = None, split: str = "all",
    recursive: bool = False,
) -> pd.DataFrame:
    """The rows to score: a data folder in any supported layout (`split` of it), or a folder of images."""
    if (data is None) == (images is None):
        raise DataError("give exactly one of --data DIR (a supported layout) or --images DIR (a folder of images).")
    if images is not None:
        return image_folder_rows(images, metadata, recursive)
    if split not in SPLITS:
        raise OptionError(f"--split {split!r}: choose one of {SPLITS}.")
    table = load_dataset(data, fmt, metadata).table
    rows = table if split == "all" else table[table["split"] == split]
    if rows.empty:
        raise DataError(f"{data}: no {split} rows to score.")
    without_image = rows["image_path"].isna()
    if without_image.any():
        raise DataError(
            f"{data}: {int(without_image.sum())} row(s) have no image (first: {rows.loc[without_image, 'image_id'].iloc[0]!r}); "
            "the bundle's CNNs score images: add the images or leave those rows out."
        )
    return rows.reset_index(drop=True)


@dataclass(frozen=True)
class CnnOutputs:
    """What one CNN says about a batch of images: each fold model's melanoma probability and, for a
    diagnosis head, the class probabilities averaged over fold models (prior-adjusted as the report does)."""

    melanoma: pd.DataFrame  # prob_fold<k>
    diagnosis: pd.DataFrame | None  # one column per class, rows sum to 1


def cnn_fold_probabilities(
    member: CnnMember, sources: list[str], *, batch_size: int, advance: Advance, seen: Callable[[np.ndarray], None] | None = None
) -> CnnOutputs:
    """Melanoma probability of every fold model of one CNN (`prob_fold<k>`), mean over its TTA views,
    and the diagnosis head's class probabilities.

    A fold model's class probabilities are divided by the class prior it was fitted to and
    renormalised (`evaluation.metrics.prior_adjusted_probabilities`: the balanced-accuracy decision,
    as in the report), then averaged over folds. `seen(images)`, when given, receives each decoded
    batch (for the image statistics of shift warnings).
    """
    melanoma: dict[int, list[np.ndarray]] = {fold: [] for fold in member.models}
    classes: list[np.ndarray] = []
    for images in named_image_batches(sources, member.image_size, batch_size, member.color_constancy):
        if seen is not None:
            seen(images.numpy())
        per_fold = []
        for fold, model in member.models.items():
            outputs = predict_tta(model, images, member.tta)
            melanoma[fold].append(member.target.melanoma_prob(outputs))
            if member.target.multiclass:
                per_fold.append(outputs if member.priors is None else prior_adjusted_probabilities(outputs, member.priors[fold]))
        if per_fold:
            classes.append(np.mean(per_fold, axis=0))
        advance(len(images))
    diagnosis = pd.DataFrame(np.concatenate(classes), columns=list(member.target.classes)) if classes else None
    return CnnOutputs(pd.DataFrame({fold_column(fold): np.concatenate(chunks) for fold, chunks in melanoma.items()}), diagnosis)


def differential_diagnosis(diagnoses: list[pd.DataFrame], index: pd.Index) -> pd.DataFrame:
    """`prob_<CLASS>` (mean over the CNNs with a diagnosis head of the same classes as the first) and
    `top_diagnosis`; no columns when no CNN has a diagnosis head."""
    if not diagnoses:
        return pd.DataFrame(index=index)
    classes = list(diagnoses[0].columns)
    mean = sum(d.to_numpy() for d in diagnoses if list(d.columns) == classes) / sum(list(d.columns) == classes for d in diagnoses)
    table = pd.DataFrame(mean, columns=[class_column(c) for c in classes], index=index)
    return table.assign(top_diagnosis=np.array(classes)[mean.argmax(axis=1)])


def rank_within_patient(patient_id: pd.Series, probability: pd.Series) -> pd.Series:
    """1 for each patient's riskiest lesion, 2 for the next, ... (ties share the better rank)."""
    return probability.groupby(patient_id.to_numpy()).rank(ascending=False, method="min").astype(int)


def missing_metadata(rows: pd.DataFrame) -> pd.Series:
    """Per row, the metadata fields it lacks, space-separated ('' when complete)."""
    missing = rows[list(METADATA_FIELDS)].isna().to_numpy()
    return pd.Series([" ".join(f for f, gap in zip(METADATA_FIELDS, gaps) if gap) for gaps in missing], index=rows.index)


@dataclass(frozen=True)
class LesionInputs:
    """What the stack model takes from a set of images: each CNN's fold-model outputs, the dermoscopy
    features (None when the stack takes none), the differential diagnosis; rows in the images' order."""

    cnn_outputs: dict[str, pd.DataFrame]  # CNN name -> prob_fold<k>
    image_features: pd.DataFrame | None
    diagnosis: pd.DataFrame  # prob_<CLASS> and top_diagnosis (no columns without a diagnosis head)
    image_statistics: pd.DataFrame | None = None  # colour and contrast of each image as the reference CNN saw it (fusion.shift)


def lesion_inputs(bundle: Bundle, sources: list[str], *, batch_size: int, advance: Advance) -> LesionInputs:
    """Every CNN's outputs, dermoscopy features and differential diagnosis of the images at `sources`,
    computed as the run computed them, and the image statistics of the CNN the scoring reference describes."""
    statistics: list[dict[str, np.ndarray]] = []
    outputs = {
        member.name: cnn_fold_probabilities(
            member, sources, batch_size=batch_size, advance=advance,
            seen=(lambda images: statistics.append(image_statistics(images))) if i == 0 and member.image_size == bundle.reference["image_size"] else None,
        )
        for i, member in enumerate(bundle.cnns)
    }
    recipe = bundle.stack.feature_recipe
    diagnosis = differential_diagnosis([o.diagnosis for o in outputs.values() if o.diagnosis is not None], pd.RangeIndex(len(sources)))
    features = None if recipe is None else compute_image_features(sources, recipe)
    stats = pd.DataFrame(concat_statistics(statistics)) if statistics else None
    return LesionInputs({name: o.melanoma for name, o in outputs.items()}, features, diagnosis, stats)


def judge_lesions(stack: StackModel, rows: pd.DataFrame, inputs: LesionInputs) -> tuple[pd.DataFrame, StackPrediction]:
    """The predictions table of `rows` (a 0..n-1 index, aligned with `inputs`): probability, alert at its
    pattern's operating point, rank within the patient, what it lacked, the differential diagnosis.

    >>> rng = np.random.default_rng(0)
    >>> n = 150
    >>> melanoma = rng.random(n) < 0.3
    >>> train = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 3}" for k in range(n)],
    ...     "age": 60.0, "sex": "male", "site": "torso", "target": melanoma.astype(int), "fold": np.arange(n) % 3})
    >>> oof = {"small": train[["image_id", "fold"]].assign(prob=np.clip(0.4 * melanoma + 0.6 * rng.random(n), 0.01, 0.99))}
    >>> stack = StackModel(num_boost_round=20).fit(train, cnn_oof=oof)
    >>> stack = stack.with_operating_points(stack.masked_oof_, n_boot=20)
    >>> new = pd.DataFrame({"image_id": ["a", "b"], "patient_id": ["x", "x"], "age": [70.0, 70.0], "sex": "male", "site": None})
    >>> outputs = {"small": pd.DataFrame({f"prob_fold{k}": [0.95, 0.05] for k in range(3)})}
    >>> table, _ = judge_lesions(stack, new, LesionInputs(outputs, None, pd.DataFrame(index=new.index)))
    >>> table[["image_id", "alert", "rank_in_patient", "pattern"]].values.tolist()
    [['a', 1, 1, 'partial'], ['b', 0, 2, 'partial']]
    """
    scored = stack.predict(rows, cnn_outputs=inputs.cnn_outputs, image_features=inputs.image_features)
    probability = scored.table["prob"]
    predictions = pd.DataFrame(
        {
            "image_id": rows["image_id"],
            "patient_id": rows["patient_id"],
            "melanoma_probability": probability,
            "alert": scored.table["alert"],
            "rank_in_patient": rank_within_patient(rows["patient_id"], probability),
            "missing_metadata": missing_metadata(rows),
            "pattern": scored.table["pattern"],
            "operating_point": scored.table["operating_point"],
            "alert_threshold": scored.table["alert_threshold"],
        }
    ).join(inputs.diagnosis)
    return predictions, scored


@dataclass(frozen=True)
class Scored:
    """Predictions for new patients, what the stack had to treat as missing, and how the batch compares."""

    predictions: pd.DataFrame
    absent_features: list[str]  # stack features the data has no column for (scored as missing)
    shift_warnings: list[str] = field(default_factory=list)  # where the batch looks unlike the training data
    cnn_scores: pd.DataFrame = field(default_factory=pd.DataFrame)  # by image id: each CNN's standardised log-odds
    image_features: pd.DataFrame = field(default_factory=pd.DataFrame)  # by image id: the dermoscopy features, if the stack takes them


def batch_shift_warnings(bundle: Bundle, rows: pd.DataFrame, *, predictions: pd.DataFrame, cnn_scores: pd.DataFrame, image_stats: pd.DataFrame | None) -> list[str]:
    """Where this batch looks unlike the training data (`fusion.shift`): images, CNN scores, missing metadata, alert rate."""
    reference, points = bundle.reference, bundle.operating_points
    return [
        *shift_warnings(reference["images"], {} if image_stats is None else {c: image_stats[c].to_numpy() for c in image_stats}),
        *shift_warnings(
            reference["cnn_scores"], {c: cnn_scores[c].to_numpy() for c in cnn_scores.columns},
            "the OOF images (other cameras, or more suspicious lesions than the training mix, move it)",
        ),
        *missing_rate_warnings(reference["missing_rate"], rows[list(METADATA_FIELDS)]),
        *alert_rate_warning(predictions["alert"].to_numpy(), predictions["operating_point"].map({name: p.oof_alert_rate for name, p in points.items()}).to_numpy()),
    ]


def score_patients(bundle: Bundle, rows: pd.DataFrame, *, batch_size: int, advance: Advance) -> Scored:
    """Probability, alert and within-patient rank of every row (`judge_lesions`), with the images read
    and scored by every CNN here; `advance(n)` after each batch of each CNN.

    Each lesion is judged by the operating point (calibration and threshold) of its missingness
    pattern, recorded in the `operating_point` column.
    """
    rows = rows.reset_index(drop=True)
    inputs = lesion_inputs(bundle, rows["image_path"].astype(str).tolist(), batch_size=batch_size, advance=advance)
    predictions, scored = judge_lesions(bundle.stack, rows, inputs)
    return Scored(
        predictions.sort_values(["patient_id", "rank_in_patient"], kind="stable"),
        scored.absent_features,
        batch_shift_warnings(bundle, rows, predictions=predictions, cnn_scores=scored.cnn_scores, image_stats=inputs.image_statistics),
        scored.cnn_scores.set_axis(rows["image_id"]),
        pd.DataFrame() if inputs.image_features is None else inputs.image_features.set_axis(rows["image_id"]),
    )


def scoring_notes(scored: Scored) -> list[str]:
    """What a reader of the predictions must know: metadata scored as missing, patients without context."""
    predictions = scored.predictions
    fields = predictions["missing_metadata"].str.split()
    gaps = {field: int(fields.map(lambda missing: field in missing).sum()) for field in METADATA_FIELDS}
    notes = [f"{count} of {len(predictions)} image(s) have no {field}" for field, count in gaps.items() if count]
    if scored.absent_features:
        notes.append(f"this data has no column for the stack feature(s) {scored.absent_features}")
    if notes:
        used = predictions["operating_point"].value_counts()
        notes.append(
            "those features were scored as missing; each lesion was judged by the operating point of its missingness pattern "
            f"({', '.join(f'{name}: {count}' for name, count in used.items())})"
        )
    alone = int((predictions["patient_id"].value_counts() == 1).sum())
    if alone:
        notes.append(f"{alone} patient(s) have a single image: no other lesion of theirs to compare it with")
    return notes


def write_predictions(scored: Scored, bundle: Bundle, out: Path, not_scored: list[str] | None = None) -> dict:
    """Write OUT/predictions.csv and OUT/summary.json (bundle, operating point, counts, notes, the files
    of an --images folder that were not scored)."""
    out = Path(out)
    atomic_write(out / "predictions.csv", lambda tmp: scored.predictions.to_csv(tmp, index=False))
    predictions = scored.predictions
    summary = {
        "bundle": str(bundle.path.resolve()),
        "bundle_created": bundle.manifest["created"],
        "images": int(len(predictions)),
        "patients": int(predictions["patient_id"].nunique()),
        "alerts": int(predictions["alert"].sum()),
        "operating_points": {
            name: {**bundle.operating_points[name].to_json(), "images": int(count)}
            for name, count in predictions["operating_point"].value_counts().items()
        },
        "notes": scoring_notes(scored),
        "shift_warnings": scored.shift_warnings,
        "not_scored": list(not_scored or []),
    }
    write_json(summary, out / "summary.json")
    return summary
