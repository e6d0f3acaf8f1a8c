"""Train every (backbone, fold) pair and write out-of-fold and fold-averaged test probabilities.

Run-directory layout written here:

    RUN/cnn/<model>/fold<k>/model.keras     best-epoch model of fold k
    RUN/cnn/<model>/fold<k>/history.json    per-epoch loss and validation AUC, best epoch
    RUN/cnn/<model>/fold<k>/oof.parquet     held-out fold's probabilities
    RUN/cnn/<model>/fold<k>/test.parquet    test probabilities of this fold's model
    RUN/cnn/<model>/fold<k>/done.json       written last: the pair is finished
    RUN/cnn/<model>/oof.parquet             image_id, patient_id, fold, target, prob
    RUN/cnn/<model>/test.parquet            image_id, patient_id, prob (mean over folds), prob_fold<k>

A finished pair (its `done.json` exists) is skipped when the command is re-run.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cnn.backbones import build_classifier
from cnn.pipeline import build_augmenter, image_dataset, predict_tta
from cnn.targets import TargetSpec, resolve_target
from ensemble.metrics import roc_auc
from metadata.folds import attach_folds
from metadata.io import read_table, write_json, write_table


@dataclass(frozen=True)
class CnnConfig:
    """Training recipe shared by every (model, fold) pair of a `train-cnns` call."""

    image_size: int = 64  # default; each model of a run may have its own (see `parse_model_specs`)
    epochs: int = 5
    batch_size: int = 32
    weights: str = "none"
    learning_rate: float = 2e-3
    seed: int = 0
    tta: tuple[str, ...] = ("none", "hflip", "vflip")
    target: str = "auto"
    loss: str = "bce"
    label_smoothing: float = 0.0
    augment: str = "light"
    mix: str = "none"
    cache: str = "memory"  # memory | disk | none
    deterministic: bool = False  # TensorFlow op determinism: identical OOF on CPU for the same seed
    patience: int = 0  # stop after this many epochs without a better validation AUC; 0 = never


def best_epoch(val_aucs: list[float]) -> int:
    """Index of the first epoch with the highest validation AUC (undefined AUCs never win)."""
    scores = np.array([-np.inf if math.isnan(a) else a for a in val_aucs])
    if len(scores) == 0:
        raise ValueError("no epochs to choose from.")
    return int(np.argmax(scores))


def should_stop(val_aucs: list[float], patience: int) -> bool:
    """Early stopping: the best epoch is `patience` or more epochs back (never when patience is 0)."""
    return patience > 0 and len(val_aucs) - 1 - best_epoch(val_aucs) >= patience


class BestEpochByAUC(keras.callbacks.Callback):
    """Score the validation fold after each epoch, stop early if asked, restore the best epoch's weights."""

    def __init__(self, val_images, y_val: np.ndarray, target: TargetSpec, patience: int = 0) -> None:
        super().__init__()
        self.val_images = val_images
        self.y_val = y_val
        self.target = target
        self.patience = patience
        self.val_aucs: list[float] = []
        self.best_weights: list[np.ndarray] | None = None

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
    """Advance a rich progress task per batch and show the epoch and best validation AUC."""

    def __init__(self, progress: Progress, task: int, label: str, best: BestEpochByAUC) -> None:
        super().__init__()
        self.progress, self.task, self.label, self.best = progress, task, label, best

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.progress.advance(self.task)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        aucs = self.best.val_aucs
        best = f"best val AUC {aucs[best_epoch(aucs)]:.3f}" if aucs else ""
        self.progress.update(self.task, description=f"{self.label} epoch {epoch + 1} {best}")


def _probability_columns(outputs: np.ndarray, target: TargetSpec) -> dict[str, np.ndarray]:
    """`prob` (melanoma) and, for a diagnosis head, one `prob_<CLASS>` column per class."""
    columns = {"prob": target.melanoma_prob(outputs)}
    if target.multiclass:
        columns.update({f"prob_{c}": outputs[:, i] for i, c in enumerate(target.classes)})
    return columns


def train_fold(
    model_name: str,
    fold: int,
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    config: CnnConfig,
    target: TargetSpec,
    fold_dir: Path,
    progress: Progress,
) -> None:
    """Train one (model, fold) pair, keep its best epoch, write its OOF and test probabilities."""
    keras.utils.set_random_seed(config.seed + fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    y_train = target.labels(train_rows)
    y_val = val_rows["target"].to_numpy(dtype=np.float32)
    cache_dir = fold_dir / "cache"
    if config.cache == "disk":
        cache_dir.mkdir(exist_ok=True)
    cache = {split: str(cache_dir / split) if config.cache == "disk" else config.cache for split in ("train", "val", "test")}
    datasets = {
        split: image_dataset(rows["image_path"], None, config.image_size, config.batch_size, cache=cache[split])
        for split, rows in (("val", val_rows), ("test", test_rows))
    }
    train_ds = image_dataset(
        train_rows["image_path"], y_train, config.image_size, config.batch_size, shuffle=True,
        augment=build_augmenter(config.seed + fold, config.augment), mix=config.mix, seed=config.seed + fold,
        cache=cache["train"],
    )
    steps = math.ceil(len(train_rows) / config.batch_size)
    model = build_classifier(model_name, config.image_size, config.weights, n_outputs=target.n_outputs)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.1,
        decay_steps=max(1, steps * (config.epochs - 1)),
        warmup_target=config.learning_rate,
        warmup_steps=steps,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
        loss=target.loss(config.loss, config.label_smoothing),
    )
    best = BestEpochByAUC(datasets["val"], y_val, target, config.patience)
    label = f"{model_name} fold {fold}"
    task = progress.add_task(label, total=steps * config.epochs)
    started = time.perf_counter()
    history = model.fit(
        train_ds,
        epochs=config.epochs,
        shuffle=False,  # the tf.data pipeline shuffles
        class_weight=target.class_weight(y_train),
        callbacks=[best, RichBatchProgress(progress, task, label, best)],
        verbose=0,
    )
    model.save(fold_dir / "model.keras")
    oof = val_rows[["image_id", "patient_id", "target"]].assign(
        fold=fold, **_probability_columns(predict_tta(model, datasets["val"], config.tta), target)
    )
    test = test_rows[["image_id", "patient_id"]].copy()
    if len(test_rows):
        test = test.assign(**_probability_columns(predict_tta(model, datasets["test"], config.tta), target))
    else:
        test = test.assign(prob=np.array([], dtype=float))
    write_table(oof, fold_dir / "oof.parquet")
    write_table(test, fold_dir / "test.parquet")
    chosen = best_epoch(best.val_aucs)
    write_json(
        {
            "model": model_name,
            "fold": fold,
            "config": asdict(config),
            "classes": list(target.classes),
            "loss": [float(v) for v in history.history["loss"]],
            "val_auc": best.val_aucs,
            "best_epoch": chosen,
            "best_val_auc": best.val_aucs[chosen],
            "oof_auc_tta": roc_auc(oof["target"].to_numpy(), oof["prob"].to_numpy()),
            "seconds": time.perf_counter() - started,
        },
        fold_dir / "history.json",
    )
    shutil.rmtree(cache_dir, ignore_errors=True)
    write_json({"finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, fold_dir / "done.json")


def assemble_model_outputs(model_dir: Path, folds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate per-fold OOF tables and average per-fold test probabilities."""
    oof = pd.concat([read_table(model_dir / f"fold{f}" / "oof.parquet", "train-cnns") for f in folds])
    tests = [read_table(model_dir / f"fold{f}" / "test.parquet", "train-cnns") for f in folds]
    test = tests[0][["image_id", "patient_id"]].copy()
    for f, frame in zip(folds, tests):
        test[f"prob_fold{f}"] = frame["prob"].to_numpy()
    test["prob"] = test[[f"prob_fold{f}" for f in folds]].mean(axis=1)
    class_columns = [c for c in tests[0].columns if c.startswith("prob_")]
    for column in class_columns:
        test[column] = np.mean([frame[column].to_numpy() for frame in tests], axis=0)
    write_table(oof.reset_index(drop=True), model_dir / "oof.parquet")
    write_table(test, model_dir / "test.parquet")
    return oof, test


def train_cnns(
    table: pd.DataFrame, folds: pd.DataFrame, models: dict[str, int], config: CnnConfig, run_dir: Path
) -> dict[str, float]:
    """Train every model (name -> its image size) on every fold, skipping finished pairs.

    Returns each model's OOF melanoma AUC.
    """
    without_image = table["image_path"].isna()
    if without_image.any():
        raise ValueError(
            f"{int(without_image.sum())} row(s) have no image (first: {table.loc[without_image, 'image_id'].iloc[0]!r}); "
            "metadata-only data cannot train CNNs: run `stack` with zero CNNs instead."
        )
    train = attach_folds(table, folds, str(Path(run_dir) / "folds.parquet"))
    test = table[table["split"] == "test"]
    fold_ids = sorted(int(f) for f in train["fold"].unique())
    aucs: dict[str, float] = {}
    columns = [
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    target = resolve_target(config.target, train)  # once, so every fold's head has the same classes
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    with Progress(*columns) as progress:
        for model_name, image_size in models.items():
            model_config = replace(config, image_size=image_size)
            model_dir = Path(run_dir) / "cnn" / model_name
            for fold in fold_ids:
                fold_dir = model_dir / f"fold{fold}"
                if (fold_dir / "done.json").exists():
                    continue
                held_out = train["fold"] == fold
                train_fold(model_name, fold, train[~held_out], train[held_out], test, model_config, target, fold_dir, progress)
            oof, _ = assemble_model_outputs(model_dir, fold_ids)
            aucs[model_name] = roc_auc(oof["target"].to_numpy(), oof["prob"].to_numpy())
    return aucs
