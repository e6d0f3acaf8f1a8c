"""tf.data input pipeline: parallel JPEG decode and resize, in-memory cache, keras-cv augmentation.

Images leave the pipeline as float32 RGB in [0, 255]; each backbone normalises them itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import keras
import keras_cv
import numpy as np
import tensorflow as tf

from cnn.options import AUGMENT_LEVELS
from cnn.tfrecords import is_shard_source, shard_images
from metadata.images import ImageBytesReader

AUTOTUNE = tf.data.AUTOTUNE
TTA_VIEWS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "none": lambda x: x,
    "hflip": lambda x: tf.reverse(x, axis=[2]),
    "vflip": lambda x: tf.reverse(x, axis=[1]),
    "rot90": lambda x: tf.image.rot90(x, 1),
    "rot180": lambda x: tf.image.rot90(x, 2),
    "rot270": lambda x: tf.image.rot90(x, 3),
}


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode one JPEG/PNG byte string to float32 [0, 255] at `image_size` square."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.ensure_shape(image, (image_size, image_size, 3))


def _stream_bytes(sources: list[str]) -> Iterator[bytes]:
    """Stream the bytes of each source in order (HDF5 files are opened once for the whole pass)."""
    with ImageBytesReader() as reader:
        for source in sources:
            yield reader.read(source)


def encoded_images(sources: list[str]) -> tf.data.Dataset:
    """Encoded image bytes per source: files are read in parallel, HDF5 and TFRecord entries streamed in order."""
    if sources and all(is_shard_source(s) for s in sources):
        return shard_images(sources)
    if any(".hdf5#" in s for s in sources):
        return tf.data.Dataset.from_generator(
            lambda: _stream_bytes(sources), output_signature=tf.TensorSpec((), tf.string)
        )
    paths = tf.constant(sources, dtype=tf.string)  # typed, so an empty split is an empty string dataset
    return tf.data.Dataset.from_tensor_slices(paths).map(tf.io.read_file, num_parallel_calls=AUTOTUNE)


class MicroscopeVignette(keras.layers.Layer):
    """Darken the corners as a dermatoscope's round field of view does (random strength per image)."""

    def __init__(self, max_strength: float = 0.6, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_strength = max_strength
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        shape = tf.shape(images)
        axis_y = tf.linspace(-1.0, 1.0, shape[1])
        axis_x = tf.linspace(-1.0, 1.0, shape[2])
        radius = tf.sqrt(axis_y[:, None] ** 2 + axis_x[None, :] ** 2) / np.sqrt(2.0)
        strength = keras.random.uniform((shape[0], 1, 1, 1), 0.0, self.max_strength, seed=self.generator)
        return images * (1.0 - strength * tf.clip_by_value(radius, 0.0, 1.0)[None, :, :, None] ** 2)


class HairLines(keras.layers.Layer):
    """Draw up to `max_hairs` thin dark straight hairs per image, a common dermoscopy artefact."""

    def __init__(self, max_hairs: int = 3, probability: float = 0.5, seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_hairs, self.probability = max_hairs, probability
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        shape = tf.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        yy = tf.cast(tf.range(height), tf.float32)[None, None, :, None]
        xx = tf.cast(tf.range(width), tf.float32)[None, None, None, :]
        size = tf.cast(tf.minimum(height, width), tf.float32)
        draw = lambda low, high: keras.random.uniform((batch, self.max_hairs, 1, 1), low, high, seed=self.generator)  # noqa: E731
        point_y, point_x = draw(0.0, 1.0) * size, draw(0.0, 1.0) * size
        angle = draw(0.0, np.pi)
        distance = tf.abs((yy - point_y) * tf.cos(angle) - (xx - point_x) * tf.sin(angle))
        thickness = draw(0.4, 1.0) * tf.maximum(size / 96.0, 0.5)
        active = tf.cast(draw(0.0, 1.0) < self.probability, tf.float32)
        hair = tf.reduce_max(active * tf.cast(distance < thickness, tf.float32), axis=1)[..., None]
        return images * (1.0 - hair) + 40.0 * hair


def build_augmenter(seed: int, level: str = "light") -> keras.Sequential | None:
    """Augmentation run inside tf.data on float32 batches.

    light: dermoscopy is orientation-free, so flips and any rotation, plus mild brightness and
    contrast jitter. strong: also keras-cv RandAugment-style colour/shape jitter, random erasing
    (cutout), a microscope vignette and hair-like lines.
    """
    if level not in AUGMENT_LEVELS:
        raise ValueError(f"--augment {level!r}: choose one of {AUGMENT_LEVELS}.")
    if level == "none":
        return None
    layers = [
        keras_cv.layers.RandomFlip("horizontal_and_vertical", seed=seed),
        keras_cv.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed),
        keras_cv.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
        keras_cv.layers.RandomContrast(value_range=(0, 255), factor=0.1, seed=seed),
    ]
    if level == "strong":
        layers += [
            keras_cv.layers.RandomHue(0.05, value_range=(0, 255), seed=seed),
            keras_cv.layers.RandomSaturation((0.4, 0.6), seed=seed),  # 0.5 keeps the colours as they are
            keras_cv.layers.RandomZoom(0.15, fill_mode="reflect", seed=seed),
            keras_cv.layers.RandomCutout(0.25, 0.25, fill_mode="gaussian_noise", seed=seed),
            MicroscopeVignette(seed=seed),
            HairLines(seed=seed),
        ]
    return keras.Sequential(layers, name=f"augment_{level}")


def mix_batches(kind: str, seed: int) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """MixUp or CutMix over a batch (keras-cv); labels are mixed in the same proportion."""
    layer = {"mixup": keras_cv.layers.MixUp, "cutmix": keras_cv.layers.CutMix}[kind](seed=seed)

    def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        two_d = tf.reshape(labels, (tf.shape(labels)[0], -1))
        mixed = layer({"images": images, "labels": two_d}, training=True)
        return mixed["images"], tf.reshape(mixed["labels"], tf.shape(labels))

    return apply


def image_dataset(
    paths: Sequence[str],
    labels: np.ndarray | None,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment: keras.Sequential | None = None,
    mix: str = "none",
    cache: str = "memory",
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of `(images, labels)` (or images alone when `labels` is None).

    Decoded, resized images are cached (`cache`: "memory", "none", or a file path prefix for an
    on-disk cache) after the first pass, so later epochs cost only augmentation; shuffling
    happens after the cache so every epoch sees a new order. `mix` is "none", "mixup" or "cutmix".
    """
    images = encoded_images(list(paths)).map(lambda b: decode_image(b, image_size), num_parallel_calls=AUTOTUNE)
    # A known size matters: Keras opens a fresh iterator each epoch only on a dataset of known cardinality;
    # on a filtered (TFRecord) stream it kept one iterator, which ran dry after the first epoch. The
    # assertion also fails loudly if a source yields another number of images than asked for.
    images = images.apply(tf.data.experimental.assert_cardinality(len(paths)))
    ds = images if labels is None else tf.data.Dataset.zip(
        images, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.float32))
    )
    if cache != "none":
        ds = ds.cache("" if cache == "memory" else cache)
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        if labels is None:
            ds = ds.map(lambda x: augment(x, training=True), num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=AUTOTUNE)
    if mix != "none" and labels is not None:
        ds = ds.map(mix_batches(mix, seed), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def predict_tta(model: keras.Model, images: tf.data.Dataset, views: Sequence[str] = ("none", "hflip", "vflip")) -> np.ndarray:
    """Mean of the model's outputs (N, n_outputs) over the named test-time views of each image."""
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise KeyError(f"unknown TTA view(s) {unknown}; known: {sorted(TTA_VIEWS)}.")
    predictions = [
        model.predict(images.map(TTA_VIEWS[view], num_parallel_calls=AUTOTUNE), verbose=0)
        for view in views
    ]
    return np.mean(predictions, axis=0)
