"""What a CNN is trained to predict: melanoma vs rest, or the unified diagnosis.

The 2020 winners trained diagnosis heads for a binary task: the other classes teach the network
what melanoma is *not*. Either way the stage's output is the melanoma probability (the MEL column
of a diagnosis head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import keras
import numpy as np
import pandas as pd

from cnn.options import TARGET_CHOICES
from errors import DataError, OptionError
from metadata.schema import DIAGNOSES

# --loss: (binary head, multi-class head) -> the Keras loss, given the label smoothing.
LOSSES: dict[str, tuple[Callable[..., keras.losses.Loss], Callable[..., keras.losses.Loss]]] = {
    "bce": (keras.losses.BinaryCrossentropy, keras.losses.CategoricalCrossentropy),
    "focal": (partial(keras.losses.BinaryFocalCrossentropy, gamma=2.0), partial(keras.losses.CategoricalFocalCrossentropy, gamma=2.0)),  # Lin et al. 2017
}
# --class-weight: the power of 1 / class count a class is weighted by (None: no weights). balanced: every
# class gets the same total weight; sqrt: a milder correction that keeps the common benign classes
# (melanoma's confounders) in view.
CLASS_WEIGHT_POWERS: dict[str, float | None] = {"balanced": 1.0, "sqrt": 0.5, "none": None}


@dataclass(frozen=True)
class TargetSpec:
    """The head's classes: `("MEL",)` is one sigmoid output; otherwise a softmax over diagnoses."""

    classes: tuple[str, ...]

    @property
    def multiclass(self) -> bool:
        return len(self.classes) > 1

    @property
    def n_outputs(self) -> int:
        return len(self.classes)

    def labels(self, rows: pd.DataFrame) -> np.ndarray:
        """Training labels: 0/1 melanoma, or one-hot diagnoses in `classes` order."""
        if not self.multiclass:
            return rows["target"].to_numpy(dtype=np.float32)
        codes = pd.Categorical(rows["diagnosis"].astype("string"), categories=list(self.classes)).codes
        return np.eye(len(self.classes), dtype=np.float32)[codes]

    def melanoma_prob(self, outputs: np.ndarray) -> np.ndarray:
        """The melanoma probability from the head's outputs (N, n_outputs)."""
        return np.asarray(outputs)[:, self.classes.index("MEL")]

    def class_weight(self, labels: np.ndarray, kind: str = "balanced") -> dict[int, float] | None:
        """Per-class loss weights, mean 1 over the training rows (`CLASS_WEIGHT_POWERS`; none: plain cross-entropy)."""
        if kind not in CLASS_WEIGHT_POWERS:
            raise OptionError(f"--class-weight {kind!r}: choose one of {tuple(CLASS_WEIGHT_POWERS)}.")
        power = CLASS_WEIGHT_POWERS[kind]
        if power is None:
            return None
        counts = self.class_counts(labels)
        raw = 1.0 / np.maximum(counts, 1) ** power
        weights = np.where(counts > 0, raw * counts.sum() / (raw * counts).sum(), 0.0)
        return {i: float(w) for i, w in enumerate(weights)}

    def class_counts(self, labels: np.ndarray) -> np.ndarray:
        """Training rows per class (negatives and positives for a binary head)."""
        index = labels.argmax(axis=1) if self.multiclass else labels.astype(int)
        return np.bincount(index, minlength=max(2, self.n_outputs)).astype(float)

    def training_prior(self, labels: np.ndarray, kind: str = "balanced") -> np.ndarray:
        """The class distribution the head is fitted to: training frequencies times class weights."""
        counts = self.class_counts(labels)
        weights = self.class_weight(labels, kind)
        if weights is not None:
            counts *= np.array([weights[i] for i in range(self.n_outputs)])
        return counts / counts.sum()

    def loss(self, kind: str, label_smoothing: float) -> keras.losses.Loss:
        """Cross-entropy or focal loss (Lin et al. 2017, gamma 2) for this head."""
        if kind not in LOSSES:
            raise OptionError(f"--loss {kind!r}: choose one of {tuple(LOSSES)}.")
        binary, categorical = LOSSES[kind]
        return (categorical if self.multiclass else binary)(label_smoothing=label_smoothing)


def resolve_target(target: str, train: pd.DataFrame) -> TargetSpec:
    """`mel`, `diagnosis`, or `auto`: diagnosis when every training row has one and 3+ occur."""
    if target not in TARGET_CHOICES:
        raise OptionError(f"--target {target!r}: choose one of {TARGET_CHOICES}.")
    diagnosis = train["diagnosis"].astype("string")
    present = tuple(code for code in DIAGNOSES if (diagnosis == code).any())
    usable = diagnosis.notna().all() and len(present) >= 3 and "MEL" in present
    if target == "diagnosis" and not usable:
        missing = int(diagnosis.isna().sum())
        raise DataError(
            f"--target diagnosis needs a diagnosis on every training row and at least 3 classes incl. MEL; "
            f"found {missing} row(s) without one and classes {list(present)}. Use --target mel."
        )
    return TargetSpec(present if target == "diagnosis" or (target == "auto" and usable) else ("MEL",))
