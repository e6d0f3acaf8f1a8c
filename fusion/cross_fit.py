"""One model per fold, each fitted on the other folds: the loop every stacker of the run shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import pandas as pd

Model = TypeVar("Model")


@dataclass
class CrossFit(Generic[Model]):
    """Out-of-fold scores, fold-averaged test scores, the fold models (in fold order) and the OOF
    scores of every extra frame scored alongside (name -> one score per row). A model that scores a
    row with a vector (class probabilities) gives one such row per row."""

    oof: np.ndarray
    test: np.ndarray
    models: list[Model]
    extra_oof: dict[str, np.ndarray] = field(default_factory=dict)


def cross_fit(
    fit: Callable[[np.ndarray, int], Model],
    predict: Callable[[Model, pd.DataFrame], np.ndarray],
    features: pd.DataFrame,
    folds: np.ndarray,
    *,
    test_features: pd.DataFrame,
    also_score: dict[str, pd.DataFrame] | None = None,
) -> CrossFit[Model]:
    """`fit(training_rows, fold)` (a boolean mask over `features`) per fold; each fold model scores its
    held-out rows of `features` and of every frame in `also_score` (the same rows, other inputs), and
    the test rows; test scores are the mean over the fold models.

    >>> X = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0]})
    >>> result = cross_fit(lambda rows, fold: X["x"][rows].mean(), lambda mean, f: f["x"].to_numpy() - mean,
    ...                    X, np.array([0, 0, 1, 1]), test_features=X.iloc[:1])
    >>> result.oof.tolist(), result.test.tolist()
    ([-2.5, -1.5, 1.5, 2.5], [-1.5])
    """
    also_score = also_score or {}
    folds = np.asarray(folds)
    oof: np.ndarray | None = None
    extra_oof: dict[str, np.ndarray] = {}
    test_scores, models = [], []
    for fold in np.unique(folds):
        held_out = folds == fold
        model = fit(~held_out, int(fold))
        scores = np.asarray(predict(model, features[held_out]))
        if oof is None:  # shaped by the first fold's scores: one value, or one vector, per row
            oof = np.full((len(features), *scores.shape[1:]), np.nan)
            extra_oof = {name: np.full_like(oof, np.nan) for name in also_score}
        oof[held_out] = scores
        for name, frame in also_score.items():
            extra_oof[name][held_out] = predict(model, frame[held_out])
        if len(test_features):
            test_scores.append(predict(model, test_features))
        models.append(model)
    if oof is None:  # no rows, no folds
        oof = np.full(len(features), np.nan)
    test = np.mean(test_scores, axis=0) if test_scores else np.empty((0, *oof.shape[1:]))
    return CrossFit(oof=oof, test=test, models=models, extra_oof=extra_oof)
