"""Other labelled datasets in every fold's training set (`folds --extra-data DIR`), as the ISIC 2019 and
SIIM-ISIC 2020 winners trained: never in validation, OOF, the stack, the report's metrics or a submission.

Each extra dataset is read in its own layout (`DIR`, or `DIR,format=NAME,metadata=CSV`); its labelled
rows join the run as `RUN/extra_data.parquet` (image ids prefixed `x<k>_`, so no id can meet the run's),
which `train-cnns` adds to every fold's training rows and nothing else reads. Diagnoses come in the
one vocabulary every layout maps to (`metadata.schema.DIAGNOSIS_ALIASES`); a row without a label is
left out and counted, and one whose diagnosis maps to no class (missing or UNK) is counted: it trains a
melanoma head, not a diagnosis head. An image that is also the run's (the same id, or a perceptual hash within
`CROSS_SET_HASH_BITS` of one of the run's images) is dropped from the extra set and counted, so no
validation image is trained on. `RUN/extra_data.json` records the sources and the counts.

"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from metadata.duplicates import ImageFingerprint, find_duplicate_pairs, fingerprint_images
from metadata.sources import DataSource
from rundir.io import read_json, read_table, write_json, write_table
from rundir.layout import RunLayout

# Sets saved at other sizes (HAM10000 at 128 px, the 9-class set at 180 px) put copies of one photograph
# a few bits apart, further than the 2 bits `folds` uses within one set.
CROSS_SET_HASH_BITS = 8
EXTRA_FOLD = -1  # the fold of an extra row: never held out, so every fold's model trains on it


@dataclass
class ExtraData:
    """The extra training rows, and what was read, left out and dropped, per source."""

    rows: pd.DataFrame
    counts: list[dict[str, object]] = field(default_factory=list)


def _labelled_rows(source: DataSource, prefix: str) -> tuple[pd.DataFrame, dict[str, object]]:
    loaded = source.load()
    table = loaded.table[loaded.table["image_path"].notna()]
    labelled = table[table["target"].notna()]
    rows = labelled.assign(
        source_image_id=labelled["image_id"], image_id=prefix + labelled["image_id"].astype(str),
        patient_id=(prefix + labelled["patient_id"].astype("string")).astype(labelled["patient_id"].dtype),  # a missing id stays missing
        split="train", extra_data=str(source.data),
    )
    return rows, {**source.to_json(), "format": loaded.format_name, "images": int(len(table)), "unlabelled": int(len(table) - len(labelled)),
                  "diagnosis_unmapped": int((rows["diagnosis"].isna() | (rows["diagnosis"] == "UNK")).sum())}


def extra_training_rows(
    sources: list[DataSource], run_table: pd.DataFrame, run_fingerprints: list[ImageFingerprint], *, advance: Callable[[], None] | None = None,
) -> ExtraData:
    """The labelled rows of every extra dataset, without the images that are also the run's."""
    parts, counts = [], []
    run_ids = set(run_table["image_id"].astype(str))
    for k, source in enumerate(sources):
        rows, count = _labelled_rows(source, f"x{k}_")
        same_id = rows["source_image_id"].astype(str).isin(run_ids)
        rows = rows[~same_id]
        fingerprints, _ = fingerprint_images(rows["image_id"].tolist(), rows["image_path"].tolist(), on_error="skip", advance=advance)
        copies = _copies_of_run_images(fingerprints, run_fingerprints)
        unreadable = len(rows) - len(fingerprints)
        readable = {f.image_id for f in fingerprints}
        rows = rows[rows["image_id"].isin(readable) & ~rows["image_id"].isin(copies)]
        parts.append(rows)
        counts.append({**count, "dropped_same_id_as_the_run": int(same_id.sum()), "dropped_perceptual_copies_of_the_run": len(copies),
                       "unreadable": unreadable, "kept": int(len(rows))})
    return ExtraData(pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(), counts)


def _copies_of_run_images(extra: list[ImageFingerprint], run: list[ImageFingerprint]) -> set[str]:
    """Extra images whose perceptual hash lies within `CROSS_SET_HASH_BITS` of one of the run's."""
    if not extra or not run:
        return set()
    run_ids = {f.image_id for f in run}
    pairs = find_duplicate_pairs([*run, *extra], max_distance=CROSS_SET_HASH_BITS)
    crossing = pairs[pairs["image_id_a"].isin(run_ids) != pairs["image_id_b"].isin(run_ids)]
    return set(crossing["image_id_a"]).union(crossing["image_id_b"]) - run_ids


def write_extra_data(run_dir: Path, extra: ExtraData | None) -> None:
    """RUN/extra_data.parquet and .json (the summary last); without extra data, any earlier ones are removed."""
    layout = RunLayout(run_dir)
    if extra is None or extra.rows.empty:
        layout.extra_data.unlink(missing_ok=True)
        layout.extra_data_summary.unlink(missing_ok=True)
        return
    write_table(extra.rows.drop(columns=["source_image_id"]), layout.extra_data)
    write_json({"sources": extra.counts, "rows": int(len(extra.rows))}, layout.extra_data_summary)


def read_extra_summary(run_dir: Path) -> dict | None:
    """The sources and counts of the run's extra data (None without extra data)."""
    return read_json(RunLayout(run_dir).extra_data_summary)


def read_extra_data(run_dir: Path) -> pd.DataFrame | None:
    """The run's extra training rows (None without extra data)."""
    layout = RunLayout(run_dir)
    return None if read_extra_summary(run_dir) is None else read_table(layout.extra_data, "folds --extra-data")
