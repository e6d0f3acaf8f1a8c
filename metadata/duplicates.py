"""Exact and near-duplicate dermoscopy images.

Public ISIC data ship some images twice (the same file under two ids) and some lesions photographed
twice. Such pairs that straddle train/test inflate scores, and pairs split across CV folds leak the
label of a held-out image into training. This module fingerprints every image once (SHA-1 of the
file bytes for exact copies, a 64-bit perceptual hash for near copies), finds the duplicate pairs,
and turns them into groups that later code can keep inside one fold.

Near-duplicate search uses the pigeonhole principle instead of comparing all pairs: split the 64
hash bits into `max_distance + 1` chunks; two hashes that differ in at most `max_distance` bits
agree exactly on at least one chunk, so only hashes that share a chunk value are compared.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from errors import DataError, OptionError
from metadata.images import ImageBytesReader

HASH_BITS = 64
# Re-saved or resized copies land at 0-2 bits; at 4 bits independent look-alike lesions start to
# pair up (measured on HAM10000 at 128 px and on the synthetic cohort) and chain into huge groups.
NEAR_DUPLICATE_BITS = 2


@dataclass(frozen=True)
class ImageFingerprint:
    """What duplicate search needs from one image, so each file is decoded only once."""

    image_id: str
    sha1: str
    phash: int


def _fingerprint_one(image_id: str, path: str, reader: ImageBytesReader) -> ImageFingerprint:
    """Hash the bytes and the fully decoded pixels, so truncated files fail here, not in training."""
    data = reader.read(path)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = ImageOps.exif_transpose(img).convert("RGB")  # upright, as `cnn.pipeline.decode_image` sees it
    bits = imagehash.phash(rgb).hash.flatten()
    return ImageFingerprint(
        image_id=image_id,
        sha1=hashlib.sha1(data).hexdigest(),
        phash=int.from_bytes(np.packbits(bits).tobytes(), "big"),
    )


FINGERPRINT_CHUNK = 1000  # images per task
PARALLEL_ABOVE = 4000  # images: smaller sets are fingerprinted in this process (no worker start-up)


def _fingerprint_chunk(task: tuple[list[str], list[str]]) -> tuple[list[ImageFingerprint], list[tuple[str, str]]]:
    """Fingerprints of one chunk, and `(image_id, message)` for each image that cannot be read."""
    fingerprints, errors = [], []
    with ImageBytesReader() as reader:  # one HDF5 handle for the whole chunk, not one per image
        for image_id, path in zip(*task):
            try:
                fingerprints.append(_fingerprint_one(str(image_id), str(path), reader))
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                errors.append((str(image_id), f"image {image_id!r} at {path} cannot be read or decoded ({exc})"))
    return fingerprints, errors


def fingerprint_images(
    image_ids: Sequence[str],
    paths: Sequence[str],
    *,
    on_error: str = "raise",
    advance: Callable[[], None] | None = None,
    workers: int | None = None,
) -> tuple[list[ImageFingerprint], list[tuple[str, str]]]:
    """Fingerprint every image; return the fingerprints and `(image_id, error)` for unreadable ones.

    `on_error="raise"` stops at the first unreadable image (a dataset should be clean before
    training); `on_error="skip"` lists it instead, so one scan can report every bad file.
    `advance` is called once per image (a progress bar's hook). Sets above `PARALLEL_ABOVE` images
    are hashed on `workers` processes (default: every core), in chunks, results in input order.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if len(image_ids) != len(paths):
        raise ValueError(f"got {len(image_ids)} image ids but {len(paths)} paths; pass one path per image id.")
    ids, sources = [str(i) for i in image_ids], [str(p) for p in paths]
    tasks = [(ids[i : i + FINGERPRINT_CHUNK], sources[i : i + FINGERPRINT_CHUNK]) for i in range(0, len(ids), FINGERPRINT_CHUNK)]
    fingerprints: list[ImageFingerprint] = []
    errors: list[tuple[str, str]] = []
    with ExitStack() as stack:
        if len(ids) > PARALLEL_ABOVE and workers != 1:
            context = multiprocessing.get_context("spawn")  # fork is unsafe once TensorFlow's threads exist
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=context))
            results = pool.map(_fingerprint_chunk, tasks)
        else:
            results = map(_fingerprint_chunk, tasks)
        for (chunk_ids, _), (found, failed) in zip(tasks, results):
            if failed and on_error == "raise":
                raise DataError(f"{failed[0][1]}; remove or replace the file, or pass --on-bad-image skip to list it instead.")
            fingerprints += found
            errors += failed
            for _ in chunk_ids if advance is not None else ():
                advance()
    return fingerprints, errors


def _pairs_with_equal_key(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair (i, j), i != j, whose keys are equal, without a Python loop over pairs."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    group_end = np.repeat(ends, ends - starts)
    positions = np.arange(len(keys))
    partners = group_end - positions - 1
    total = int(partners.sum())
    left = np.repeat(positions, partners)
    first_of_run = np.repeat(np.cumsum(partners) - partners, partners)
    right = left + 1 + (np.arange(total) - first_of_run)
    return order[left], order[right]


def _check_unique(ids: pd.Index) -> None:
    """Pairs and groups are keyed by image id, so a repeated id would merge two different images."""
    if ids.has_duplicates:
        repeated = list(ids[ids.duplicated()].unique()[:5])
        raise DataError(f"image ids must be unique; repeated: {repeated}. Drop or rename the repeats.")


def _empty_pairs() -> pd.DataFrame:
    """A typed empty result, so callers can concatenate and filter without special cases."""
    return pd.DataFrame(
        {
            "image_id_a": pd.Series(dtype=object),
            "image_id_b": pd.Series(dtype=object),
            "kind": pd.Series(dtype=object),
            "distance": pd.Series(dtype=np.int64),
        }
    )


def find_duplicate_pairs(
    fingerprints: Sequence[ImageFingerprint], max_distance: int = NEAR_DUPLICATE_BITS
) -> pd.DataFrame:
    """Every unordered duplicate pair once: `image_id_a < image_id_b, kind ("exact"|"near"), distance`.

    "exact" means identical file bytes (distance 0); "near" means perceptual hashes within
    `max_distance` bits. Work grows with the number of hashes sharing a chunk, so keep
    `max_distance` small (the default 2 gives three 21-22 bit chunks).
    """
    if not 0 <= max_distance < HASH_BITS:
        raise OptionError(f"max_distance must be in 0..{HASH_BITS - 1} bits, got {max_distance}.")
    ids = np.array([fp.image_id for fp in fingerprints], dtype=object)
    _check_unique(pd.Index(ids))
    if len(ids) < 2:
        return _empty_pairs()
    hashes = np.array([fp.phash for fp in fingerprints], dtype=np.uint64)
    n = len(ids)

    found: list[np.ndarray] = []
    chunks = max_distance + 1
    for chunk in range(chunks):
        low, high = chunk * HASH_BITS // chunks, (chunk + 1) * HASH_BITS // chunks
        keys = (hashes >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
        i, j = _pairs_with_equal_key(keys)
        close = np.bitwise_count(hashes[i] ^ hashes[j]) <= max_distance
        found.append(np.minimum(i, j)[close].astype(np.int64) * n + np.maximum(i, j)[close])
    sha_codes, _ = pd.factorize(pd.Series([fp.sha1 for fp in fingerprints]))
    i, j = _pairs_with_equal_key(sha_codes)
    exact_codes = np.minimum(i, j).astype(np.int64) * n + np.maximum(i, j)

    codes = np.unique(np.concatenate([*found, exact_codes]))
    if codes.size == 0:
        return _empty_pairs()
    first, second = codes // n, codes % n
    exact = sha_codes[first] == sha_codes[second]
    distance = np.where(exact, 0, np.bitwise_count(hashes[first] ^ hashes[second])).astype(np.int64)
    id_first, id_second = ids[first], ids[second]
    swap = id_first > id_second
    pairs = pd.DataFrame(
        {
            "image_id_a": np.where(swap, id_second, id_first),
            "image_id_b": np.where(swap, id_first, id_second),
            "kind": np.where(exact, "exact", "near").astype(object),
            "distance": distance,
        }
    )
    return pairs.sort_values(["image_id_a", "image_id_b"], ignore_index=True)


def duplicate_groups(image_ids: Sequence[str], pairs: pd.DataFrame) -> pd.Series:
    """Group label (the smallest image id in its connected component) for every image.

    Duplicates chain (a~b, b~c), so folds must keep whole components together, not just pairs.
    Images without duplicates form their own group.
    """
    index = pd.Index([str(image_id) for image_id in image_ids], name="image_id")
    _check_unique(index)
    missing = [c for c in ("image_id_a", "image_id_b") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs lacks columns {missing}; pass the output of find_duplicate_pairs.")
    a = index.get_indexer(pairs["image_id_a"].astype(str))
    b = index.get_indexer(pairs["image_id_b"].astype(str))
    unknown = pd.concat([pairs["image_id_a"][a < 0], pairs["image_id_b"][b < 0]]).unique()
    if len(unknown):
        raise ValueError(
            f"pairs name image ids not in image_ids, e.g. {list(unknown[:5])}; "
            "fingerprint and group the same set of images."
        )
    n = len(index)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n)).tocsr()
    _, component = connected_components(graph, directed=False)
    labels = pd.Series(index, index=index).groupby(component).transform("min")
    return labels.rename("duplicate_group")


PUBLISHED_DUPLICATES = "ISIC_2020_Training_Duplicates.csv"  # the SIIM-ISIC 2020 organisers' list of duplicate pairs


def published_duplicate_pairs(root: Path, image_ids: pd.Series) -> tuple[pd.DataFrame, int] | None:
    """The data folder's published duplicate list as pairs (kind "listed"), and how many of its pairs
    name an image this data does not have; None without such a list.

    The SIIM-ISIC 2020 organisers list pairs of training images that show the same lesion; kept in
    one fold, neither leaks its label into the other's validation.
    """
    file = Path(root) / PUBLISHED_DUPLICATES
    if not file.is_file():
        return None
    listed = pd.read_csv(file, dtype=str)
    if not {"image_name_1", "image_name_2"} <= set(listed.columns):
        raise DataError(f"{file}: expected the columns image_name_1,image_name_2 (found {list(listed.columns)}).")
    present = listed["image_name_1"].isin(image_ids) & listed["image_name_2"].isin(image_ids)
    first, second = listed.loc[present, "image_name_1"], listed.loc[present, "image_name_2"]
    in_order = first < second
    pairs = pd.DataFrame(
        {
            "image_id_a": first.where(in_order, second).to_numpy(dtype=object),
            "image_id_b": second.where(in_order, first).to_numpy(dtype=object),
            "kind": "listed",
            "distance": 0,
        }
    )
    return pairs, int((~present).sum())
