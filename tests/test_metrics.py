import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from ensemble.metrics import METRICS, pauc_above_tpr, per_fold, roc_auc


def _pauc_by_integration(y: np.ndarray, s: np.ndarray, min_tpr: float = 0.8) -> float:
    """Reference: area between the ROC curve and the line TPR = min_tpr, over the FPR axis."""
    fpr, tpr, _ = roc_curve(y, s)
    grid = np.linspace(0, 1, 200_001)
    tpr_on_grid = np.interp(grid, fpr, tpr)
    return float(np.trapezoid(np.clip(tpr_on_grid - min_tpr, 0, None), grid))


def test_auc_matches_sklearn_and_is_nan_with_one_class() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.random(500) + 0.3 * y
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert np.isnan(roc_auc(np.zeros(5), np.arange(5)))


def test_pauc_hand_worked_cases() -> None:
    y = np.array([0, 0, 1, 1])
    assert pauc_above_tpr(y, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.2)  # perfect
    assert pauc_above_tpr(y, np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.0)  # reversed
    # One positive ranked below both negatives: TPR stays 0.5 until FPR = 1, so nothing above 0.8.
    assert pauc_above_tpr(y, np.array([0.3, 0.4, 0.2, 0.9])) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pauc_matches_direct_integration(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + 1.2 * y
    assert pauc_above_tpr(y, s) == pytest.approx(_pauc_by_integration(y, s), abs=2e-4)
    assert 0.0 <= pauc_above_tpr(y, s) <= 0.2


def test_per_fold_and_registry() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])
    s = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.7])
    folds = np.array([0, 0, 1, 1, 2, 2])
    assert per_fold(roc_auc, y, s, folds) == [1.0, 1.0, 0.0]
    assert set(METRICS) >= {"auc", "pauc_80tpr"}
