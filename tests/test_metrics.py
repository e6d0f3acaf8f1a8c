import time

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation.metrics import (
    METRICS,
    average_precision,
    bootstrap_ci,
    bootstrap_cis,
    bootstrap_samples,
    bootstrap_values,
    bootstrap_weights,
    brier_score,
    calibration_bins,
    expected_calibration_error,
    multiclass_summary,
    paired_bootstrap,
    pauc_above_tpr,
    per_fold,
    prior_adjusted_argmax,
    roc_auc,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
    top_n_sensitivity,
)


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


# ---- operating points, precision, calibration: hand-worked cases --------------------------------------------


def test_sensitivity_and_specificity_at_operating_points() -> None:
    # Scores descending: 0.9 (mel), 0.6 (benign), 0.5 (mel), 0.3, 0.2, 0.1 (benign).
    y = np.array([0, 0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.9])
    assert sensitivity_at_specificity(y, s, 0.90) == pytest.approx(0.5)  # only the 0.9 threshold keeps FPR 0
    assert specificity_at_sensitivity(y, s, 0.90) == pytest.approx(0.75)  # both melanomas cost one false positive
    assert specificity_at_sensitivity(y, s, 0.50) == pytest.approx(1.0)
    assert np.isnan(sensitivity_at_specificity(np.ones(3), np.arange(3), 0.9))


def test_specificity_exactly_at_the_target_counts() -> None:
    """One false positive in ten negatives is exactly 90% specificity (not lost to 1 - 0.9 = 0.0999...)."""
    y = np.array([0] * 10 + [1, 1])
    s = np.array([0.95] + [0.1] * 9 + [0.9, 0.8])
    assert sensitivity_at_specificity(y, s, 0.90) == pytest.approx(1.0)
    assert sensitivity_at_specificity(y, s, 0.95) == pytest.approx(0.0)
    assert METRICS["sens_at_90spec"](y, s) == sensitivity_at_specificity(y, s, 0.90)


def test_average_precision_brier_and_ece_by_hand() -> None:
    # Ranked: mel (precision 1), benign, mel (precision 2/3): AP = (1 + 2/3) / 2.
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(5 / 6)
    assert brier_score(np.array([0, 1]), np.array([0.2, 0.6])) == pytest.approx((0.04 + 0.16) / 2)
    # Bin [0, 0.1): mean 0.05, observed 1/2 (gap 0.45); bin [0.9, 1]: mean 0.975, observed 1 (gap 0.025).
    y, p = np.array([0, 1, 1, 1]), np.array([0.05, 0.05, 0.95, 1.0])
    assert expected_calibration_error(y, p) == pytest.approx((2 * 0.45 + 2 * 0.025) / 4)
    bins = calibration_bins(y, p)
    assert list(bins.index) == [0, 9] and bins["n"].tolist() == [2, 2]  # p = 1.0 falls in the last bin
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def _official_top_n_sensitivity(y: np.ndarray, s: np.ndarray, patients: np.ndarray, n: int = 15) -> float:
    """The ISIC 2024 secondary-prize ranking score, following the official script's steps: keep patients
    with a malignancy, give each malignancy 1 / (its patient's malignancies), sum those found among each
    patient's `nlargest(n)` scores, divide by the number of patients."""
    frame = pd.DataFrame({"patient": patients, "target": y, "score": s})
    per_patient = frame.groupby("patient")["target"].transform("sum")
    frame = frame[per_patient > 0].assign(fraction=lambda f: f["target"] / f.groupby("patient")["target"].transform("sum"))
    top = frame.groupby("patient", group_keys=False)[["patient", "target", "score", "fraction"]].apply(
        lambda rows: rows.nlargest(n, "score")
    )
    return float(top["fraction"].sum() / frame["patient"].nunique())


def test_top_n_sensitivity_by_hand_and_against_the_official_steps() -> None:
    # Patient A: 20 lesions, melanomas ranked 1st and 17th -> 1/2; patient B: 3 lesions, its melanoma found -> 1;
    # patient C has no melanoma and does not count.
    y = np.array([1] + [0] * 15 + [1] + [0] * 3 + [1, 0, 0] + [0, 0])
    s = np.array([0.99] + list(np.linspace(0.9, 0.5, 15)) + [0.4] + [0.3] * 3 + [0.1, 0.2, 0.3] + [0.5, 0.5])
    patients = np.array(["A"] * 20 + ["B"] * 3 + ["C"] * 2)
    assert top_n_sensitivity(y, s, patients) == pytest.approx(0.75)
    rng = np.random.default_rng(3)
    patients = rng.integers(0, 40, 2000)
    y = (rng.random(2000) < 0.05).astype(int)
    s = np.round(rng.random(2000) + 0.3 * y, 2)  # rounded: ties inside the top 15
    assert top_n_sensitivity(y, s, patients) == pytest.approx(_official_top_n_sensitivity(y, s, patients))


def test_multiclass_summary_by_hand() -> None:
    classes = ["MEL", "NV", "BKL"]
    truth = np.array(["MEL", "MEL", "NV", "NV", "NV", "BKL"])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    summary = multiclass_summary(truth, probs, classes)
    assert summary["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert summary["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert summary["class_auc"]["BKL"] == pytest.approx(1.0)
    assert summary["class_auc"]["MEL"] == pytest.approx(roc_auc_score(truth == "MEL", probs[:, 0]))


def test_prior_adjusted_decision_recovers_the_rare_classes() -> None:
    classes = ["MEL", "NV"]
    truth = np.array(["MEL", "NV", "NV", "NV"])
    probs = np.array([[0.4, 0.6], [0.1, 0.9], [0.15, 0.85], [0.05, 0.95]])
    prior = np.array([0.2, 0.8])  # the head was fitted to 20% melanoma: 0.4 / 0.2 beats 0.6 / 0.8
    assert prior_adjusted_argmax(probs, prior).tolist() == [0, 1, 1, 1]
    summary = multiclass_summary(truth, probs, classes, prior)
    assert summary["decision"] == "prior_adjusted" and summary["balanced_accuracy"] == pytest.approx(1.0)
    assert summary["balanced_accuracy_argmax"] == pytest.approx(0.5)
    assert summary["confusion_matrix"] == [[1, 0], [0, 3]]
    per_row = np.tile(prior, (4, 1))
    assert multiclass_summary(truth, probs, classes, per_row)["balanced_accuracy"] == pytest.approx(1.0)
    assert multiclass_summary(truth, probs, classes)["decision"] == "argmax"


def test_prior_adjustment_raises_balanced_accuracy_of_a_calibrated_imbalanced_model() -> None:
    rng = np.random.default_rng(5)
    prior = np.array([0.05, 0.75, 0.2])
    truth_index = rng.choice(3, 20_000, p=prior)
    features = rng.normal(size=(20_000, 3)) + 1.2 * np.eye(3)[truth_index]
    likelihood = np.exp(1.2 * features)  # exact class likelihood ratios of this Gaussian model
    probs = likelihood * prior / (likelihood * prior).sum(axis=1, keepdims=True)  # calibrated posteriors
    classes = ["MEL", "NV", "BKL"]
    summary = multiclass_summary(np.array(classes)[truth_index], probs, classes, prior)
    assert summary["balanced_accuracy"] > summary["balanced_accuracy_argmax"] + 0.1


# ---- the official ISIC scorer (isic-challenge-scoring, dev extra) as reference -----------------------------


def _random_binary(seed: int, n: int = 600, n_pos: int = 37) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype=int)
    y[rng.choice(n, n_pos, replace=False)] = 1  # 37 melanomas: TPR never lands exactly on 0.8
    return y, rng.normal(size=n) + 1.3 * y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_match_the_official_isic_scorer(seed: int) -> None:
    scorer = pytest.importorskip("isic_challenge_scoring.metrics", reason="isic-challenge-scoring is in the dev extra")
    y, s = _random_binary(seed)
    truth, prediction, weights = pd.Series(y, dtype=float), pd.Series(s), pd.Series(np.ones(len(y)))
    assert roc_auc(y, s) == pytest.approx(scorer.auc(truth, prediction, weights))
    assert average_precision(y, s) == pytest.approx(scorer.average_precision(truth, prediction, weights))
    # The scorer's "AUC above 80% sensitivity" is the whole area under the curve right of where it reaches
    # TPR 0.8; ISIC 2024's pAUC is the part above the line TPR = 0.8, i.e. less the 0.8-high rectangle.
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    fpr_at_80 = np.interp(0.8, tpr, fpr)
    with_rectangle = scorer.auc_above_sensitivity(truth, prediction, weights, 0.8)
    assert pauc_above_tpr(y, s) == pytest.approx(with_rectangle - 0.8 * (1 - fpr_at_80), abs=1e-12)


def test_multiclass_metrics_match_the_official_isic_scorer() -> None:
    scorer = pytest.importorskip("isic_challenge_scoring.metrics", reason="isic-challenge-scoring is in the dev extra")
    rng = np.random.default_rng(4)
    classes = ["MEL", "NV", "BCC", "AK"]
    truth = rng.choice(classes, 500, p=[0.2, 0.5, 0.2, 0.1])
    logits = rng.normal(size=(500, 4)) + 1.5 * (truth[:, None] == np.array(classes))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    truth_table = pd.DataFrame((truth[:, None] == np.array(classes)).astype(float), columns=classes)
    prediction_table = pd.DataFrame(probs, columns=classes)
    weights = pd.Series(np.ones(500))
    summary = multiclass_summary(truth, probs, classes)
    assert summary["balanced_accuracy"] == pytest.approx(
        scorer.balanced_multiclass_accuracy(truth_table, prediction_table, weights)
    )
    for i, c in enumerate(classes):
        assert summary["class_auc"][c] == pytest.approx(scorer.auc(truth_table[c], prediction_table[c], weights))


# ---- bootstrap ------------------------------------------------------------------------------------------


def _tied_cohort(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    patients = rng.integers(0, 60, n)
    y = (rng.random(n) < 0.15).astype(int)
    return y, np.round(rng.normal(size=n) + y, 1), patients  # rounded to 0.1: many ties


def test_bootstrap_weights_and_samples_are_the_same_patient_resamples() -> None:
    y, _, patients = _tied_cohort(0)
    weights = np.vstack(list(bootstrap_weights(len(y), patients, n_boot=250, seed=5)))
    samples = bootstrap_samples(len(y), patients, n_boot=250, seed=5)
    assert weights.shape == (250, len(y))
    for counts, rows in zip(weights, samples):
        np.testing.assert_array_equal(counts, np.bincount(rows, minlength=len(y)))
    # Whole patients: every lesion of a patient is drawn equally often, and a resample has as many
    # patient draws as there are patients.
    first_rows = pd.Series(np.arange(len(y))).groupby(patients).first().to_numpy()
    draws = weights[:, first_rows]
    np.testing.assert_array_equal(weights, draws[:, pd.factorize(pd.Series(patients), sort=True)[0]])
    assert (draws.sum(axis=1) == len(first_rows)).all()


@pytest.mark.parametrize("metric", [roc_auc, pauc_above_tpr])
def test_vectorised_bootstrap_equals_scoring_each_resample(metric) -> None:
    y, s, patients = _tied_cohort(1)
    values = bootstrap_values(metric, y, s, patients, n_boot=120, seed=2)
    reference = np.array([metric(y[rows], s[rows]) for rows in bootstrap_samples(len(y), patients, 120, seed=2)])
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-12)


def test_bootstrap_ci_skips_resamples_without_both_classes() -> None:
    y = np.array([0] * 12 + [1])
    s = np.linspace(0, 1, 13)
    values = bootstrap_values(roc_auc, y, s, n_boot=200, seed=0)
    assert np.isnan(values).any() and np.isfinite(values).any()  # about a third of resamples miss the melanoma
    low, high = bootstrap_ci(roc_auc, y, s, n_boot=200, seed=0)
    assert low == high == 1.0


def test_bootstrap_cis_contain_the_estimate_and_share_resamples() -> None:
    y, s = _random_binary(5)
    patients = np.arange(len(y)) // 4
    intervals = bootstrap_cis({"auc": roc_auc, "pauc": pauc_above_tpr, "ap": average_precision}, y, s, patients, n_boot=200, seed=3)
    assert intervals["auc"] == bootstrap_ci(roc_auc, y, s, patients, n_boot=200, seed=3)
    assert intervals["ap"] == bootstrap_ci(average_precision, y, s, patients, n_boot=200, seed=3)
    for name, metric in (("auc", roc_auc), ("pauc", pauc_above_tpr), ("ap", average_precision)):
        low, high = intervals[name]
        assert low < metric(y, s) < high


def test_patient_resampling_widens_the_interval_when_lesions_are_correlated() -> None:
    """Scores shared within a patient carry less information than as many independent images."""
    rng = np.random.default_rng(6)
    patients = np.repeat(np.arange(60), 10)
    patient_label = rng.random(60) < 0.3
    y = np.repeat(patient_label, 10).astype(int)
    s = np.repeat(rng.normal(size=60) + patient_label, 10) + 0.1 * rng.normal(size=600)
    by_image = np.diff(bootstrap_ci(roc_auc, y, s, None, n_boot=500, seed=0))[0]
    by_patient = np.diff(bootstrap_ci(roc_auc, y, s, patients, n_boot=500, seed=0))[0]
    assert by_patient > 2 * by_image


def test_paired_bootstrap() -> None:
    y, s = _random_binary(7)
    patients = np.arange(len(y)) // 3
    noise = np.random.default_rng(8).normal(size=len(y))
    same = paired_bootstrap(roc_auc, y, s, s.copy(), groups=patients, n_boot=300)
    assert same.difference == 0 and same.p_value == 1.0
    better = paired_bootstrap(roc_auc, y, s, s + 3 * noise, groups=patients, n_boot=300)
    assert better.difference == pytest.approx(roc_auc(y, s) - roc_auc(y, s + 3 * noise))
    assert better.ci[0] > 0 and better.p_value < 0.01
    worse = paired_bootstrap(roc_auc, y, s + 3 * noise, s, groups=patients, n_boot=300)
    assert worse.difference == pytest.approx(-better.difference) and worse.p_value == better.p_value


def test_bootstrap_of_a_large_run_takes_seconds() -> None:
    rng = np.random.default_rng(9)
    y = (rng.random(6000) < 0.05).astype(int)
    s, patients = rng.normal(size=6000) + y, rng.integers(0, 1500, 6000)
    started = time.perf_counter()
    bootstrap_cis({"auc": roc_auc, "pauc": pauc_above_tpr}, y, s, patients, n_boot=1000)
    assert time.perf_counter() - started < 10  # about 0.2 s on 2 CPU cores


def test_auc_standard_error_matches_hanley_mcneil_and_shrinks_with_more_cases() -> None:
    from evaluation.metrics import auc_standard_error

    # By hand: Q1 = 0.9/1.1, Q2 = 1.62/1.9; var = (0.09 + 49 (Q1 - 0.81) + 49 (Q2 - 0.81)) / 2500 = 0.00103194.
    assert auc_standard_error(0.9, 50, 50) == pytest.approx(0.0321239, abs=1e-6)
    assert auc_standard_error(0.9, 500, 500) < auc_standard_error(0.9, 50, 50)
    assert auc_standard_error(1.0, 10, 10) == 0.0
