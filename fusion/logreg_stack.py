"""Logistic-regression stack: the linear baseline the LightGBM stack has to beat, on the same features and folds.

If a linear model on the same inputs scores as well as the boosted trees, the trees add nothing but
variance; Kaggle CV notebooks keep such a baseline next to every stacker for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer, make_column_selector
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

from fusion.cross_fit import cross_fit


def _as_text(categories: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns as text with missing as its own level (the encoder needs one dtype)."""
    return categories.astype("string").fillna("missing").astype(object)


def logreg_pipeline(c: float = 1.0, max_iter: int = 2000) -> Pipeline:
    """Median-impute (plus a missing-indicator) and standardise numbers, one-hot categories, then L2 logistic regression."""
    # keep_empty_features: a column missing in every training row (the patient z-score when each patient has one
    # lesion) becomes a constant instead of being dropped with a warning per fold.
    numeric = make_pipeline(SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True), StandardScaler())
    as_text = FunctionTransformer(_as_text, feature_names_out="one-to-one")
    categorical = make_pipeline(as_text, OneHotEncoder(handle_unknown="ignore"))
    features = ColumnTransformer(
        [
            ("numeric", numeric, make_column_selector(dtype_exclude="category")),  # every other column: none is dropped
            ("categorical", categorical, make_column_selector(dtype_include="category")),
        ]
    )
    return Pipeline([("features", features), ("model", LogisticRegression(C=c, max_iter=max_iter))])


@dataclass
class LogregStackResult:
    """Out-of-fold and fold-averaged test probabilities of the logistic-regression stack."""

    oof_probs: np.ndarray
    test_probs: np.ndarray


def cross_val_logreg(
    train_features: pd.DataFrame, target: np.ndarray, folds: np.ndarray, test_features: pd.DataFrame
) -> LogregStackResult:
    """One pipeline per fold, fitted on the other folds (imputation and scaling learnt there too)."""
    target = np.asarray(target)
    result = cross_fit(
        lambda rows, fold: logreg_pipeline().fit(train_features[rows], target[rows]),
        lambda model, features: model.predict_proba(features)[:, 1],
        train_features, folds, test_features=test_features,
    )
    return LogregStackResult(oof_probs=result.oof, test_probs=result.test)
