"""Self-supervised pretraining of a backbone on unlabelled images (`python cli.py pretrain`): SimCLR.

Dermoscopy foundation models get their edge from pretraining on images without labels; here any
image the user has can teach a backbone of the registry: every image of every `--data` folder
(any layout, HDF5 entries, a run's TFRecord shards; test images too; labels ignored) is seen as
two augmented views, and the backbone with a small projection head learns to tell each image's
pair from the batch's other views (NT-Xent, `keras_cv.losses.SimCLRLoss`). The head is then thrown
away and the backbone written to BACKBONE/ (`rundir.layout.BackboneLayout`), with a record of what it
was pretrained on; `train-cnns --weights BACKBONE` fine-tunes from it (`cnn.backbones.PretrainedBackbone`).

Images are read as `train-cnns` reads them (one decode, the same colour constancy; cached within
the budget, streamed beyond it), and each epoch is checkpointed like a training pair: weights,
optimizer and RNG states, so a killed call resumes where it stopped and, with `--deterministic`
on a CPU, ends where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_cv
import tensorflow as tf
from keras import layers, ops

from cnn.backbones import feature_extractor
from cnn.options import PretrainConfig
from cnn.pipeline import EpochSampler, build_augmenter, choose_cache, image_dataset
from cnn.tfrecords import folder_sources, is_shard_source
from cnn.train import load_epoch_state, random_state_variables, save_epoch_state
from errors import OptionError, RunStateError
from metadata.sources import DataSource
from rundir.io import atomic_write, read_json, write_json
from rundir.layout import CHECKPOINT_STATE, BackboneLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainImages:
    """The image sources of every `--data`, and how many each gave."""

    sources: list[str]
    counts: list[dict[str, object]]


def pretraining_images(data: list[DataSource]) -> PretrainImages:
    """Every image of each source (train and test rows, labels ignored), or every record of a TFRecord shards folder."""
    sources: list[str] = []
    counts = []
    for source in data:
        shards = folder_sources(source.data)
        if shards is None:
            loaded = source.load()
            found, layout = loaded.table["image_path"].dropna().astype(str).tolist(), loaded.format_name
        else:
            found, layout = shards, "tfrecords"
        sources += found
        counts.append({**source.to_json(), "format": layout, "images": len(found)})
    if not sources:
        raise OptionError("pretrain: the --data folders hold no images.")
    if len({is_shard_source(s) for s in sources}) > 1:
        raise OptionError("pretrain: give TFRecord shard folders or image folders in one call, not both (shards are read in their stored order).")
    return PretrainImages(sources, counts)


class PairedViewsLoss(keras.losses.Loss):
    """SimCLR's NT-Xent (`keras_cv.losses.SimCLRLoss`) on a model output that holds the two views'
    projections side by side; the label is a placeholder."""

    def __init__(self, temperature: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.temperature = temperature
        self.nt_xent = keras_cv.losses.SimCLRLoss(temperature)

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        first, second = ops.split(y_pred, 2, axis=-1)
        return self.nt_xent.call(first, second)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


def contrastive_model(config: PretrainConfig) -> tuple[keras.Model, keras.Model]:
    """Two views in, their projections side by side out (one encoder, one projection head, shared); and
    the backbone inside, which is what pretraining keeps."""
    inputs, pooled, backbone = feature_extractor(config.backbone, config.image_size)
    encoder = keras.Model(inputs, pooled, name="encoder")
    head = keras.Sequential([layers.Dense(pooled.shape[-1], activation="relu"), layers.Dense(config.projection_dim)], name="projection")
    views = [keras.Input((config.image_size, config.image_size, 3), name=f"view_{k}") for k in ("a", "b")]
    projections = layers.Concatenate(dtype="float32", name="projections")([head(encoder(view)) for view in views])
    return keras.Model(views, projections, name=f"{config.backbone}_simclr"), backbone


def view_pairs(images: tf.data.Dataset, augmenter: keras.Sequential) -> tf.data.Dataset:
    """Each batch as two independently augmented views, with a placeholder label per image."""

    def views(batch: tf.Tensor) -> tuple[tuple[tf.Tensor, tf.Tensor], tf.Tensor]:
        return (augmenter(batch, training=True), augmenter(batch, training=True)), tf.zeros((tf.shape(batch)[0], 1))

    return images.map(views, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


@dataclass
class PretrainInputs:
    """The view pairs of every epoch, and what they are drawn from."""

    pairs: tf.data.Dataset
    sampler: EpochSampler
    augmenter: keras.Sequential
    steps: int
    cache_reason: str


def pretrain_inputs(images: PretrainImages, config: PretrainConfig, layout: BackboneLayout) -> PretrainInputs:
    """Images decoded as `train-cnns` decodes them (cached within the budget, else streamed), drawn afresh each epoch."""
    shards = is_shard_source(images.sources[0])
    mode, reason = choose_cache(config.cache, len(images.sources), config.image_size, config.cache_budget_gb, shards=shards)
    if mode == "disk":
        layout.cache.mkdir(parents=True, exist_ok=True)
    sampler = EpochSampler(len(images.sources), config.seed)
    decoded = image_dataset(
        images.sources, None, config.image_size, config.batch_size, sampler=sampler, color_constancy=config.color_constancy,
        cache=str(layout.cache / "images") if mode == "disk" else mode,
    )
    augmenter = build_augmenter(config.seed, config.augment)
    return PretrainInputs(view_pairs(decoded, augmenter), sampler, augmenter, math.ceil(sampler.epoch_size / config.batch_size), reason)


class PretrainCheckpoint(keras.callbacks.Callback):
    """After each epoch: the loss in the log, and what resuming needs in BACKBONE/checkpoint."""

    def __init__(self, layout: BackboneLayout, rng: list, *, config: PretrainConfig, losses: list[float], seconds: float) -> None:
        super().__init__()
        self.layout, self.rng, self.config = layout, rng, config
        self.losses, self.seconds_before, self.started = list(losses), seconds, time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.losses.append(float((logs or {})["loss"]))
        state = {"epochs_done": epoch + 1, "loss": self.losses, "config": asdict(self.config), "seconds": self.seconds}
        save_epoch_state(self.layout.checkpoint, self.model, self.rng, state=state, keep=(epoch + 1,))
        log.info("pretrain %s:%d epoch %d/%d: contrastive loss %.4f", self.config.backbone, self.config.image_size, epoch + 1, self.config.epochs, self.losses[-1])


RESUMABLE_CHANGES = frozenset({"cache", "cache_budget_gb", "deterministic"})  # how images are held, not what is learnt


def _trained_state(recipe: dict) -> dict:
    """The options of a recipe that shape the weights (JSON-normalised), to compare a checkpoint's with a call's."""
    return {k: v for k, v in json.loads(json.dumps(recipe)).items() if k not in RESUMABLE_CHANGES}


def _resumed_state(layout: BackboneLayout, model: keras.Model, rng: list, config: PretrainConfig) -> dict:
    """The last epoch checkpoint loaded into `model` and `rng` (its state), or a fresh start's."""
    state = read_json(layout.checkpoint / CHECKPOINT_STATE)
    if state is None:
        return {"epochs_done": 0, "loss": [], "seconds": 0.0}
    if _trained_state(state["config"]) != _trained_state(asdict(config)):
        raise RunStateError(f"{layout.checkpoint} was written by a pretrain call with other options ({state['config']}); re-run with those, or delete {layout.root}.")
    load_epoch_state(layout.checkpoint, model, rng, state["epochs_done"])
    return state


def pretrain_backbone(data: list[DataSource], config: PretrainConfig, *, out: Path) -> dict:
    """Pretrain `config.backbone` on every image of `data` into `out` (BACKBONE/); returns its record.

    A finished BACKBONE of the same recipe and images is left as it is; an unfinished one resumes.
    """
    layout = BackboneLayout(out)
    images = pretraining_images(data)
    finished = read_json(layout.record)
    if finished is not None:
        if _trained_state(finished["recipe"]) == _trained_state(asdict(config)) and finished["pretrained_on"] == images.counts:
            return finished
        raise RunStateError(f"{layout.record}: {out} holds a backbone pretrained with another recipe or images; give a new --out, or delete {out}.")
    keras.utils.set_random_seed(config.seed)
    tf.random.set_global_generator(tf.random.Generator.from_seed(config.seed))  # keras-cv layers draw from it (see cnn.train)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    inputs = pretrain_inputs(images, config, layout)
    log.info("pretrain: %d images (%s)", len(images.sources), inputs.cache_reason)
    model, backbone = contrastive_model(config)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate * 0.1, decay_steps=max(1, inputs.steps * (config.epochs - 1)), warmup_target=config.learning_rate, warmup_steps=inputs.steps,
    )
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay), loss=PairedViewsLoss(config.temperature))
    rng = random_state_variables(model, inputs.augmenter)
    resumed = _resumed_state(layout, model, rng, config)
    inputs.sampler.epoch = resumed["epochs_done"]  # epoch e draws what an uninterrupted call's epoch e drew
    checkpoint = PretrainCheckpoint(layout, rng, config=config, losses=resumed["loss"], seconds=resumed["seconds"])
    model.fit(
        inputs.pairs, epochs=config.epochs, initial_epoch=resumed["epochs_done"], steps_per_epoch=inputs.steps, shuffle=False, callbacks=[checkpoint], verbose=0,
    )
    return _write_backbone(layout, backbone, config=config, images=images, checkpoint=checkpoint)


def _write_backbone(layout: BackboneLayout, backbone: keras.Model, *, config: PretrainConfig, images: PretrainImages, checkpoint: PretrainCheckpoint) -> dict:
    """BACKBONE/backbone.weights.h5, then its record (last: a backbone folder is whole or unfinished); the checkpoint and cache go."""
    atomic_write(layout.weights, backbone.save_weights)
    record = {
        "backbone": config.backbone,
        "image_size": config.image_size,
        "objective": f"SimCLR (NT-Xent, temperature {config.temperature}), two '{config.augment}' views per image",
        "recipe": asdict(config),
        "pretrained_on": images.counts,
        "images": len(images.sources),
        "loss": checkpoint.losses,
        "seconds": round(checkpoint.seconds, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
    }
    write_json(record, layout.record)
    for folder in (layout.checkpoint, layout.cache):
        shutil.rmtree(folder, ignore_errors=True)
    return record
