"""The differential-diagnosis stack: one multinomial logistic regression per fold over the CNNs'
class scores, metadata, patient context and the dermoscopy features.

A diagnosis-head CNN sees only pixels; age, site and the lesion's measured colour, shape and texture
tell the classes apart too (keratoses in the old, vascular lesions by their red), so the stack's
balanced accuracy can pass the CNNs'. It is linear because the classes that balanced accuracy
weighs as much as the others are the rare ones (60 dermatofibromas, 80 vascular lesions in
HAM10000): on HAM10000's 5 folds with one `small:64` CNN and the dermoscopy features, it reached
0.670 against 0.641 for a multi-class LightGBM on the same inputs (L2 strength C=0.1, the best of
0.03-1.0, all of which gave 0.660-0.670). It is fitted when every training row has a diagnosis and
3 or more classes occur (the rule of `--target auto`), on the rows as given, on the same folds and
with the same leakage rules as the melanoma stack. Its probabilities follow the training folds'
class mix; the balanced-accuracy decision divides them by that mix (`prior_<CLASS>`, per fold
model), as it does a diagnosis-head CNN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from cnn.outputs import MELANOMA, class_column
from cnn.targets import resolve_target
from errors import DataError
from fusion.cross_fit import cross_fit
from fusion.logreg_stack import logreg_pipeline

DIAGNOSIS_STACK_C = 0.1  # L2 strength of the logistic regression (see above)


def diagnosis_classes(train: pd.DataFrame) -> tuple[str, ...] | None:
    """The classes of the training rows' diagnoses when a diagnosis stack can be fitted, else None."""
    if "diagnosis" not in train:
        return None
    spec = resolve_target("auto", train)
    return spec.classes if spec.multiclass else None


@dataclass
class DiagnosisStack:
    """OOF and fold-averaged test class probabilities (columns: `classes`), and each fold model's training class mix."""

    classes: tuple[str, ...]
    oof_probs: np.ndarray
    test_probs: np.ndarray
    fold_priors: dict[int, np.ndarray]


def cross_val_diagnosis_stack(
    features: pd.DataFrame, diagnosis: pd.Series, classes: tuple[str, ...], folds: np.ndarray, *, test_features: pd.DataFrame,
    c: float = DIAGNOSIS_STACK_C,
) -> DiagnosisStack:
    """Fit one multinomial logistic regression per fold on the other folds' rows (imputation and
    scaling learnt there too); score the held-out fold and the test rows.

    A class absent from a fold's training rows gets probability 0 from that fold model.

    >>> rng = np.random.default_rng(0)
    >>> labels = pd.Series(rng.choice(["MEL", "NV", "BKL"], 300))
    >>> X = pd.DataFrame({"cue": labels.map({"MEL": 0.0, "NV": 1.0, "BKL": 2.0}) + rng.normal(0, 0.3, 300)})
    >>> stack = cross_val_diagnosis_stack(X, labels, ("MEL", "NV", "BKL"), np.arange(300) % 3, test_features=X.iloc[:0])
    >>> stack.oof_probs.shape, bool(np.allclose(stack.oof_probs.sum(axis=1), 1.0))
    ((300, 3), True)
    >>> float((np.array(["MEL", "NV", "BKL"])[stack.oof_probs.argmax(axis=1)] == labels).mean()) > 0.9
    True
    """
    codes = pd.Categorical(diagnosis.astype("string"), categories=list(classes)).codes
    if (codes < 0).any():
        raise DataError(f"the diagnosis stack needs one of {list(classes)} on every training row; found {diagnosis[codes < 0].iloc[0]!r}.")
    fold_priors = {}

    def fit(rows: np.ndarray, fold: int) -> Pipeline:
        fold_priors[fold] = np.bincount(codes[rows], minlength=len(classes)) / rows.sum()  # an absent class: 0, and probability 0
        return logreg_pipeline(c).fit(features[rows], codes[rows])

    def predict(model: Pipeline, frame: pd.DataFrame) -> np.ndarray:
        probs = np.zeros((len(frame), len(classes)))
        probs[:, model.classes_] = model.predict_proba(frame)
        return probs

    result = cross_fit(fit, predict, features, folds, test_features=test_features)
    return DiagnosisStack(tuple(classes), result.oof, result.test, fold_priors)


def diagnosis_tables(labelled: pd.DataFrame, unlabelled: pd.DataFrame, stack: DiagnosisStack) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The OOF and test tables of a diagnosis stack: the key columns given, `prob` (melanoma),
    `prob_<CLASS>` and the `prior_<CLASS>` the balanced-accuracy decision divides by (the test rows':
    the fold models' mean, as their probabilities are)."""
    prob_columns = [class_column(c) for c in stack.classes]
    prior_columns = [f"prior_{c}" for c in stack.classes]

    def table(keys: pd.DataFrame, probs: np.ndarray, priors: np.ndarray) -> pd.DataFrame:
        frame = pd.concat([keys.reset_index(drop=True), pd.DataFrame(probs, columns=prob_columns), pd.DataFrame(priors, columns=prior_columns)], axis=1)
        return frame.assign(**{MELANOMA: frame[class_column("MEL")]})

    oof_priors = np.stack([stack.fold_priors[int(f)] for f in labelled["fold"]])
    test_prior = np.mean(list(stack.fold_priors.values()), axis=0)
    return table(labelled, stack.oof_probs, oof_priors), table(unlabelled, stack.test_probs, np.tile(test_prior, (len(unlabelled), 1)))
