"""What a CNN is trained to predict: melanoma vs rest, or the unified diagnosis.

The 2020 winners trained diagnosis heads for a binary task: the other classes teach the network
what melanoma is *not*. Either way the stage's output is the melanoma probability (the MEL column
of a diagnosis head).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from cnn.options import LOSS_CHOICES, TARGET_CHOICES
from metadata.schema import DIAGNOSES


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

    def class_weight(self, labels: np.ndarray) -> dict[int, float]:
        """Balanced class weights: every class gets the same total weight (melanoma is rare)."""
        index = labels.argmax(axis=1) if self.multiclass else labels.astype(int)
        counts = np.bincount(index, minlength=max(2, self.n_outputs)).astype(float)
        present = counts > 0
        weights = np.where(present, len(index) / (present.sum() * np.maximum(counts, 1)), 0.0)
        return {i: float(w) for i, w in enumerate(weights)}

    def loss(self, kind: str, label_smoothing: float) -> keras.losses.Loss:
        """Cross-entropy or focal loss (Lin et al. 2017, gamma 2) for this head."""
        if kind not in LOSS_CHOICES:
            raise ValueError(f"--loss {kind!r}: choose one of {LOSS_CHOICES}.")
        if self.multiclass:
            if kind == "focal":
                return keras.losses.CategoricalFocalCrossentropy(gamma=2.0, label_smoothing=label_smoothing)
            return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
        if kind == "focal":
            return keras.losses.BinaryFocalCrossentropy(gamma=2.0, label_smoothing=label_smoothing)
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)


def resolve_target(target: str, train: pd.DataFrame) -> TargetSpec:
    """`mel`, `diagnosis`, or `auto`: diagnosis when every training row has one and 3+ occur."""
    if target not in TARGET_CHOICES:
        raise ValueError(f"--target {target!r}: choose one of {TARGET_CHOICES}.")
    diagnosis = train["diagnosis"].astype("string")
    present = tuple(code for code in DIAGNOSES if (diagnosis == code).any())
    usable = diagnosis.notna().all() and len(present) >= 3 and "MEL" in present
    if target == "diagnosis" and not usable:
        missing = int(diagnosis.isna().sum())
        raise ValueError(
            f"--target diagnosis needs a diagnosis on every training row and at least 3 classes incl. MEL; "
            f"found {missing} row(s) without one and classes {list(present)}. Use --target mel."
        )
    return TargetSpec(present if target == "diagnosis" or (target == "auto" and usable) else ("MEL",))
