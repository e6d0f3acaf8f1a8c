"""What each dermoscopy feature family adds: the stack refitted without it, on the same folds.

The gain of a family is the OOF AUC of the stack with every input minus the stack without that
family; the report puts a paired bootstrap interval on it (`evaluation.metrics.paired_bootstrap`).
Both stacks are the plain LightGBM stack (the rows as given, no masked copies, no calibration), so
the difference is the family's and nothing else's. `features_only` is the stack on the features and
their patient context alone: no CNN, no metadata.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fusion.image_features.stage import FeatureRecipe
from fusion.stacker import build_stack_features, cross_val_stack, image_feature_block

ALL_INPUTS, WITHOUT_IMAGE_FEATURES, FEATURES_ONLY = "all", "without_image_features", "features_only"


def family_gain_scores(
    train: pd.DataFrame, cnn_scores: pd.DataFrame, image_features: pd.DataFrame, recipe: FeatureRecipe, *,
    num_boost_round: int = 300, seed: int = 0,
) -> pd.DataFrame:
    """OOF probability of the stack with all inputs (`prob_all`), without each family
    (`prob_without_<family>`), without any image feature and on the features alone; one row per
    `train` row, with its image id, patient, fold and target for the paired bootstrap."""
    target, folds = train["target"].to_numpy(dtype=int), train["fold"].to_numpy()

    def oof(features: pd.DataFrame) -> np.ndarray:
        increasing = tuple(c for c in cnn_scores.columns if c in features.columns)
        return cross_val_stack(features, target, folds, features.iloc[:0], num_boost_round=num_boost_round, seed=seed, increasing=increasing).oof_probs

    def without(columns: list[str]) -> pd.DataFrame:
        kept = [c for c in image_features.columns if c not in columns]
        return build_stack_features(train, cnn_scores, image_features[kept] if kept else None)

    scores = {ALL_INPUTS: oof(build_stack_features(train, cnn_scores, image_features))}
    scores |= {f"without_{family}": oof(without(recipe.columns(family))) for family in recipe.families}
    scores[WITHOUT_IMAGE_FEATURES] = oof(without(list(image_features.columns)))
    scores[FEATURES_ONLY] = oof(image_feature_block(train, image_features))
    keys = train[["image_id", "patient_id", "fold", "target"]].reset_index(drop=True)
    return keys.assign(**{f"prob_{name}": values for name, values in scores.items()})
