"""The `folds` stage: decode and fingerprint every image once, group duplicates, assign folds, write RUN/folds.parquet.

>>> options = FoldOptions(k=3, dedup=False)
>>> options.group_by, options.max_linked_patients
('patient', 4)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from errors import DataError
from metadata.dataset import record_skipped
from metadata.duplicates import NEAR_DUPLICATE_BITS, PUBLISHED_DUPLICATES, ImageFingerprint, find_duplicate_pairs, fingerprint_images, published_duplicate_pairs
from metadata.extra_data import ExtraData, extra_training_rows, write_extra_data
from metadata.folds import MAX_LINKED_PATIENTS, cut_chaining_links, fold_groups, source_folds, triple_stratified_folds
from metadata.sources import DataSource
from rundir.completion import writing
from rundir.io import write_table
from rundir.layout import RunLayout


@dataclass(frozen=True)
class FoldOptions:
    """How `folds` groups and splits (the command's options)."""

    k: int = 5
    group_by: str = "patient"  # patient: triple-stratified K folds; source: leave-one-source-out
    dedup: bool = True  # keep exact / near-duplicate images in one fold
    dedup_distance: int = NEAR_DUPLICATE_BITS
    max_linked_patients: int = MAX_LINKED_PATIENTS
    on_bad_image: str = "raise"
    seed: int = 0
    extra_data: tuple[DataSource, ...] = ()  # other labelled datasets every fold trains on (metadata.extra_data)


@dataclass
class FoldsResult:
    """The folds written, the training rows they cover, and what the console should say."""

    folds: pd.DataFrame | None = None
    train: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _image_pairs(
    table: pd.DataFrame, run_dir: Path, options: FoldOptions, result: FoldsResult, *, advance: Callable[[], None] | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, list[ImageFingerprint]]:
    """Fingerprint every image (recording unreadable ones as skipped); the table left, its duplicate pairs, the fingerprints."""
    with_images = table["image_path"].notna()
    if not with_images.any():
        return table, None, []
    fingerprints, unreadable = fingerprint_images(
        table.loc[with_images, "image_id"].tolist(), table.loc[with_images, "image_path"].tolist(), on_error=options.on_bad_image, advance=advance
    )
    if unreadable:
        record_skipped(run_dir, pd.DataFrame(unreadable, columns=["image_id", "reason"]))
        table = table[~table["image_id"].isin([i for i, _ in unreadable])]
        result.warnings.append(f"skipped {len(unreadable)} unreadable image(s); see {RunLayout(run_dir).skipped}")
    if not options.dedup:
        return table, None, fingerprints
    pairs = find_duplicate_pairs(fingerprints, max_distance=options.dedup_distance)
    result.notes.append(f"{len(pairs)} duplicate image pair(s); each group is kept within one fold")
    return table, pairs, fingerprints


def write_run_folds(
    table: pd.DataFrame, data_dir: Path, run_dir: Path, options: FoldOptions = FoldOptions(), *, advance: Callable[[], None] | None = None
) -> FoldsResult:
    """Assign and write the folds of `table` (the run's view of the data in `data_dir`).

    Every image is decoded here once: an unreadable one raises ValueError, or with
    `on_bad_image="skip"` is left out of the run and listed in RUN/skipped_images.csv. Duplicate
    images (perceptual hash, and the data folder's published list) share a fold; near-duplicate links
    that would chain more than `max_linked_patients` patients are cut and counted.
    """
    result = FoldsResult()  # notes and warnings gather on the way; the folds come last
    table, pairs, fingerprints = _image_pairs(table, run_dir, options, result, advance=advance)
    extra = extra_training_rows(list(options.extra_data), table, fingerprints) if options.extra_data else None
    result.notes += _extra_notes(extra)
    published = published_duplicate_pairs(data_dir, table["image_id"])
    if published is not None:
        listed, absent = published
        pairs = listed if pairs is None else pd.concat([pairs, listed], ignore_index=True)
        result.notes.append(
            f"{PUBLISHED_DUPLICATES}: {len(listed)} listed duplicate pair(s) kept within one fold"
            + (f" ({absent} listed pair(s) name an image not in this data)" if absent else "")
        )
    train = table[table["split"] == "train"]
    _require_both_classes(train, data_dir)
    if options.group_by == "source":
        assigned = source_folds(train)
    else:
        if pairs is not None:
            pairs, cut = cut_chaining_links(train, pairs, options.max_linked_patients)
            if len(cut):
                examples = ", ".join(f"{a}~{b}" for a, b in cut[["image_id_a", "image_id_b"]].head(3).itertuples(index=False))
                result.warnings.append(
                    f"cut {len(cut)} near-duplicate link(s) between patients that would have chained more than "
                    f"{options.max_linked_patients} patients into one group (look-alike lesions, not copies), e.g. {examples}; "
                    "raise --max-linked-patients to keep them"
                )
        assigned = triple_stratified_folds(train, k=options.k, seed=options.seed, groups=fold_groups(train, pairs))
    with writing(run_dir, "folds"):  # the folds and the extra data they train with: together or not at all
        write_extra_data(run_dir, extra)
        write_table(assigned, RunLayout(run_dir).folds)
    result.folds, result.train = assigned, train
    result.warnings += _patients_larger_than_a_fold(train, assigned) + folds_without_a_class(train, assigned)
    return result


def _extra_notes(extra: ExtraData | None) -> list[str]:
    """What the extra datasets gave, and what was left out of them and why."""
    return [
        f"extra data {c['data']} ({c['format']}): {c['kept']} of {c['images']} image(s) join every fold's training set; left out: {c['unlabelled']} unlabelled, "
        f"{c['dropped_same_id_as_the_run']} with the id of one of the run's, {c['dropped_perceptual_copies_of_the_run']} copies of the run's images "
        f"(perceptual hash), {c['unreadable']} unreadable; {c['diagnosis_unmapped']} without a diagnosis class (missing or UNK)"
        for c in (extra.counts if extra is not None else [])
    ]


def _require_both_classes(train: pd.DataFrame, data_dir: Path) -> None:
    """Refuse training rows of one class: every later stage learns melanoma against the rest."""
    classes = sorted(train["target"].dropna().astype(int).unique())
    if len(classes) < 2:
        found = "no training rows" if not classes else f"only target {classes[0]} ({'melanoma' if classes[0] else 'no melanoma'})"
        raise DataError(
            f"{data_dir}: {found} in {len(train)} training image(s); the CNNs and the stack learn melanoma against "
            "other lesions: add images of both classes (or check the layout's label column)."
        )


def _patients_larger_than_a_fold(train: pd.DataFrame, folds: pd.DataFrame) -> list[str]:
    """A warning per patient holding more images than a fold's share: their fold trains without them."""
    per_patient = train["patient_id"].fillna(train["image_id"]).value_counts()
    share = len(train) / max(folds["fold"].nunique(), 1)
    return [
        f"patient {patient!r} holds {count} of {len(train)} training images, more than a fold's share ({share:.0f}): their fold "
        "holds them all, and its model trains on the other patients only"
        for patient, count in per_patient[per_patient > share].items()
    ]


def folds_without_a_class(train: pd.DataFrame, folds: pd.DataFrame) -> list[str]:
    """A warning per fold without a melanoma (every metric on it that needs both classes is undefined, and the
    CNNs of that fold keep their last epoch) or, where a diagnosis head can be trained (every image has a
    diagnosis, 3 or more occur), without a diagnosis that occurs: the fix is fewer folds or more images of the class.

    >>> train = pd.DataFrame({"image_id": list("abcdef"), "target": [1, 0, 0, 1, 0, 0], "diagnosis": ["MEL", "NV", "BCC", "MEL", "NV", "NV"]})
    >>> [w.split(":")[0] for w in folds_without_a_class(train, train.assign(fold=[0, 0, 0, 1, 1, 1]))]
    ['fold 1 holds no image of diagnosis BCC']
    """
    fold_of = train[["image_id"]].merge(folds[["image_id", "fold"]], on="image_id", how="left")["fold"].to_numpy()
    melanomas = train["target"].to_numpy(dtype=int)
    fewer = min(int(melanomas.sum()), len(set(fold_of)) - 1)
    fix = f"use --k {fewer} or fewer, or add melanomas" if fewer >= 2 else "add melanomas: no split of so few puts one in every fold"
    warnings = [
        f"fold {fold} holds no melanoma ({int(melanomas.sum())} in all): its validation AUC and every per-fold metric that needs "
        f"both classes are undefined, and its CNNs keep their last epoch; {fix}"
        for fold in sorted(set(fold_of))
        if melanomas[fold_of == fold].sum() == 0
    ]
    diagnosis = train["diagnosis"].astype("string")
    if not diagnosis.notna().all() or diagnosis.nunique() < 3:
        return warnings
    for fold in sorted(set(fold_of)):
        absent = sorted(set(diagnosis) - set(diagnosis[fold_of == fold]) - {"MEL"})  # a fold without MEL is warned about above
        if absent:
            warnings.append(
                f"fold {fold} holds no image of diagnosis {', '.join(absent)}: their per-class AUCs on it are undefined; "
                "use a smaller --k, or add images of those classes"
            )
    return warnings
