"""tf.data input pipeline: parallel JPEG decode and resize, in-memory cache, keras-cv augmentation.

Images leave the pipeline as float32 RGB in [0, 255]; each backbone normalises them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import keras_cv
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
TTA_VIEWS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "none": lambda x: x,
    "hflip": lambda x: tf.reverse(x, axis=[2]),
    "vflip": lambda x: tf.reverse(x, axis=[1]),
}


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one JPEG/PNG byte string to float32 [0, 255] at `image_size` square."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.ensure_shape(image, (image_size, image_size, 3))


def _stream_bytes(sources: list[str]) -> Iterator[bytes]:
    """Stream the bytes of each source in order: `FILE.hdf5#KEY` entries (each file opened once) or files."""
    import h5py

    handles: dict[str, h5py.File] = {}
    try:
        for source in sources:
            if ".hdf5#" not in source:
                yield Path(source).read_bytes()
                continue
            file, key = source.rsplit("#", 1)
            if file not in handles:
                handles[file] = h5py.File(file, "r")
            yield bytes(handles[file][key][()])
    finally:
        for handle in handles.values():
            handle.close()


def encoded_images(sources: list[str]) -> tf.data.Dataset:
    """Encoded image bytes per source: files are read in parallel, HDF5 entries streamed in order."""
    if any(".hdf5#" in s for s in sources):
        return tf.data.Dataset.from_generator(
            lambda: _stream_bytes(sources), output_signature=tf.TensorSpec((), tf.string)
        )
    return tf.data.Dataset.from_tensor_slices(sources).map(tf.io.read_file, num_parallel_calls=AUTOTUNE)


def build_augmenter(seed: int) -> keras.Sequential:
    """Dermoscopy is orientation-free: flips and any rotation, plus mild colour/contrast jitter."""
    return keras.Sequential(
        [
            keras_cv.layers.RandomFlip("horizontal_and_vertical", seed=seed),
            keras_cv.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed),
            keras_cv.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
            keras_cv.layers.RandomContrast(value_range=(0, 255), factor=0.1, seed=seed),
        ],
        name="augment",
    )


def image_dataset(
    paths: Sequence[str],
    labels: np.ndarray | None,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: keras.Sequential | None = None,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of `(images, labels)` (or images alone when `labels` is None).

    Decoded, resized images are cached in memory after the first pass, so later epochs cost only
    augmentation; shuffling happens after the cache so every epoch sees a new order.
    """
    images = encoded_images(list(paths)).map(lambda b: decode_image(b, image_size), num_parallel_calls=AUTOTUNE)
    ds = images if labels is None else tf.data.Dataset.zip(
        images, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.float32))
    )
    ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        if labels is None:
            ds = ds.map(lambda x: augment(x, training=True), num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def predict_tta(model: keras.Model, images: tf.data.Dataset, views: Sequence[str] = ("none", "hflip", "vflip")) -> np.ndarray:
    """Mean of the model's probabilities over the named test-time views of each image."""
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise KeyError(f"unknown TTA view(s) {unknown}; known: {sorted(TTA_VIEWS)}.")
    predictions = [
        model.predict(images.map(TTA_VIEWS[view], num_parallel_calls=AUTOTUNE), verbose=0).reshape(-1)
        for view in views
    ]
    return np.mean(predictions, axis=0)
