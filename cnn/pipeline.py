"""tf.data input pipeline: shuffled row indices, parallel reads and JPEG decode, a uint8 cache within a
memory budget (or streaming above it), keras-cv augmentation.

Images leave the pipeline as float32 RGB in [0, 255]; each backbone normalises them itself.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import keras
import keras_cv
import numpy as np
import pandas as pd
import tensorflow as tf

from cnn.tfrecords import is_shard_source, shard_images, shuffled_shard_records
from errors import DataError, OptionError
from metadata.images import ImageBytesReader, exif_orientation, is_hdf5_source

AUTOTUNE = tf.data.AUTOTUNE
TTA_VIEWS: dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    "none": lambda x: x,
    "hflip": lambda x: tf.reverse(x, axis=[2]),
    "vflip": lambda x: tf.reverse(x, axis=[1]),
    "rot90": lambda x: tf.image.rot90(x, 1),
    "rot180": lambda x: tf.image.rot90(x, 2),
    "rot270": lambda x: tf.image.rot90(x, 3),
}


# EXIF orientation -> the turn that shows the image upright (PIL's ImageOps.exif_transpose, in TF ops).
ORIENTATIONS: dict[int, Callable[[tf.Tensor], tf.Tensor]] = {
    1: lambda x: x,
    2: tf.image.flip_left_right,
    3: lambda x: tf.image.rot90(x, 2),
    4: tf.image.flip_up_down,
    5: tf.image.transpose,
    6: lambda x: tf.image.rot90(x, 3),
    7: lambda x: tf.image.rot90(tf.image.transpose(x), 2),
    8: lambda x: tf.image.rot90(x, 1),
}


def upright(image: tf.Tensor, encoded: tf.Tensor) -> tf.Tensor:
    """The decoded `image` turned as its EXIF orientation says (as every viewer shows it)."""
    orientation = tf.numpy_function(lambda b: np.int32(exif_orientation(b.item() if isinstance(b, np.ndarray) else b)), [encoded], tf.int32, stateful=False)
    branches = [lambda turn=turn: turn(image) for turn in ORIENTATIONS.values()]
    return tf.switch_case(tf.clip_by_value(tf.reshape(orientation, []) - 1, 0, 7), branches)


SHADES_OF_GRAY_P = 6  # the Minkowski norm of the ISIC 2018-2019 winners' colour constancy


def shades_of_gray(image: tf.Tensor, p: float = SHADES_OF_GRAY_P) -> tf.Tensor:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004): estimate the illuminant as each
    channel's Minkowski p-mean and divide it out, so a lesion photographed under another light or
    camera balance looks as under a neutral one. A grey-world image is left as it is.

    >>> grey = tf.fill([4, 4, 3], 100.0)
    >>> bool(tf.reduce_all(tf.abs(shades_of_gray(grey) - grey) < 1e-3))
    True
    """
    image = tf.cast(image, tf.float32)
    return tf.clip_by_value(image / (estimate_illuminant(image, p) * tf.sqrt(3.0)), 0.0, 255.0)


def estimate_illuminant(images: tf.Tensor, p: float = SHADES_OF_GRAY_P) -> tf.Tensor:
    """The Shades of Gray illuminant of an image (H, W, 3) or a batch (N, H, W, 3): each channel's
    Minkowski p-mean, as a unit vector ((1, 1, 1) / sqrt(3) for a neutral light)."""
    images = tf.cast(images, tf.float32)
    illuminant = tf.reduce_mean(tf.pow(tf.maximum(images, 0.0), p), axis=[-3, -2]) ** (1.0 / p)
    return illuminant / tf.maximum(tf.norm(illuminant, axis=-1, keepdims=True), 1e-6)


ILLUMINANT_SAMPLE = 512  # training images whose illuminants `--illuminant-augment` draws from


def training_illuminants(sources: Sequence[str], image_size: int, seed: int) -> np.ndarray:
    """Illuminants (K, 3) of a seeded sample of training images as decoded (before any colour
    constancy): the lights and camera balances the training data was taken under."""
    rng = np.random.default_rng(seed)
    sample = [sources[i] for i in sorted(rng.choice(len(sources), min(ILLUMINANT_SAMPLE, len(sources)), replace=False))]
    batches = image_dataset(sample, None, image_size, 64, cache="none")
    return np.concatenate([estimate_illuminant(batch).numpy() for batch in batches])


DARK_BORDER_LEVEL = 40.0  # a pixel whose mean RGB is below this belongs to the dermoscope's dark surround
DARK_BORDER_SHARE = 0.3  # a row/column lit less than (1 - this) x the best-lit one is border (a circle's inscribed square)


def dark_border_box(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(top, bottom, left, right) of an image (H, W, 3) without the dark vignette a dermoscope's round
    field of view leaves: from the first to the last row (column) lit at least (1 - DARK_BORDER_SHARE)
    as much as the best-lit one, so a round field is cut to about its inscribed square. A dark lesion
    inside does not shrink it (only the outermost such rows count); a box under half the image in
    either direction (a dark photograph, not a border) is the whole image.

    >>> field = np.zeros((40, 40, 3), np.uint8)
    >>> field[5:35, 8:30] = 180  # the lit field inside a black surround
    >>> field[15:25, 12:20] = 10  # a black lesion in it
    >>> [int(x) for x in dark_border_box(field)]
    [5, 35, 8, 30]
    """
    lit = tf.cast(tf.reduce_mean(tf.cast(image, tf.float32), axis=-1) >= DARK_BORDER_LEVEL, tf.float32)

    def span(lit_share: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        size = tf.size(lit_share)
        kept = tf.cast(tf.where(lit_share >= (1 - DARK_BORDER_SHARE) * tf.reduce_max(lit_share))[:, 0], tf.int32)
        start, stop = tf.reduce_min(kept), tf.reduce_max(kept) + 1
        usable = (tf.reduce_max(lit_share) > 0) & ((stop - start) * 2 >= size)
        return tf.where(usable, start, 0), tf.where(usable, stop, size)

    top, bottom = span(tf.reduce_mean(lit, axis=1))
    left, right = span(tf.reduce_mean(lit, axis=0))
    return top, bottom, left, right


def crop_dark_border(image: tf.Tensor) -> tf.Tensor:
    """The image inside its dark dermoscope border (`dark_border_box`), so that neither colour
    constancy nor the CNN sees the black surround, whose size varies between devices."""
    top, bottom, left, right = dark_border_box(image)
    return image[top:bottom, left:right]


@dataclass(frozen=True)
class ColorConstancy:
    """One --color-constancy method: `normalise` on the resized image, after an optional border crop
    at the decoded resolution."""

    normalise: Callable[[tf.Tensor], tf.Tensor]
    crop_border: bool = False


# --color-constancy: how each image's colours are normalised after decoding (training, predict, Grad-CAM alike).
COLOR_CONSTANCY: dict[str, ColorConstancy] = {
    "none": ColorConstancy(lambda image: image),
    "shades-of-gray": ColorConstancy(shades_of_gray),
    "shades-of-gray-cropped": ColorConstancy(shades_of_gray, crop_border=True),
}


def decode_image(encoded: tf.Tensor, image_size: int, color_constancy: str = "none") -> tf.Tensor:
    """Decode one JPEG/PNG byte string, upright (EXIF orientation), to float32 [0, 255] at `image_size`
    square, its colours normalised by `color_constancy` (a key of COLOR_CONSTANCY)."""
    method = COLOR_CONSTANCY[color_constancy]
    image = upright(tf.io.decode_image(encoded, channels=3, expand_animations=False), encoded)
    if method.crop_border:
        image = crop_dark_border(image)
    image = method.normalise(tf.image.resize(image, (image_size, image_size), antialias=True))
    return tf.ensure_shape(image, (image_size, image_size, 3))


def first_undecodable(sources: Sequence[str], image_size: int = 8) -> str | None:
    """The first source that cannot be read or decoded as `decode_image` does, if any (a slow scan, run
    once a batch has failed, to name the file instead of showing TensorFlow's error)."""
    with ImageBytesReader() as reader:
        for source in sources:
            try:
                decode_image(reader.read(source), image_size)
            except (OSError, tf.errors.OpError):
                return source
    return None


def _stream_bytes(sources: list[str]) -> Iterator[bytes]:
    """Stream the bytes of each source in order (HDF5 files are opened once for the whole pass)."""
    with ImageBytesReader() as reader:
        for source in sources:
            yield reader.read(source)


def encoded_images(sources: list[str]) -> tf.data.Dataset:
    """Encoded image bytes per source, in order: files and HDF5 entries read in parallel, TFRecord entries streamed."""
    if sources and all(is_shard_source(s) for s in sources):
        return shard_images(sources)
    return tf.data.Dataset.range(len(sources)).map(bytes_reader(sources), num_parallel_calls=AUTOTUNE, deterministic=True)


class _SharedReader:
    """One `ImageBytesReader` shared by tf.data's reader threads (h5py serialises access to a file itself)."""

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources
        self.reader = ImageBytesReader()
        self.lock = threading.Lock()

    def read(self, index: np.int64) -> bytes:
        source = self.sources[int(index)]
        with self.lock:  # the handle cache of ImageBytesReader is a plain dict
            return self.reader.read(source)


def bytes_reader(sources: list[str]) -> Callable[[tf.Tensor], tf.Tensor]:
    """A tf.data map function: row index -> the encoded bytes of `sources[index]`.

    Indices are what gets shuffled, so reading (and decoding) happens after shuffling: memory does not
    grow with the number of images. Files go through `tf.io.read_file`; HDF5 entries (`FILE.hdf5#KEY`)
    through a shared reader on tf.data's parallel threads, not one Python generator.
    """
    if any(is_hdf5_source(s) for s in sources):
        reader = _SharedReader(list(sources))
        return lambda i: tf.ensure_shape(tf.numpy_function(reader.read, [i], tf.string, stateful=False), ())
    paths = tf.constant(list(sources), dtype=tf.string)  # typed, so an empty split is an empty string dataset
    return lambda i: tf.io.read_file(tf.gather(paths, i))


@dataclass
class EpochSampler:
    """Which rows each training epoch reads, in which order: a fresh seeded draw per epoch.

    Every row in a new random order; or, with `negatives_per_patient` (the ISIC 2024 winners' answer
    to 1 melanoma in 1,000 lesions), every positive row plus at most that many of each patient's
    negative rows, drawn afresh each epoch. The draw of epoch e depends only on (seed, e), so a
    resumed run sets `epoch` to its finished epochs and draws what an uninterrupted one would.

    >>> sampler = EpochSampler(6, seed=0, patient=np.array([0, 0, 0, 1, 1, 1]),
    ...                        positive=np.array([1, 0, 0, 0, 0, 0], bool), negatives_per_patient=1)
    >>> sampler.epoch_size, sorted(sampler.indices(0))[:1]
    (3, [np.int64(0)])
    """

    n_rows: int
    seed: int = 0
    patient: np.ndarray | None = None
    positive: np.ndarray | None = None
    negatives_per_patient: int | None = None
    epoch: int = 0  # the next epoch to draw

    def keep(self, epoch: int) -> np.ndarray:
        """Rows epoch `epoch` trains on (all of them without negative sampling)."""
        if self.negatives_per_patient is None:
            return np.ones(self.n_rows, bool)
        rng = np.random.default_rng([self.seed, epoch, 1])
        negative = ~np.asarray(self.positive, bool)
        order = pd.Series(rng.random(self.n_rows)).where(negative).groupby(np.asarray(self.patient)).rank(method="first")
        return ~negative | (order <= self.negatives_per_patient).to_numpy()

    def indices(self, epoch: int) -> np.ndarray:
        """Row indices of epoch `epoch`, shuffled."""
        chosen = np.flatnonzero(self.keep(epoch))
        return np.random.default_rng([self.seed, epoch]).permutation(chosen)

    @property
    def epoch_size(self) -> int:
        return int(self.keep(0).sum())  # the same every epoch: every positive, min(N, negatives) per patient

    def _next_epoch(self) -> int:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def __call__(self) -> Iterator[np.ndarray]:
        """One epoch's indices per iterator opened on the dataset (Keras opens one per epoch)."""
        yield self.indices(self._next_epoch())

    def masks(self) -> Iterator[tuple[int, np.ndarray]]:
        """One epoch's `(seed, rows kept)` per iterator opened: what a TFRecord stream filters and shuffles by."""
        epoch = self._next_epoch()
        yield int(np.random.default_rng([self.seed, epoch, 2]).integers(2**62)), self.keep(epoch)


BYTES_PER_PIXEL = 3  # decoded images are kept as uint8 RGB


def decoded_bytes(n_images: int, image_size: int) -> int:
    """Memory of `n_images` decoded at `image_size` square as uint8 RGB."""
    return n_images * image_size * image_size * BYTES_PER_PIXEL


def choose_cache(cache: str, n_images: int, image_size: int, budget_gb: float, *, shards: bool = False) -> tuple[str, str]:
    """The cache mode to use (`memory`, `disk` or `none`) and why, for `--cache auto` or an explicit choice.

    `auto` keeps the decoded images in memory when they fit the budget and streams (read and decode
    every epoch, after shuffling) when they do not: from their files in a shuffled order, or from
    TFRecord shards interleaved and shuffled in a bounded buffer.

    >>> choose_cache("auto", 10_000, 64, budget_gb=1.0)[0], choose_cache("auto", 200_000, 64, budget_gb=1.0)[0]
    ('memory', 'none')
    """
    need = decoded_bytes(n_images, image_size) / 1e9
    if cache != "auto":
        return cache, f"--cache {cache}"
    if need <= budget_gb:
        return "memory", f"{n_images} images at {image_size} px need {need:.2f} GB decoded, within --cache-budget {budget_gb:g} GB"
    how = "streamed from the TFRecord shards, interleaved and shuffled in a bounded buffer" if shards else "streamed from their files"
    return "none", f"{n_images} images at {image_size} px would need {need:.2f} GB decoded, over --cache-budget {budget_gb:g} GB: {how}"


def decoded_store(sources: list[str], image_size: int, file: str | None = None, color_constancy: str = "none") -> np.ndarray:
    """Every source decoded once at `image_size` as uint8, in RAM or (with `file`) in a .npy memmap."""
    shape = (len(sources), image_size, image_size, 3)
    store = np.empty(shape, np.uint8) if file is None else np.lib.format.open_memmap(file, mode="w+", dtype=np.uint8, shape=shape)
    images = encoded_images(list(sources)).map(lambda b: _as_uint8(decode_image(b, image_size, color_constancy)), num_parallel_calls=AUTOTUNE)
    done = 0
    for batch in images.batch(256).prefetch(2):
        store[done : done + len(batch)] = batch.numpy()
        done += len(batch)
    if done != len(sources):
        raise ValueError(f"{len(sources)} images were asked for but {done} were read; the image source is short.")
    return store


def _as_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


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


class IlluminantShift(keras.layers.Layer):
    """Re-light each image under an illuminant drawn from `illuminants` (unit vectors, e.g. estimated
    on training images by Shades of Gray), its own (Shades of Gray) divided out first: the model sees
    each lesion under the lights and camera balances of other images, so a new clinic's colour cast
    is nothing new to it."""

    def __init__(self, illuminants: Sequence[Sequence[float]], seed: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.illuminants = [list(map(float, light)) for light in illuminants]
        self.gains = tf.constant(np.asarray(self.illuminants) * np.sqrt(3.0), tf.float32)  # a neutral light: gain 1
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        drawn = keras.random.randint((tf.shape(images)[0],), 0, len(self.illuminants), seed=self.generator)
        own = estimate_illuminant(images) * np.sqrt(3.0)  # divided out first, so casts replace each other instead of piling up
        return tf.clip_by_value(images * (tf.gather(self.gains, drawn) / tf.maximum(own, 1e-3))[:, None, None, :], 0.0, 255.0)


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


def _light_layers(seed: int) -> list[keras.Layer]:
    """Dermoscopy is orientation-free: flips and any rotation, plus mild brightness and contrast jitter."""
    return [
        keras_cv.layers.RandomFlip("horizontal_and_vertical", seed=seed),
        keras_cv.layers.RandomRotation(0.5, fill_mode="reflect", seed=seed),
        keras_cv.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed),
        keras_cv.layers.RandomContrast(value_range=(0, 255), factor=0.1, seed=seed),
    ]


def _strong_layers(seed: int) -> list[keras.Layer]:
    """The light layers, then keras-cv RandAugment-style colour/shape jitter, random erasing (cutout), a
    microscope vignette and hair-like lines."""
    return [
        *_light_layers(seed),
        keras_cv.layers.RandomHue(0.05, value_range=(0, 255), seed=seed),
        keras_cv.layers.RandomSaturation((0.4, 0.6), seed=seed),  # 0.5 keeps the colours as they are
        keras_cv.layers.RandomZoom(0.15, fill_mode="reflect", seed=seed),
        keras_cv.layers.RandomCutout(0.25, 0.25, fill_mode="gaussian_noise", seed=seed),
        MicroscopeVignette(seed=seed),
        HairLines(seed=seed),
    ]


# --augment: the training-time augmentation layers of each level, given the seed.
AUGMENTATIONS: dict[str, Callable[[int], list[keras.Layer]]] = {"none": lambda seed: [], "light": _light_layers, "strong": _strong_layers}


def build_augmenter(seed: int, level: str = "light", illuminants: np.ndarray | None = None) -> keras.Sequential | None:
    """Augmentation run inside tf.data on float32 batches: the level's layers (`AUGMENTATIONS`);
    `illuminants` (K, 3), at any level: each image re-lit under one of them first (`IlluminantShift`)."""
    if level not in AUGMENTATIONS:
        raise OptionError(f"--augment {level!r}: choose one of {tuple(AUGMENTATIONS)}.")
    layers = [*([] if illuminants is None else [IlluminantShift(illuminants, seed=seed)]), *AUGMENTATIONS[level](seed)]
    return keras.Sequential(layers, name=f"augment_{level}") if layers else None


# --mix: the keras-cv layer that mixes a batch's images and labels (none: no mixing).
MIXES: dict[str, Callable[..., keras.Layer] | None] = {"none": None, "mixup": keras_cv.layers.MixUp, "cutmix": keras_cv.layers.CutMix}


def mix_batches(kind: str, seed: int) -> Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """MixUp or CutMix over a batch (keras-cv); labels are mixed in the same proportion."""
    layer = MIXES[kind](seed=seed)

    def apply(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        two_d = tf.reshape(labels, (tf.shape(labels)[0], -1))
        mixed = layer({"images": images, "labels": two_d}, training=True)
        return mixed["images"], tf.reshape(mixed["labels"], tf.shape(labels))

    return apply


def _row_indices(n_rows: int, sampler: EpochSampler | None) -> tf.data.Dataset:
    """Row indices in order, or each epoch's draw of `sampler` (a fresh iterator per epoch)."""
    if sampler is None:
        return tf.data.Dataset.range(n_rows).apply(tf.data.experimental.assert_cardinality(n_rows))
    # A known size matters: Keras opens a fresh iterator (a new epoch's draw) each epoch only on a
    # dataset of known cardinality; the assertion also fails loudly on a short source.
    indices = tf.data.Dataset.from_generator(sampler, output_signature=tf.TensorSpec([None], tf.int64)).unbatch()
    return indices.apply(tf.data.experimental.assert_cardinality(sampler.epoch_size))


def _streamed_batches(
    sources: list[str], labels: np.ndarray | None, image_size: int, batch_size: int, *, sampler: EpochSampler | None, color_constancy: str
) -> tf.data.Dataset:
    """Images read and decoded every epoch, after the rows are drawn: from files and HDF5 by index, from
    TFRecord shards interleaved and shuffled in a bounded buffer (training) or in stored order."""
    y_rows = None if labels is None else tf.constant(np.asarray(labels, np.float32))

    def decode_row(i: tf.Tensor, encoded: tf.Tensor) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        image = decode_image(encoded, image_size, color_constancy)
        return image if y_rows is None else (image, tf.gather(y_rows, i))

    shards = bool(sources) and all(is_shard_source(s) for s in sources)
    if shards and sampler is not None:
        rows = shuffled_shard_records(sources, sampler.masks).map(decode_row, num_parallel_calls=AUTOTUNE)
        return rows.apply(tf.data.experimental.assert_cardinality(sampler.epoch_size)).batch(batch_size)
    if shards:
        images = encoded_images(sources).map(lambda b: decode_image(b, image_size, color_constancy), num_parallel_calls=AUTOTUNE)
        return images.apply(tf.data.experimental.assert_cardinality(len(sources))).batch(batch_size)
    # one map per index: image and label come from the same draw of the (per-epoch) index stream
    read = bytes_reader(sources)
    indices = _row_indices(len(sources), sampler)
    return indices.map(lambda i: decode_row(i, read(i)), num_parallel_calls=AUTOTUNE, deterministic=True).batch(batch_size)


def _cached_batches(store: np.ndarray, labels: np.ndarray | None, indices: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
    """Batches gathered from the decoded uint8 store by row index (labels from the same rows)."""
    y = None if labels is None else np.asarray(labels, dtype=np.float32)
    shape = (None, *store.shape[1:])

    def load(batch: tf.Tensor) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
        out = tf.numpy_function(lambda b: (store[b],) if y is None else (store[b], y[b]), [batch],
                                (tf.uint8,) if y is None else (tf.uint8, tf.float32), stateful=False)
        images = tf.cast(tf.ensure_shape(out[0], shape), tf.float32)
        return images if y is None else (images, tf.ensure_shape(out[1], (None, *y.shape[1:])))

    return indices.batch(batch_size).map(load, num_parallel_calls=AUTOTUNE, deterministic=True)


def image_dataset(
    paths: Sequence[str],
    labels: np.ndarray | None,
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    sampler: EpochSampler | None = None,
    augment: keras.Sequential | None = None,
    mix: str = "none",
    cache: str = "memory",
    seed: int = 0,
    color_constancy: str = "none",
) -> tf.data.Dataset:
    """Batches of `(images, labels)` (or images alone when `labels` is None), float32 RGB in [0, 255].

    Row *indices* are shuffled (`sampler`, or a fresh permutation per epoch with `shuffle=True`) and
    images are read after that, so no buffer holds decoded images. `cache`: "memory" decodes every
    image once into a uint8 array (3 bytes per pixel), "disk" into a uint8 .npy file of that name
    (a path prefix), "none" reads and decodes each epoch's images in parallel (TFRecord shards:
    interleaved and shuffled in a bounded buffer, `cnn.tfrecords.shuffled_shard_records`). `mix` is "none",
    "mixup" or "cutmix". `color_constancy` normalises each image's colours after decoding (COLOR_CONSTANCY).
    """
    sources = list(paths)
    if sampler is None and shuffle:
        sampler = EpochSampler(len(sources), seed)
    if cache == "none":
        ds = _streamed_batches(sources, labels, image_size, batch_size, sampler=sampler, color_constancy=color_constancy)
        return _augmented(ds, labels, augment=augment, mix=mix, seed=seed)
    store = decoded_store(sources, image_size, None if cache == "memory" else f"{cache}.npy", color_constancy)
    return array_dataset(store, labels, batch_size, sampler=sampler, augment=augment, mix=mix, seed=seed)


def array_dataset(
    images: np.ndarray, labels: np.ndarray | None, batch_size: int, *, sampler: EpochSampler | None = None,
    augment: keras.Sequential | None = None, mix: str = "none", seed: int = 0,
) -> tf.data.Dataset:
    """`image_dataset` over images already decoded (uint8, N x S x S x 3, colour-normalised): the
    memory cache, and what a model is fitted on without files (`cnn.train.fit_fold`).

    >>> images = np.zeros((5, 8, 8, 3), np.uint8)
    >>> [tuple(batch.shape) for batch in array_dataset(images, None, 2)]
    [(2, 8, 8, 3), (2, 8, 8, 3), (1, 8, 8, 3)]
    """
    ds = _cached_batches(images, labels, _row_indices(len(images), sampler), batch_size)
    return _augmented(ds, labels, augment=augment, mix=mix, seed=seed)


def _augmented(ds: tf.data.Dataset, labels: np.ndarray | None, *, augment: keras.Sequential | None, mix: str, seed: int) -> tf.data.Dataset:
    """Batches with the training-time augmentation and mixing (`mix` needs labels), prefetched."""
    if augment is not None:
        if labels is None:
            ds = ds.map(lambda x: augment(x, training=True), num_parallel_calls=AUTOTUNE)
        else:
            ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=AUTOTUNE)
    if MIXES[mix] is not None and labels is not None:
        ds = ds.map(mix_batches(mix, seed), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)


def named_image_batches(sources: list[str], image_size: int, batch_size: int, color_constancy: str = "none") -> Iterator[tf.Tensor]:
    """Decoded, resized image batches; an image that cannot be read is named instead of a TensorFlow trace.

    A handful of images (one batch or less, as a triage service scores one patient) is decoded
    eagerly with the same `decode_image`: building a tf.data pipeline costs more than they do.
    """
    if 0 < len(sources) <= batch_size and not any(is_shard_source(s) for s in sources):
        with ImageBytesReader() as reader:
            try:
                yield tf.stack([decode_image(reader.read(source), image_size, color_constancy) for source in sources])
            except (OSError, tf.errors.OpError) as error:
                unreadable = first_undecodable(sources, image_size) or sources[0]
                raise DataError(f"{unreadable}: cannot be read or decoded as an image; replace the file or leave it out.") from error
        return
    batches = iter(image_dataset(sources, None, image_size, batch_size, cache="none", color_constancy=color_constancy))
    done = 0
    while True:
        try:
            images = next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as error:
            unreadable = first_undecodable(sources[done:], image_size)
            if unreadable is None:
                raise
            raise DataError(f"{unreadable}: cannot be read or decoded as an image; replace the file or leave it out.") from error
        done += len(images)
        yield images


def predict_tta(model: keras.Model, images: tf.data.Dataset | tf.Tensor, views: Sequence[str] = ("none", "hflip", "vflip")) -> np.ndarray:
    """Mean of the model's outputs (N, n_outputs) over the named test-time views of each image.

    The one test-time augmentation of the pipeline: `images` is a dataset of batches (a fold model's
    OOF and test predictions in training) or one batch tensor (new patients scored with a bundle: every
    view in one call, padded by `padded_batch`).
    """
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise OptionError(f"unknown TTA view(s) {unknown}; known: {sorted(TTA_VIEWS)}.")
    if isinstance(images, tf.data.Dataset):
        predictions = [model.predict(images.map(TTA_VIEWS[view], num_parallel_calls=AUTOTUNE), verbose=0) for view in views]
        return np.mean(predictions, axis=0)
    n_images = int(images.shape[0])
    every_view = tf.concat([TTA_VIEWS[view](images) for view in views], axis=0)
    outputs = model.predict_on_batch(padded_batch(every_view))[: n_images * len(views)]
    return np.asarray(outputs).reshape(len(views), n_images, -1).mean(axis=0)


def padded_batch(images: tf.Tensor) -> tf.Tensor:
    """The batch padded with zero images to the next power of two: a service scoring one patient's few
    lesions at a time then meets a handful of batch shapes, each traced once per model, instead of
    TensorFlow retracing every model for every new lesion count (each image's output is unchanged).

    >>> tuple(padded_batch(tf.zeros((3, 2, 2, 3))).shape)
    (4, 2, 2, 3)
    """
    n_images = int(images.shape[0])
    size = 1 << max(n_images - 1, 0).bit_length()
    return images if size == n_images else tf.concat([images, tf.zeros([size - n_images, *images.shape[1:]], images.dtype)], axis=0)
