"""TFRecord shards of a run's images, for sets too large to decode from the original files each run.

`write_shards` stores each image once (optionally re-encoded at a fixed size, as the ISIC 2020
winners did with 512-1024 px shards of the multi-megapixel originals) as `tf.train.Example`s with
`image_id` and `image` (JPEG bytes) features, in the run table's order. `shard_sources` points the
run's table at those records with `SHARD.tfrec#POSITION` sources, which `cnn.pipeline` reads in the
stored order for prediction (`shard_images`) and in a fresh shuffled order each training epoch
(`shuffled_shard_records`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf
from PIL import Image

from errors import OptionError, RunStateError
from metadata.images import ImageBytesReader
from rundir.io import read_table, write_table
from rundir.layout import INDEX_FILE, RunLayout

SHARD_SUFFIX = ".tfrec"
FEATURES = {"image_id": tf.io.FixedLenFeature([], tf.string), "image": tf.io.FixedLenFeature([], tf.string)}


def encode_square_jpeg(encoded: bytes, image_size: int, quality: int) -> bytes:
    """Re-encode an image as an RGB JPEG of `image_size` square (what every backbone is fed)."""
    with Image.open(io.BytesIO(encoded)) as image:
        resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _example(image_id: str, image: bytes) -> bytes:
    feature = {
        "image_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id.encode()])),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(
    table: pd.DataFrame,
    run_dir: Path,
    *,
    image_size: int = 0,
    records_per_shard: int = 2048,
    quality: int = 95,
    advance: Callable[[int], None] = lambda n: None,
) -> pd.DataFrame:
    """Write `RUN/tfrecords/<split>-NNNNN-of-MMMMM.tfrec` and the index (image_id, shard, position).

    `image_size` 0 keeps each file's original bytes; otherwise images are stored at that size.
    The index is written last, so a crash mid-way never leaves shards that look complete.
    """
    if records_per_shard < 1:
        raise OptionError(f"--records-per-shard must be at least 1, got {records_per_shard}.")
    shard_dir = RunLayout(run_dir).shards
    shard_dir.mkdir(parents=True, exist_ok=True)
    index = []
    with ImageBytesReader() as reader:
        for split, rows in table.groupby("split", sort=True):
            n_shards = math.ceil(len(rows) / records_per_shard)
            for shard in range(n_shards):
                chunk = rows.iloc[shard * records_per_shard:(shard + 1) * records_per_shard]
                name = f"{split}-{shard:05d}-of-{n_shards:05d}{SHARD_SUFFIX}"
                partial = shard_dir / f".{name}.partial"
                with tf.io.TFRecordWriter(str(partial)) as writer:
                    for position, (image_id, source) in enumerate(zip(chunk["image_id"], chunk["image_path"])):
                        encoded = reader.read(source)
                        if image_size:
                            encoded = encode_square_jpeg(encoded, image_size, quality)
                        writer.write(_example(str(image_id), encoded))
                        index.append((image_id, name, position))
                        advance(1)
                partial.replace(shard_dir / name)
    index_table = pd.DataFrame(index, columns=["image_id", "shard", "position"]).assign(image_size=image_size)
    write_table(index_table, shard_dir / INDEX_FILE)
    return index_table


def shard_sources(table: pd.DataFrame, run_dir: Path) -> pd.DataFrame | None:
    """The table with `image_path` pointing at the run's shards, or None when the run has none.

    Refuses shards that miss some of the table's images (written before the data changed).
    """
    index_file = RunLayout(run_dir).shards / INDEX_FILE
    if not index_file.exists():
        return None
    index = read_table(index_file, "tfrecords").set_index("image_id")
    missing = table.loc[~table["image_id"].isin(index.index), "image_id"]
    if len(missing):
        raise RunStateError(
            f"{index_file}: {len(missing)} image(s) of the data are not in the shards (first: {missing.iloc[0]!r}); "
            f"re-run `tfrecords` or delete {index_file.parent}."
        )
    return table.assign(image_path=_record_sources(index_file, index.loc[table["image_id"]]))


def _record_sources(index_file: Path, rows: pd.DataFrame) -> list[str]:
    """`SHARD.tfrec#POSITION` of each index row."""
    return [f"{index_file.parent / s}#{p}" for s, p in zip(rows["shard"], rows["position"])]


def folder_sources(folder: Path) -> list[str] | None:
    """Every record of a shards folder (RUN/tfrecords) in stored order; None when `folder` has no shard index."""
    index_file = Path(folder) / INDEX_FILE
    if not index_file.exists():
        return None
    return _record_sources(index_file, read_table(index_file, "tfrecords").sort_values(["shard", "position"]))


def is_shard_source(source: str) -> bool:
    return f"{SHARD_SUFFIX}#" in source


def shard_refs(sources: list[str]) -> list[tuple[str, int]]:
    """(shard file, record position) of each `SHARD.tfrec#POSITION` source."""
    return [(shard, int(position)) for shard, position in (s.rsplit("#", 1) for s in sources)]


def shard_images(sources: list[str]) -> tf.data.Dataset:
    """Encoded image bytes of `SHARD.tfrec#POSITION` sources, in the order given.

    TFRecords are read sequentially, so the sources must follow the shards' own order (as any
    subset of the run table does); each shard is read once and filtered to the wanted records.
    """
    refs = shard_refs(sources)
    shards = list(dict.fromkeys(shard for shard, _ in refs))
    stored_order = sorted(refs, key=lambda ref: (shards.index(ref[0]), ref[1]))
    if refs != stored_order or len(set(refs)) != len(refs):
        raise ValueError("TFRecord sources must be unique and in the shards' stored order; rebuild them with `shard_sources`.")
    datasets = []
    for shard in shards:
        wanted = [position for s, position in refs if s == shard]
        keep = tf.scatter_nd([[p] for p in wanted], tf.ones(len(wanted), tf.bool), [max(wanted) + 1])
        records = tf.data.TFRecordDataset(shard).take(max(wanted) + 1).enumerate()
        datasets.append(records.filter(lambda i, _, keep=keep: keep[i]).map(lambda _, record: record))
    combined = datasets[0]
    for dataset in datasets[1:]:
        combined = combined.concatenate(dataset)
    return combined.map(lambda record: tf.io.parse_single_example(record, FEATURES)["image"])


SHARD_CYCLE = 4  # shards read at once, interleaved
SHARD_SHUFFLE_BUFFER = 2048  # encoded records (a few MB at 64-256 px): the only images held in memory


def shuffled_shard_records(sources: list[str], epochs: Callable[[], Iterator[tuple[int, np.ndarray]]]) -> tf.data.Dataset:
    """`(row, encoded bytes)` of each epoch's rows, streamed from TFRecord shards in a fresh order.

    The way the SIIM-ISIC 2020 winners fed TPUs: each epoch reads the shards in a seeded random order,
    `SHARD_CYCLE` at a time, interleaved, and shuffles the records in a bounded buffer; memory holds
    `SHARD_SHUFFLE_BUFFER` encoded records, whatever the dataset's size. `epochs` yields one
    `(seed, keep)` per epoch (`keep`: a mask over `sources`, the rows that epoch trains on); records
    of the shards that are not in `sources`, or not kept, are skipped. `row` indexes `sources`.
    """
    refs = shard_refs(sources)
    shards = list(dict.fromkeys(shard for shard, _ in refs))
    shard_index = {shard: i for i, shard in enumerate(shards)}
    lengths = np.zeros(len(shards), np.int64)
    for shard, position in refs:
        lengths[shard_index[shard]] = max(lengths[shard_index[shard]], position + 1)
    offsets = np.r_[0, np.cumsum(lengths)[:-1]]
    row_of = np.full(int(lengths.sum()), -1, np.int64)  # (shard offset + position) -> row of `sources`
    row_of[[offsets[shard_index[shard]] + position for shard, position in refs]] = np.arange(len(refs))
    files, lengths_t, offsets_t, row_of_t = (tf.constant(v) for v in (shards, lengths, offsets, row_of))

    def records_of(shard: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(tf.gather(files, shard)).take(tf.gather(lengths_t, shard)).enumerate()
        return records.map(lambda position, record: (tf.gather(row_of_t, tf.gather(offsets_t, shard) + position), record))

    def one_epoch(seed: tf.Tensor, keep: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(tf.range(len(shards), dtype=tf.int64), seed=tf.stack([seed, 7]))
        records = tf.data.Dataset.from_tensor_slices(order).interleave(
            records_of, cycle_length=SHARD_CYCLE, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        kept = records.filter(lambda row, _: tf.logical_and(row >= 0, tf.gather(keep, tf.maximum(row, 0))))
        return kept.shuffle(SHARD_SHUFFLE_BUFFER, seed=seed).map(
            lambda row, record: (row, tf.io.parse_single_example(record, FEATURES)["image"])
        )

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([len(sources)], tf.bool))
    return tf.data.Dataset.from_generator(epochs, output_signature=signature).flat_map(one_epoch)
