"""Train every (backbone, fold) pair and write out-of-fold and fold-averaged test probabilities.

Run-directory layout written here:

    RUN/cnn/<model>/fold<k>/model.keras     best-epoch model of fold k
    RUN/cnn/<model>/fold<k>/history.json    per-epoch loss and validation AUC, best epoch
    RUN/cnn/<model>/fold<k>/oof.parquet     held-out fold's probabilities
    RUN/cnn/<model>/fold<k>/test.parquet    test probabilities of this fold's model
    RUN/cnn/<model>/fold<k>/done.json       written last: the pair is finished
    RUN/cnn/<model>/oof.parquet             image_id, patient_id, fold, target, prob
    RUN/cnn/<model>/test.parquet            image_id, patient_id, prob (mean over folds), prob_fold<k>

plus the plan, heartbeat, checkpoint and failure files of `cnn/pairs.py`. A finished pair (its
`done.json` exists) is skipped when the command is re-run; an unfinished one resumes from its last
epoch checkpoint (weights, optimizer, RNG states, validation AUCs), so with `--deterministic` on a
CPU a resumed pair ends bit-for-bit where an uninterrupted one would.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cnn.backbones import PretrainedBackbone, build_classifier, member_backbone, parse_model_specs
from cnn.options import CnnConfig
from cnn.outputs import MELANOMA, probability_columns
from cnn.pairs import (
    assemble_model_outputs,
    claimed,
    is_done,
    pair_dir,
    record_failure,
    start_attempt,
    unfinished_pairs,
    write_plan,
)
from cnn.pipeline import EpochSampler, array_dataset, build_augmenter, choose_cache, first_undecodable, image_dataset, predict_tta, training_illuminants
from cnn.targets import TargetSpec, resolve_target
from cnn.tfrecords import is_shard_source, shard_sources
from errors import DataError, OptionError, RunStateError
from evaluation.metrics import metric_text, roc_auc
from metadata.dataset import record_skipped
from metadata.duplicates import fingerprint_images
from metadata.extra_data import EXTRA_FOLD, read_extra_data
from metadata.folds import attach_folds
from rundir.completion import writing
from rundir.io import atomic_write, read_table, write_json, write_table
from rundir.layout import CACHE_DIR, CHECKPOINT_DIR, CHECKPOINT_STATE, DONE_FILE, HISTORY_FILE, MODEL_FILE, OOF_FILE, TEST_FILE, RunLayout

log = logging.getLogger(__name__)


CACHE_WORDS = {"memory": "cached in memory as uint8", "disk": "cached on disk as uint8", "none": "streamed, not cached"}


MEMBER_SEED_STRIDE = 1000  # seed of member `<backbone>_s<k>`: --seed + 1000 k (fold k' adds k'), so no two pairs share one

# Options an attempt may change when it resumes another's checkpoint: none alters the trained state.
RESUMABLE_CHANGES = frozenset({"tta", "cache", "cache_budget_gb", "strategy", "jit", "deterministic"})


def best_epoch(val_aucs: list[float]) -> int:
    """Index of the first epoch with the highest validation AUC (undefined AUCs never win); the last epoch
    when none is defined (validation rows of one class: a fold without a melanoma).

    >>> best_epoch([0.6, float("nan"), 0.7, 0.7]), best_epoch([float("nan")] * 3)
    (2, 2)
    """
    scores = np.array([-np.inf if math.isnan(a) else a for a in val_aucs])
    if len(scores) == 0:
        raise ValueError("no epochs to choose from.")
    return int(np.argmax(scores)) if np.isfinite(scores).any() else len(scores) - 1


def should_stop(val_aucs: list[float], patience: int) -> bool:
    """Early stopping: the best epoch is `patience` or more epochs back (never when patience is 0)."""
    return patience > 0 and len(val_aucs) - 1 - best_epoch(val_aucs) >= patience


class BestEpochByAUC(keras.callbacks.Callback):
    """Score the validation fold after each epoch, stop early if asked, restore the best epoch's weights.

    A resumed fold passes the AUCs and best weights of its earlier epochs.
    """

    def __init__(
        self,
        val_images,
        y_val: np.ndarray,
        target: TargetSpec,
        patience: int = 0,
        *,
        val_aucs: Sequence[float] = (),
        best_weights: list[np.ndarray] | None = None,
    ) -> None:
        super().__init__()
        self.val_images = val_images
        self.y_val = y_val
        self.target = target
        self.patience = patience
        self.val_aucs: list[float] = list(val_aucs)
        self.best_weights = best_weights

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        probs = self.target.melanoma_prob(self.model.predict(self.val_images, verbose=0))
        self.val_aucs.append(roc_auc(self.y_val, probs))
        if best_epoch(self.val_aucs) == epoch:
            self.best_weights = self.model.get_weights()
        self.model.stop_training = should_stop(self.val_aucs, self.patience)
        if logs is not None:
            logs["val_auc"] = self.val_aucs[-1]

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class RichBatchProgress(keras.callbacks.Callback):
    """Advance two rich progress bars per batch, the (model, fold) pair's and the epoch's, each with an ETA."""

    def __init__(self, progress: Progress, pair_task: int, epoch_task: int, label: str) -> None:
        super().__init__()
        self.progress, self.pair_task, self.epoch_task, self.label = progress, pair_task, epoch_task, label
        self.best_auc = -np.inf

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.progress.reset(self.epoch_task, description=f"  epoch {epoch + 1}")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.progress.advance(self.pair_task)
        self.progress.advance(self.epoch_task)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        auc = (logs or {}).get("val_auc", np.nan)  # BestEpochByAUC, which runs first, puts it there
        self.best_auc = max(self.best_auc, auc) if not np.isnan(auc) else self.best_auc
        best = f"best val AUC {self.best_auc:.3f}" if np.isfinite(self.best_auc) else ""
        self.progress.update(self.pair_task, description=f"{self.label} epoch {epoch + 1} {best}")


def random_state_variables(*layers: keras.Layer | None) -> list:
    """Every RNG state training draws from: Keras seed generators (dropout, custom augmentations) and
    keras-cv's `tf.random.Generator`s.

    Saved with each checkpoint, so a resumed fold draws the same dropout masks and augmentations as
    an uninterrupted one. Not reached: the MixUp/CutMix layer of `--mix`, built inside the input pipeline.
    """
    states = []
    for layer in filter(None, layers):
        weights = {id(w) for w in layer.weights}
        states += [v for v in layer.variables if id(v) not in weights]
        for sublayer in getattr(layer, "layers", []):
            states += [a.state for a in vars(sublayer).values() if isinstance(a, tf.random.Generator)]
    return states


class EpochCheckpoint(keras.callbacks.Callback):
    """After each epoch record the loss and (with a `folder`) save what resuming needs: weights +
    optimizer state, RNG states, AUCs, losses.

    Files are per epoch; `state.json`, written last, names the epoch to resume from. The best epoch's
    weights are kept too, since the fold's model is its best epoch, not its last.
    """

    def __init__(
        self, folder: Path | None, label: str, best: BestEpochByAUC, rng: list, *, config: CnnConfig, losses: list[float], seconds: float
    ) -> None:
        super().__init__()
        self.folder, self.label, self.best, self.rng, self.config = folder, label, best, rng, config
        self.losses = list(losses)
        self.seconds_before = seconds
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.losses.append(float((logs or {})["loss"]))
        done, best = epoch + 1, best_epoch(self.best.val_aucs) + 1
        if self.folder is not None:
            self._save(done, best)
        log.info(
            "%s epoch %d/%d: loss %.4f, val AUC %s (best %s, epoch %d)", self.label, done, self.config.epochs,
            self.losses[-1], metric_text(self.best.val_aucs[-1], 4), metric_text(self.best.val_aucs[best - 1], 4), best,
        )

    def _save(self, done: int, best: int) -> None:
        state = {
            "epochs_done": done,
            "best_epochs_done": best,
            "val_auc": self.best.val_aucs,
            "loss": self.losses,
            "config": asdict(self.config),
            "seconds": self.seconds_before + time.perf_counter() - self.started,
        }
        save_epoch_state(self.folder, self.model, self.rng, state=state, keep=(done, best))


def save_epoch_state(folder: Path, model: keras.Model, rng: list, *, state: dict, keep: tuple[int, ...]) -> None:
    """Epoch `state["epochs_done"]`'s weights (optimizer included) and RNG states, then `state.json` naming it
    (written last: a checkpoint is whole or absent); the files of epochs other than `keep` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    done = state["epochs_done"]
    atomic_write(folder / f"epoch{done}.weights.h5", model.save_weights)
    atomic_write(folder / f"epoch{done}.rng.npz", lambda tmp: np.savez(tmp, *[v.numpy() for v in rng]))
    write_json(state, folder / CHECKPOINT_STATE)
    for stale in folder.glob("epoch*"):
        if stale.name.split(".")[0] not in {f"epoch{epoch}" for epoch in keep}:
            stale.unlink(missing_ok=True)


def load_epoch_state(folder: Path, model: keras.Model, rng: list, epoch: int) -> None:
    """Epoch `epoch`'s weights (optimizer included, built first) and RNG states, as `save_epoch_state` left them."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(folder / f"epoch{epoch}.weights.h5")
    with np.load(folder / f"epoch{epoch}.rng.npz") as saved:
        for i, variable in enumerate(rng):
            variable.assign(saved[f"arr_{i}"])


@dataclass(frozen=True)
class Resumed:
    """What a fold's earlier attempts left: its epochs' AUCs and losses, best weights, time spent."""

    val_aucs: list[float]
    losses: list[float]
    best_weights: list[np.ndarray] | None
    seconds: float

    @property
    def epochs_done(self) -> int:
        return len(self.val_aucs)


def changed_options(saved: dict, config: CnnConfig) -> dict:
    """The options (name -> earlier value) a checkpoint's recorded config differs in, other than `RESUMABLE_CHANGES`.

    An option missing from `saved` was added after the checkpoint was written, when its default's
    behaviour was hard-wired: it counts as that default.
    """
    current = json.loads(json.dumps(asdict(config)))
    earlier = {**json.loads(json.dumps(asdict(CnnConfig()))), **saved}
    return {k: earlier[k] for k in current if k not in RESUMABLE_CHANGES and earlier[k] != current[k]}


def restore_checkpoint(folder: Path | None, model: keras.Model, rng: list, config: CnnConfig) -> Resumed:
    """Load the last epoch checkpoint into `model` (optimizer included) and `rng`; nothing when there is none."""
    state_file = None if folder is None else folder / CHECKPOINT_STATE
    if state_file is None or not state_file.exists():
        return Resumed([], [], None, 0.0)
    state = json.loads(state_file.read_text())
    changed = changed_options(state["config"], config)
    if changed:
        earlier = ", ".join(f"{key}={value!r}" for key, value in changed.items())
        raise RunStateError(
            f"{folder} was written with other options ({earlier}); re-run with those, "
            f"or delete {folder} to train this pair from scratch."
        )
    model.optimizer.build(model.trainable_variables)
    model.load_weights(folder / f"epoch{state['best_epochs_done']}.weights.h5")
    best_weights = model.get_weights()
    load_epoch_state(folder, model, rng, state["epochs_done"])
    return Resumed(state["val_auc"], state["loss"], best_weights, state["seconds"])


def _gpus() -> list:
    return tf.config.list_physical_devices("GPU")


def _default_strategy() -> tf.distribute.Strategy:
    return tf.distribute.get_strategy()


def _mirrored_strategy() -> tf.distribute.Strategy:
    if not _gpus():
        log.warning("--strategy mirrored: no GPU here, so it is a no-op (training on the CPU)")
        return _default_strategy()
    return tf.distribute.MirroredStrategy()


def _tpu_strategy() -> tf.distribute.Strategy:
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise OptionError(f"--strategy tpu: no TPU reachable ({error}); run on a TPU VM or set TPU_NAME.") from error
    return tf.distribute.TPUStrategy(resolver)


def _auto_strategy() -> tf.distribute.Strategy:
    return _mirrored_strategy() if len(_gpus()) > 1 else _default_strategy()


# --strategy: auto mirrors over two or more GPUs, else one device; multiworker reads TF_CONFIG.
STRATEGIES: dict[str, Callable[[], tf.distribute.Strategy]] = {
    "auto": _auto_strategy,
    "mirrored": _mirrored_strategy,
    "multiworker": tf.distribute.MultiWorkerMirroredStrategy,
    "tpu": _tpu_strategy,
    "none": _default_strategy,
}


def _has_accelerator() -> bool:
    return bool(_gpus() or tf.config.list_logical_devices("TPU"))


def dtype_policy(mixed_precision: bool) -> str:
    """mixed_bfloat16 on a TPU, mixed_float16 on a GPU; float32 on a CPU, where half precision only slows training."""
    if not mixed_precision:
        return "float32"
    if tf.config.list_logical_devices("TPU"):
        return "mixed_bfloat16"
    if _gpus():
        return "mixed_float16"
    log.warning("--mixed-precision: no GPU or TPU here, so it is a no-op (float32)")
    return "float32"


def jit_compile(jit: bool | None) -> bool | str:
    """Keras's `jit_compile`: XLA as asked, except on a CPU, where --jit is a no-op."""
    if jit and not _has_accelerator():
        log.warning("--jit: no GPU or TPU here, so it is a no-op (XLA stays off)")
        return False
    return "auto" if jit is None else jit


def _probability_columns(outputs: np.ndarray, target: TargetSpec) -> dict[str, np.ndarray]:
    """`prob` (melanoma) and, for a diagnosis head, one `prob_<CLASS>` column per class."""
    return probability_columns(outputs, target.classes, target.melanoma_prob(outputs))


@dataclass
class FoldInputs:
    """The three datasets of one (model, fold) pair, the epoch sampler and how images are cached."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset
    sampler: EpochSampler
    augmenter: keras.Sequential | None
    y_train: np.ndarray
    steps: int  # batches per epoch
    cache_mode: str
    cache_reason: str
    extra_images: dict[str, int] = field(default_factory=dict)  # other datasets' training images (folds --extra-data), by dataset


def fold_inputs(
    model_name: str, fold: int, rows: dict[str, pd.DataFrame], config: CnnConfig, *, target: TargetSpec, fold_dir: Path, progress: Progress
) -> FoldInputs:
    """Datasets for `rows` (train, val, test): cached within the budget or streamed (said in the log and console)."""
    cache_dir = fold_dir / CACHE_DIR
    shutil.rmtree(cache_dir, ignore_errors=True)  # a killed attempt's half-written cache is locked
    all_sources = pd.concat([rows[split]["image_path"] for split in ("train", "val", "test")]).astype(str)
    cache_mode, cache_reason = choose_cache(
        config.cache, len(all_sources), config.image_size, config.cache_budget_gb, shards=all_sources.map(is_shard_source).all()
    )
    log.info("%s fold %d: images %s (%s)", model_name, fold, CACHE_WORDS[cache_mode], cache_reason)
    progress.console.print(f"{model_name} fold {fold}: images {CACHE_WORDS[cache_mode]} ({cache_reason})")
    if cache_mode == "disk":
        cache_dir.mkdir()
    cache = {split: str(cache_dir / split) if cache_mode == "disk" else cache_mode for split in ("train", "val", "test")}
    val, test = (
        image_dataset(rows[split]["image_path"], None, config.image_size, config.batch_size, cache=cache[split], color_constancy=config.color_constancy)
        for split in ("val", "test")
    )
    train_rows, y_train = rows["train"], target.labels(rows["train"])
    illuminants = training_illuminants(train_rows["image_path"].astype(str).tolist(), config.image_size, config.seed + fold) if config.illuminant_augment else None
    augmenter = build_augmenter(config.seed + fold, config.augment, illuminants)
    sampler = EpochSampler(
        len(train_rows), config.seed + fold, patient=train_rows["patient_id"].fillna(train_rows["image_id"]).to_numpy(),
        positive=train_rows["target"].to_numpy() == 1, negatives_per_patient=config.negatives_per_patient,
    )
    train = image_dataset(
        train_rows["image_path"], y_train, config.image_size, config.batch_size, sampler=sampler,
        augment=augmenter, mix=config.mix, seed=config.seed + fold, cache=cache["train"], color_constancy=config.color_constancy,
    )
    steps = math.ceil(sampler.epoch_size / config.batch_size)
    extra = train_rows["extra_data"].value_counts().to_dict() if "extra_data" in train_rows else {}
    return FoldInputs(train, val, test, sampler, augmenter, y_train, steps, cache_mode, cache_reason, extra)


def compiled_model(
    model_name: str, config: CnnConfig, target: TargetSpec, inputs: FoldInputs, *, checkpoint_dir: Path | None, strategy: tf.distribute.Strategy
) -> tuple[keras.Model, list[tf.Variable], Resumed]:
    """The pair's model, compiled (AdamW, warm-up + cosine), with its last epoch checkpoint restored if any."""
    with strategy.scope():
        model = build_classifier(member_backbone(model_name)[0], config.image_size, config.weights, n_outputs=target.n_outputs)
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=config.learning_rate * 0.1,
            decay_steps=max(1, inputs.steps * (config.epochs - 1)),
            warmup_target=config.learning_rate,
            warmup_steps=inputs.steps,
        )
        model.compile(
            optimizer=keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay),
            loss=target.loss(config.loss, config.label_smoothing),
            jit_compile=jit_compile(config.jit),
        )
        rng = random_state_variables(model, inputs.augmenter)
        return model, rng, restore_checkpoint(checkpoint_dir, model, rng, config)


def write_fold_predictions(
    model: keras.Model, fold: int, rows: dict[str, pd.DataFrame], inputs: FoldInputs, *, config: CnnConfig, target: TargetSpec, fold_dir: Path
) -> pd.DataFrame:
    """The best epoch's model, OOF and test probabilities (mean over the TTA views) of one pair; returns the OOF table."""
    atomic_write(fold_dir / MODEL_FILE, model.save)
    oof = rows["val"][["image_id", "patient_id", "target"]].assign(
        fold=fold, **_probability_columns(predict_tta(model, inputs.val, config.tta), target)
    )
    test = rows["test"][["image_id", "patient_id"]].copy()
    if len(test):
        test = test.assign(**_probability_columns(predict_tta(model, inputs.test, config.tta), target))
    else:
        test = test.assign(**{MELANOMA: np.array([], dtype=float)})
    write_table(oof, fold_dir / OOF_FILE)
    write_table(test, fold_dir / TEST_FILE)
    return oof


def array_fold_inputs(
    train_images: np.ndarray, y_train: np.ndarray, val_images: np.ndarray, *, config: CnnConfig, fold: int = 0, test_images: np.ndarray | None = None,
) -> FoldInputs:
    """A fold's inputs from images decoded in memory (uint8, N x S x S x 3 at the recipe's size, colours
    as the recipe normalises them) and the training labels (`TargetSpec.labels`): the recipe's
    augmentation, mixing and epoch sampling, no files."""
    augmenter = build_augmenter(config.seed + fold, config.augment)
    sampler = EpochSampler(len(train_images), config.seed + fold)
    train = array_dataset(train_images, y_train, config.batch_size, sampler=sampler, augment=augmenter, mix=config.mix, seed=config.seed + fold)
    val, test = (array_dataset(images, None, config.batch_size) for images in (val_images, val_images[:0] if test_images is None else test_images))
    return FoldInputs(train, val, test, sampler, augmenter, y_train, math.ceil(sampler.epoch_size / config.batch_size), "memory", "images given in memory")


@dataclass
class FittedFold:
    """A member fitted on one fold: the model at its best epoch, the epochs' validation AUCs and losses,
    what an earlier attempt had done, and this attempt's training speed."""

    model: keras.Model
    best: BestEpochByAUC
    record: EpochCheckpoint
    resumed: Resumed
    images_per_second: float


def fit_fold(
    model_name: str, inputs: FoldInputs, y_val: np.ndarray, *, config: CnnConfig, target: TargetSpec, fold: int = 0,
    strategy: tf.distribute.Strategy | None = None, checkpoint_dir: Path | None = None, progress: Progress | None = None,
) -> FittedFold:
    """Build and fit a member's classifier on a fold's inputs (warm-up + cosine AdamW), keeping its best
    epoch by validation melanoma AUC: the computing core of `train-cnns`, on inputs in memory or
    streamed. With `checkpoint_dir` it resumes from the last epoch saved there and saves each epoch.

    >>> from cnn.targets import TargetSpec
    >>> rng = np.random.default_rng(0)
    >>> images, labels = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), np.array([0.0, 1.0] * 8)
    >>> config = CnnConfig(image_size=32, epochs=1, batch_size=8)
    >>> fitted = fit_fold("small", array_fold_inputs(images, labels, images[:8], config=config), labels[:8], config=config, target=TargetSpec(("MEL",)))
    >>> fitted.model.output_shape, len(fitted.best.val_aucs)
    ((None, 1), 1)
    """
    model, rng, resumed = compiled_model(model_name, config, target, inputs, checkpoint_dir=checkpoint_dir, strategy=strategy or tf.distribute.get_strategy())
    # Epoch e reads the sampler's draw e (Keras opens one iterator per epoch); a resumed run starts
    # drawing where an uninterrupted one would be.
    inputs.sampler.epoch = resumed.epochs_done
    best = BestEpochByAUC(inputs.val, y_val, target, config.patience, val_aucs=resumed.val_aucs, best_weights=resumed.best_weights)
    label = f"{model_name} fold {fold}"
    if resumed.epochs_done:
        log.info("%s: resuming after epoch %d of %d", label, resumed.epochs_done, config.epochs)
    record = EpochCheckpoint(checkpoint_dir, label, best, rng, config=config, losses=resumed.losses, seconds=resumed.seconds)
    callbacks: list[keras.callbacks.Callback] = [best, record]
    if progress is not None:
        pair_task = progress.add_task(label, total=inputs.steps * config.epochs, completed=inputs.steps * resumed.epochs_done)
        epoch_task = progress.add_task("  epoch", total=inputs.steps)
        callbacks.append(RichBatchProgress(progress, pair_task, epoch_task, label))
    last_epoch = resumed.epochs_done if should_stop(resumed.val_aucs, config.patience) else config.epochs
    fit_started = time.perf_counter()
    model.fit(
        inputs.train, epochs=last_epoch, initial_epoch=resumed.epochs_done, steps_per_epoch=inputs.steps,
        shuffle=False,  # the tf.data pipeline shuffles
        class_weight=target.class_weight(inputs.y_train, config.class_weight), callbacks=callbacks, verbose=0,
    )
    images_per_second = inputs.sampler.epoch_size * (last_epoch - resumed.epochs_done) / max(time.perf_counter() - fit_started, 1e-9)
    if progress is not None:
        progress.remove_task(epoch_task)
    return FittedFold(model, best, record, resumed, images_per_second)


def train_fold(
    model_name: str,
    fold: int,
    rows: dict[str, pd.DataFrame],
    config: CnnConfig,
    *,
    target: TargetSpec,
    fold_dir: Path,
    progress: Progress,
    strategy: tf.distribute.Strategy,
) -> None:
    """Train one (model, fold) pair on `rows` (train, val, test): read its images, `fit_fold` (resuming its
    last epoch checkpoint), write its best epoch's model and outputs."""
    keras.utils.set_random_seed(config.seed + fold)
    # keras-cv layers draw from TF's global generator, which op determinism (left on by an earlier
    # --deterministic run in this process) refuses to create implicitly: seed it explicitly.
    tf.random.set_global_generator(tf.random.Generator.from_seed(config.seed + fold))
    inputs = fold_inputs(model_name, fold, rows, config, target=target, fold_dir=fold_dir, progress=progress)
    y_val = rows["val"]["target"].to_numpy(dtype=np.float32)
    if len(np.unique(y_val)) < 2:
        log.warning(
            "%s fold %d: the validation rows are all of one class (a fold without a melanoma), so the validation AUC is "
            "undefined: the last epoch is kept and nothing stops early; `folds` with a smaller --k puts a melanoma in every fold", model_name, fold,
        )
    fitted = fit_fold(
        model_name, inputs, y_val, config=config, target=target, fold=fold, strategy=strategy, checkpoint_dir=fold_dir / CHECKPOINT_DIR, progress=progress,
    )
    oof = write_fold_predictions(fitted.model, fold, rows, inputs, config=config, target=target, fold_dir=fold_dir)
    history = fold_history(model_name, fold, config, target, inputs=inputs, fitted=fitted, oof=oof)
    write_json(history, fold_dir / HISTORY_FILE)
    shutil.rmtree(fold_dir / CACHE_DIR, ignore_errors=True)
    write_json({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, fold_dir / DONE_FILE)
    shutil.rmtree(fold_dir / CHECKPOINT_DIR, ignore_errors=True)
    log.info("%s fold %d done: best val AUC %s at epoch %d", model_name, fold, metric_text(history["best_val_auc"], 4), history["best_epoch"] + 1)


def fold_history(
    model_name: str, fold: int, config: CnnConfig, target: TargetSpec, *, inputs: FoldInputs, fitted: FittedFold, oof: pd.DataFrame,
) -> dict[str, Any]:
    """RUN/cnn/<model>/fold<k>/history.json: the recipe, per-epoch loss and validation AUC, the best epoch, the sampling."""
    best, resumed = fitted.best, fitted.resumed
    chosen = best_epoch(best.val_aucs)
    return {
        "model": model_name,
        "fold": fold,
        "config": asdict(config),
        "classes": list(target.classes),
        # what the prior-adjusted (balanced-accuracy) decision divides by; see evaluation.metrics
        "training_prior": target.training_prior(inputs.y_train, config.class_weight).tolist() if target.multiclass else None,
        "loss": fitted.record.losses,
        "val_auc": best.val_aucs,
        "best_epoch": chosen,
        "best_val_auc": best.val_aucs[chosen],
        "oof_auc_tta": roc_auc(oof["target"].to_numpy(), oof[MELANOMA].to_numpy()),
        "resumed_after_epoch": resumed.epochs_done,
        # the other datasets' images this model trained on (folds --extra-data), by dataset
        "extra_data": {str(k): int(v) for k, v in inputs.extra_images.items()},
        "sampling": {
            "negatives_per_patient": config.negatives_per_patient,
            "images_per_epoch": inputs.sampler.epoch_size,
            "training_images": len(inputs.y_train),
            "cache": inputs.cache_mode,
            "cache_reason": inputs.cache_reason,
            # this attempt's epochs (each with its validation pass) over their wall time
            "images_per_second": fitted.images_per_second,
        },
        "seconds": resumed.seconds + time.perf_counter() - fitted.record.started,
    }


def _unreadable_image_error(rows: pd.DataFrame) -> DataError | None:
    """The user's error behind a TensorFlow failure, when it is an image that cannot be decoded."""
    bad = first_undecodable(list(rows["image_path"].astype(str)))
    if bad is None:
        return None
    image_id = rows.loc[rows["image_path"].astype(str) == bad, "image_id"].iloc[0]
    return DataError(
        f"image {image_id!r} at {bad} cannot be read or decoded (changed since `folds` read it?); replace the file, "
        "or run train-cnns with --on-bad-image skip to leave every such image out of the run (listed in RUN/skipped_images.csv)."
    )


def train_pair(
    model_name: str, fold: int, train: pd.DataFrame, test: pd.DataFrame, *, config: CnnConfig, target: TargetSpec,
    run_dir: Path, progress: Progress, strategy: tf.distribute.Strategy,
) -> None:
    """Train one pair under this job's claim, unless it is done or another live process trains it; record a failure."""
    fold_dir = pair_dir(run_dir, model_name, fold)
    if is_done(run_dir, model_name, fold):
        return
    with claimed(fold_dir, log.warning) as owner:
        if owner is not None:
            log.warning("%s fold %d: skipped, %s is training it", model_name, fold, owner.describe(time.time()))
            return
        if is_done(run_dir, model_name, fold):  # finished by the job that held it until now
            return
        start_attempt(fold_dir)
        held_out = train["fold"] == fold
        rows = {"train": train[~held_out], "val": train[held_out], "test": test}
        try:
            try:
                train_fold(model_name, fold, rows, config, target=target, fold_dir=fold_dir, progress=progress, strategy=strategy)
            except tf.errors.OpError as error:  # most often an image that changed after `folds` read it
                unreadable = _unreadable_image_error(pd.concat(rows.values()))
                if unreadable is None:
                    raise
                raise unreadable from error
        except Exception as error:
            record_failure(fold_dir, error, traceback.format_exc())
            log.error("%s fold %d failed: %s", model_name, fold, error)
            raise


def selected_pairs(models: dict[str, int], fold_ids: list[int], model: str | None, fold: int | None) -> list[tuple[str, int]]:
    """The pairs one call trains: every model on every fold, or those `--model` and/or `--fold` pick."""
    if model is not None and model not in models:
        raise OptionError(f"--model {model!r} is not one of --models ({', '.join(models)}); name one of those.")
    if fold is not None and fold not in fold_ids:
        raise OptionError(f"--fold {fold} is not a fold of this run; folds.parquet has folds {fold_ids}.")
    return [(m, f) for m in models for f in fold_ids if model in (None, m) and fold in (None, f)]


def assemble_finished_models(run_dir: Path, models: dict[str, int], fold_ids: list[int]) -> dict[str, float]:
    """Assemble every model whose folds are all done (pairs may finish in other jobs); return their OOF AUCs."""
    aucs: dict[str, float] = {}
    for model_name in models:
        if all(is_done(run_dir, model_name, fold) for fold in fold_ids):
            with writing(run_dir, f"train-cnns.{model_name}"):  # its OOF and test tables together or not at all
                oof, _ = assemble_model_outputs(run_dir, model_name, fold_ids)
            aucs[model_name] = roc_auc(oof["target"].to_numpy(), oof[MELANOMA].to_numpy())
    return aucs


def with_extra_rows(train: pd.DataFrame, run_dir: Path, target: TargetSpec) -> pd.DataFrame:
    """The run's training rows and the extra datasets' (`folds --extra-data`, in fold `EXTRA_FOLD`: every
    fold's model trains on them, none validates on them); for a diagnosis head only the extra rows of
    its classes (the others are counted in the log)."""
    extra = read_extra_data(run_dir)
    if extra is None:
        return train
    if train["image_path"].astype(str).map(is_shard_source).any():
        raise RunStateError(
            f"{RunLayout(run_dir).shards}: this run reads its images from TFRecord shards, which hold none of its extra data "
            f"({RunLayout(run_dir).extra_data}); delete the shards folder to train on the image files."
        )
    usable = extra["diagnosis"].astype("string").isin(target.classes) if target.multiclass else extra["target"].notna()
    if (~usable).any():
        log.info("extra data: %d row(s) without a class of this run's diagnosis head left out", int((~usable).sum()))
    return pd.concat([train, extra[usable].assign(fold=EXTRA_FOLD)], ignore_index=True)


def train_cnns(
    table: pd.DataFrame,
    folds: pd.DataFrame,
    models: dict[str, int],
    config: CnnConfig,
    *,
    run_dir: Path,
    model: str | None = None,
    fold: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Declare every model (name -> its image size) x fold pair, then train those selected, skipping finished ones.

    Returns the OOF melanoma AUC of each model whose folds are all done. `progress` (e.g.
    `training_progress()`, started) shows a bar per pair and per epoch; without it training is quiet.
    """
    without_image = table["image_path"].isna()
    if without_image.any():
        raise DataError(
            f"{int(without_image.sum())} row(s) have no image (first: {table.loc[without_image, 'image_id'].iloc[0]!r}); "
            "metadata-only data cannot train CNNs: run `stack` with zero CNNs instead."
        )
    train = attach_folds(table, folds, str(RunLayout(run_dir).folds))
    test = table[table["split"] == "test"]
    fold_ids = sorted(int(f) for f in train["fold"].unique())
    target = resolve_target(config.target, train)  # once, from the run's own rows, so every fold's head has the same classes
    train = with_extra_rows(train, run_dir, target)
    pairs = selected_pairs(models, fold_ids, model, fold)
    pretrained = PretrainedBackbone.at(config.weights)
    for name, size in models.items() if pretrained is not None else ():
        pretrained.check_fits(backbone=member_backbone(name)[0], image_size=size)  # before any pair starts
    write_plan(run_dir, models, fold_ids, config.epochs)
    progress = progress or Progress(disable=True)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = STRATEGIES[config.strategy]()
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy(config.mixed_precision))
    try:
        for model_name, fold_id in pairs:
            # a member `<backbone>_s<k>` draws its weights, batches and augmentations from its own seeds
            model_config = replace(config, image_size=models[model_name], seed=config.seed + MEMBER_SEED_STRIDE * member_backbone(model_name)[1])
            train_pair(model_name, fold_id, train, test, config=model_config, target=target, run_dir=run_dir, progress=progress, strategy=strategy)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return assemble_finished_models(run_dir, models, fold_ids)


@dataclass(frozen=True)
class TrainingOutcome:
    """What a `train-cnns` call did: OOF AUC of each model now complete, where images came from, what is left."""

    aucs: dict[str, float]
    shards: Path | None  # the TFRecord shards read instead of the image files, if the run has them
    unfinished: list[tuple[str, int]]  # declared (model, fold) pairs still to train (other jobs' or failed)
    skipped: int = 0  # unreadable images left out of the run now (--on-bad-image skip)


def training_progress() -> Progress:
    """The progress display `train_cnns` fills: a bar per (model, fold) pair and one for the current epoch."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    )


def train_run_cnns(
    table: pd.DataFrame, run_dir: Path, models: str, config: CnnConfig, *, model: str | None = None, fold: int | None = None,
    progress: Progress | None = None, on_bad_image: str = "raise",
) -> TrainingOutcome:
    """The `train-cnns` stage on the run's folds: `models` as on the command line (`small:64,efficientnet_b0:128`);
    images from the run's TFRecord shards when it has them. With `on_bad_image="skip"` every image is
    decoded once first and the unreadable ones are left out of the run (RUN/skipped_images.csv);
    otherwise an unreadable image stops training, named."""
    specs = parse_model_specs(models, config.image_size)
    skipped = 0
    if on_bad_image == "skip":
        _, unreadable = fingerprint_images(list(table["image_id"]), list(table["image_path"].astype(str)), on_error="skip")
        if unreadable:
            record_skipped(run_dir, pd.DataFrame(unreadable, columns=["image_id", "reason"]))
            table, skipped = table[~table["image_id"].isin([i for i, _ in unreadable])], len(unreadable)
    sharded = shard_sources(table, run_dir)
    layout = RunLayout(run_dir)
    aucs = train_cnns(table if sharded is None else sharded, read_table(layout.folds, "folds"), specs, config, run_dir=run_dir, model=model, fold=fold, progress=progress)
    return TrainingOutcome(aucs, None if sharded is None else layout.shards, unfinished_pairs(run_dir), skipped)
