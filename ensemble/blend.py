"""Blends of several models' probabilities (computed when a finished run is read, never stored)."""

from __future__ import annotations

import pandas as pd


def mean_blend(probs: pd.DataFrame) -> pd.Series:
    """Plain mean of the models' probabilities."""
    return probs.mean(axis=1)


def rank_blend(probs: pd.DataFrame) -> pd.Series:
    """Mean of the models' percentile ranks: robust to models with different calibration."""
    return probs.rank(pct=True).mean(axis=1)
