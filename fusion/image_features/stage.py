"""The `features` stage: dermoscopy features of every image of a run, parallel, bounded, resumable.

Images are decoded by the CNNs' own pipeline (`cnn.pipeline.named_image_batches`: files, HDF5
entries, EXIF orientation, the same colour constancy) in batches, and each batch's features are
computed in a worker process, so memory holds a few batches whatever the dataset's size. Every
`CHUNK_ROWS` images a chunk is saved under `RUN/features/partial/`; an interrupted call resumes from
its last chunk. The finished call writes `RUN/features/<family>.parquet` (image_id + the family's
columns) and `RUN/features/recipe.json` last, inside `writing(run, "features")`: a reader sees the
old features or the new ones. `predict` computes the same features for new images with
`compute_image_features` and the bundle's copy of the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from joblib import Parallel, delayed

from errors import DataError, RunStateError
from fusion.image_features.families import FEATURE_FAMILIES, batch_features, check_families, family_columns
from rundir.completion import require_complete, stage_problem, writing
from rundir.io import read_json, read_table, write_json, write_table
from rundir.layout import RunLayout

DEFAULT_IMAGE_SIZE = 128  # HAM10000's own size; a lesion's border and texture survive it
TASK_IMAGES = 32  # images per worker task
CHUNK_ROWS = 2048  # images per saved chunk (what an interruption can lose)


@dataclass(frozen=True)
class FeatureRecipe:
    """How features were computed; a bundle keeps it so new images get the same numbers.

    >>> recipe = FeatureRecipe(("shape", "color"))
    >>> recipe.columns()[:2], FeatureRecipe.from_json(recipe.to_json()) == recipe
    (['shape_area_share', 'shape_eccentricity'], True)
    """

    families: tuple[str, ...] = tuple(FEATURE_FAMILIES)
    image_size: int = DEFAULT_IMAGE_SIZE
    color_constancy: str = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", tuple(check_families(list(self.families))))

    def columns(self, family: str | None = None) -> list[str]:
        return [c for f in (self.families if family is None else (family,)) for c in family_columns(f)]

    def to_json(self) -> dict:
        return {**asdict(self), "families": list(self.families)}

    @classmethod
    def from_json(cls, data: dict) -> FeatureRecipe:
        return cls(tuple(data["families"]), int(data["image_size"]), data.get("color_constancy", "none"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]


def _uint8_tasks(sources: list[str], recipe: FeatureRecipe) -> Iterator[np.ndarray]:
    from cnn.pipeline import named_image_batches  # TensorFlow loads only in the process that decodes

    for batch in named_image_batches(sources, recipe.image_size, TASK_IMAGES, recipe.color_constancy):
        yield np.clip(np.round(batch.numpy()), 0, 255).astype(np.uint8)


def compute_image_features(
    sources: list[str], recipe: FeatureRecipe, n_jobs: int | None = None, advance: Callable[[int], None] | None = None
) -> pd.DataFrame:
    """The recipe's features of each image source, one row per source in order.

    `n_jobs` worker processes (default: every core; 1 computes in this process, as for a handful of
    images) each take `TASK_IMAGES` decoded images at a time; `advance(n)` after each task.
    """
    n_jobs = 1 if len(sources) <= TASK_IMAGES else (n_jobs or os.cpu_count() or 1)
    rows: list[dict[str, float]] = []
    with Parallel(n_jobs=n_jobs, return_as="generator", pre_dispatch="2*n_jobs") as parallel:
        for features in parallel(delayed(batch_features)(images, recipe.families) for images in _uint8_tasks(sources, recipe)):
            rows.extend(features)
            if advance is not None:
                advance(len(features))
    return pd.DataFrame(rows, columns=recipe.columns(), dtype=float)


def image_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The run's rows that have an image (every split), with the id and source the stage reads."""
    rows = table.loc[table["image_path"].notna(), ["image_id", "image_path"]].reset_index(drop=True)
    if rows.empty:
        raise DataError("no row has an image: the features stage computes dermoscopy features from images.")
    return rows


def finished_recipe(run_dir: Path) -> FeatureRecipe | None:
    """The recipe of the run's finished features, None when the run has none (or they were interrupted)."""
    require_complete(run_dir, "features")
    found = read_json(RunLayout(run_dir).feature_recipe)
    return None if found is None else FeatureRecipe.from_json(found["recipe"])


def run_features(
    table: pd.DataFrame, run_dir: Path, recipe: FeatureRecipe, *, n_jobs: int | None = None, advance: Callable[[int], None] | None = None
) -> dict[str, int]:
    """Compute (or resume) the recipe's features for every image of `table` and write them under RUN/features;
    nothing is recomputed when the run already has them for the same recipe and images.

    Returns the number of images and of images without a usable lesion mask (all-NaN rows).
    """
    layout = RunLayout(run_dir)
    rows = image_rows(table)
    previous = None if stage_problem(run_dir, "features") else read_json(layout.feature_recipe)  # an interrupted call's are redone
    finished = previous if previous is not None and FeatureRecipe.from_json(previous["recipe"]) == recipe else None
    if finished is not None and read_table(layout.feature_table(recipe.families[0]), "features")["image_id"].astype(str).equals(rows["image_id"].astype(str)):
        if advance is not None:
            advance(len(rows))
        return {"images": finished["images"], "no_lesion_found": finished["no_lesion_found"]}  # already computed for these images
    chunks = layout.feature_chunks / recipe.digest()
    chunks.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk_rows = rows.iloc[start : start + CHUNK_ROWS]
        file = chunks / f"chunk{start // CHUNK_ROWS:05d}.parquet"
        saved = read_table(file, "features") if file.exists() else None
        if saved is None or not saved["image_id"].astype(str).equals(chunk_rows["image_id"].astype(str).reset_index(drop=True)):
            features = compute_image_features(chunk_rows["image_path"].astype(str).tolist(), recipe, n_jobs, advance)
            saved = features.assign(image_id=chunk_rows["image_id"].to_numpy())
            write_table(saved, file)
        elif advance is not None:
            advance(len(chunk_rows))
        parts.append(saved)
    features = pd.concat(parts, ignore_index=True)
    with writing(run_dir, "features"):
        for old in layout.features.glob("*.parquet"):
            old.unlink()
        for family in recipe.families:
            write_table(features[["image_id", *recipe.columns(family)]], layout.feature_table(family))
        no_lesion = int(features[recipe.columns()].isna().all(axis=1).sum())
        write_json({"recipe": recipe.to_json(), "images": len(features), "no_lesion_found": no_lesion}, layout.feature_recipe)
    shutil.rmtree(layout.feature_chunks, ignore_errors=True)
    return {"images": len(features), "no_lesion_found": no_lesion}


def read_run_features(run_dir: Path, image_ids: pd.Series) -> pd.DataFrame | None:
    """The run's finished features for `image_ids`, in their order (None when the run has none).

    Refuses ids the features were not computed for (data changed since `features` ran).
    """
    recipe = finished_recipe(run_dir)
    if recipe is None:
        return None
    layout = RunLayout(run_dir)
    tables = [read_table(layout.feature_table(f), "features").set_index("image_id") for f in recipe.families]
    features = pd.concat(tables, axis=1)
    missing = ~image_ids.isin(features.index)
    if missing.any():
        raise RunStateError(
            f"{layout.features}: no features for {int(missing.sum())} image(s) of the run (first: {image_ids[missing].iloc[0]!r}); "
            "the data changed since `features` ran: run `python cli.py features` on this run again."
        )
    return features.reindex(image_ids.to_numpy()).reset_index(drop=True)
