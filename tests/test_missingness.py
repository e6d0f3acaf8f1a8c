"""Missingness patterns: masked copies of the training rows, per-pattern calibration and fallback."""

import numpy as np
import pandas as pd
import pytest

from evaluation.metrics import expected_calibration_error
from fusion.missingness import (
    METADATA_FIELDS,
    MIN_PATTERN_MELANOMAS,
    PATTERNS,
    PatternCalibration,
    PlattCalibration,
    masked_copies,
    missingness_pattern,
    pattern_sources,
)
from fusion.shift import alert_rate_warning, missing_rate_warnings, shift_warnings


def _rows(n_patients: int = 30, lesions: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_patients * lesions
    return pd.DataFrame(
        {
            "image_id": pd.Series([f"img{i}" for i in range(n)], dtype="string"),
            "patient_id": pd.Series([f"p{i // lesions}" for i in range(n)], dtype="string"),
            "age": rng.integers(20, 80, n).astype(float),
            "sex": pd.Categorical(rng.choice(["female", "male"], n)),
            "site": pd.Categorical(rng.choice(["torso", "head/neck"], n)),
        }
    )


def test_masked_copies_reach_every_pattern_and_keep_the_rows_as_given_first() -> None:
    rows = _rows()
    copies = {c.design: c for c in masked_copies(rows, seed=1)}
    assert set(copies) == set(PATTERNS)
    pd.testing.assert_frame_equal(copies["complete"].rows, rows)
    for design, copy in copies.items():
        assert (copy.pattern == design).all(), design  # complete rows: every copy lands on the pattern it was built for
        assert copy.rows["image_id"].equals(rows["image_id"])
    blanked = copies["partial"].rows[list(METADATA_FIELDS)].isna().sum(axis=1)
    assert blanked.between(1, 2).all() and set(blanked) == {1, 2}
    assert copies["no_metadata"].rows[list(METADATA_FIELDS)].isna().all().all()
    assert (copies["no_metadata+single_lesion"].rows["patient_id"] == rows["image_id"]).all()
    again = {c.design: c for c in masked_copies(rows, seed=1)}
    pd.testing.assert_frame_equal(again["partial"].rows, copies["partial"].rows)  # seeded


def test_one_lesion_per_patient_makes_no_single_lesion_copies() -> None:
    rows = _rows(lesions=1)
    copies = masked_copies(rows)
    assert [c.design for c in copies] == ["complete", "partial", "no_metadata"]
    assert all(c.pattern.str.endswith("+single_lesion").all() for c in copies)


def test_a_pattern_without_enough_melanomas_borrows_along_its_fallback_chain() -> None:
    # one lesion per patient (HAM10000): no multi-lesion pattern exists
    pattern = pd.Series(["complete+single_lesion"] * 40 + ["no_metadata+single_lesion"] * 40 + ["partial+single_lesion"] * 40)
    target = pd.Series(([1] * MIN_PATTERN_MELANOMAS + [0] * (40 - MIN_PATTERN_MELANOMAS)) * 3)
    sources = pattern_sources(pattern, target)
    assert sources["complete"] == "complete+single_lesion" and sources["no_metadata"] == "no_metadata+single_lesion"
    # a set without metadata: only the no-metadata rows have melanomas
    sources = pattern_sources(pd.Series(["no_metadata+single_lesion"] * 40), pd.Series([1] * 20 + [0] * 20))
    assert set(sources.values()) == {"no_metadata+single_lesion"}


def test_platt_calibration_repairs_overconfident_scores_and_keeps_their_order() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.02, 0.6, 4000)
    y = (rng.random(4000) < truth).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth))))
    calibrated = PlattCalibration.fit(overconfident, y).apply(overconfident)
    assert expected_calibration_error(y, calibrated) < 0.03 < expected_calibration_error(y, overconfident)
    assert (np.argsort(calibrated, kind="stable") == np.argsort(overconfident, kind="stable")).all()


def test_cross_fitted_calibration_never_sees_the_labels_of_the_fold_it_calibrates() -> None:
    rng = np.random.default_rng(1)
    n = 600
    scores, folds = rng.random(n), np.repeat([0, 1, 2], n // 3)
    pattern = np.array(["complete+single_lesion"] * n)
    y = (rng.random(n) < scores).astype(int)
    flipped = y.copy()
    flipped[folds == 0] = 1 - flipped[folds == 0]
    original = PatternCalibration.fit(scores, y, folds, pattern).apply(scores, pattern, folds)
    changed = PatternCalibration.fit(scores, flipped, folds, pattern).apply(scores, pattern, folds)
    np.testing.assert_array_equal(original[folds == 0], changed[folds == 0])
    assert not np.allclose(original[folds == 1], changed[folds == 1])


def test_missingness_pattern_counts_patients_and_fields() -> None:
    rows = _rows(n_patients=2, lesions=2).astype({"age": float})
    rows.loc[0, "age"] = np.nan
    rows.loc[2, ["age", "sex", "site"]] = np.nan
    rows.loc[3, "patient_id"] = "alone"
    assert missingness_pattern(rows).tolist() == ["partial", "complete", "no_metadata+single_lesion", "complete+single_lesion"]


def test_shift_checks_need_a_batch_and_a_difference_that_matters() -> None:
    reference = {"contrast": {"mean": 30.0, "std": 10.0}}
    assert shift_warnings(reference, {"contrast": np.full(19, 90.0)}) == []  # too few images to judge
    assert len(shift_warnings(reference, {"contrast": np.full(20, 90.0)})) == 1
    assert shift_warnings(reference, {"contrast": np.full(10_000, 32.0)}) == []  # significant but negligible
    [missing] = missing_rate_warnings({"age": 0.0, "sex": 0.1}, pd.DataFrame({"age": [np.nan] * 25, "sex": ["male"] * 25}))
    assert "age 100% (training 0%)" in missing and "sex" not in missing
    assert alert_rate_warning(np.ones(50), np.full(50, 0.2)) and not alert_rate_warning(np.r_[np.ones(10), np.zeros(40)], np.full(50, 0.2))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_names_are_their_own_source_when_they_have_melanomas(pattern: str) -> None:
    sources = pattern_sources(pd.Series([pattern] * 30), pd.Series([1] * MIN_PATTERN_MELANOMAS + [0] * (30 - MIN_PATTERN_MELANOMAS)))
    assert sources[pattern] == pattern


def test_a_pattern_the_stack_ranks_worse_than_a_cnn_is_scored_by_that_cnn() -> None:
    """With its inputs masked the stack may rank below one of its own CNNs; that pattern then uses the CNN (never worse on OOF)."""
    from fusion.missingness import PatternCalibration

    rng = np.random.default_rng(0)
    n = 600
    target = (rng.random(n) < 0.2).astype(int)
    good_cnn = target * 1.5 + rng.normal(0, 1, n)  # standardised log-odds that rank well
    pattern = np.where(np.arange(n) % 2 == 0, "complete", "no_metadata+single_lesion")
    stack = np.where(pattern == "complete", 1 / (1 + np.exp(-(3 * target + rng.normal(0, 1, n)))), rng.random(n))  # noise when masked
    folds = np.arange(n) % 3
    calibration = PatternCalibration.fit(stack, target, folds, pattern, alternatives={"cnn_small": good_cnn})
    assert calibration.scorers["complete"] == "stack" and calibration.scorers["no_metadata+single_lesion"] == "cnn_small"
    chosen = calibration.chosen_scores(stack, pattern, {"cnn_small": good_cnn})
    masked = pattern == "no_metadata+single_lesion"
    np.testing.assert_allclose(chosen[masked], 1 / (1 + np.exp(-good_cnn[masked])))
    np.testing.assert_array_equal(chosen[~masked], stack[~masked])
    restored = PatternCalibration.from_json(calibration.to_json())  # what a bundle carries
    np.testing.assert_allclose(restored.apply(chosen, pattern), calibration.apply(chosen, pattern))
    with pytest.raises(ValueError, match="pass that CNN score"):
        calibration.chosen_scores(stack, pattern)
