import math

import numpy as np
import pandas as pd
import pytest

from errors import UserError
from fusion.patient_context import check_feature_columns, metadata_features, patient_context_features
from fusion.stacker import build_stack_features


def test_patient_context_by_hand() -> None:
    patients = pd.Series(["a", "a", "a", "b"])
    scores = pd.DataFrame({"cnn_x": [0.1, 0.2, 0.6, 0.5]})
    ctx = patient_context_features(patients, scores)
    assert list(ctx["patient_n_lesions"]) == [3, 3, 3, 1]
    mean_a, std_a = 0.3, float(np.std([0.1, 0.2, 0.6], ddof=1))
    assert ctx["cnn_x_patient_diff"].tolist() == pytest.approx([0.1 - mean_a, 0.2 - mean_a, 0.6 - mean_a, 0.0])
    assert ctx["cnn_x_patient_z"][:3].tolist() == pytest.approx([(v - mean_a) / std_a for v in (0.1, 0.2, 0.6)])
    assert math.isnan(ctx["cnn_x_patient_z"][3])  # one lesion: no spread, left missing
    assert ctx["cnn_x_patient_rank"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


def test_metadata_keeps_missing_values_missing() -> None:
    table = pd.DataFrame({"age": [40.0, np.nan], "sex": ["male", None], "site": [None, "torso"]})
    features = metadata_features(table)
    assert features["age"].isna().tolist() == [False, True]
    assert features["sex"].isna().tolist() == [False, True]
    assert features["site"].isna().tolist() == [True, False]
    assert "torso" in features["site"].cat.categories


def test_stack_features_never_read_the_label() -> None:
    rows = pd.DataFrame(
        {"image_id": ["i1", "i2", "i3"], "patient_id": ["a", "a", "b"], "age": [30.0, 30.0, 70.0], "sex": ["male", "male", "female"],
         "site": ["torso", "head/neck", None], "target": [0, 1, 0]}
    )
    probs = pd.DataFrame({"cnn_x": [0.2, 0.7, 0.4]})
    with_label = build_stack_features(rows, probs)
    flipped = build_stack_features(rows.assign(target=[1, 0, 1]), probs)
    without = build_stack_features(rows.drop(columns="target"), probs)
    pd.testing.assert_frame_equal(with_label, flipped)
    pd.testing.assert_frame_equal(with_label, without)
    assert "target" not in with_label.columns


@pytest.mark.parametrize("column", ["target", "diagnosis", "benign_malignant", "diagnosis_confirm_type"])
def test_denied_columns_are_refused(column: str) -> None:
    with pytest.raises(UserError, match="label-derived"):
        check_feature_columns(["age", column])


def test_patient_metadata_context_by_hand() -> None:
    from fusion.patient_context import patient_metadata_context

    table = pd.DataFrame(
        {"image_id": ["i1", "i2", "i3", "i4"], "patient_id": ["a", "a", "a", "b"],
         "site": ["torso", "torso", "head/neck", None], "age": [40.0, 45.0, np.nan, 60.0]}
    )
    ctx = patient_metadata_context(table)
    assert ctx["patient_n_sites"].tolist() == [2, 2, 2, 1]
    assert ctx["patient_site_share"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1.0])
    assert ctx["age_above_patient_min"].tolist()[:2] == [0.0, 5.0] and math.isnan(ctx["age_above_patient_min"][2])
    assert ctx["patient_age_span"].tolist() == [5.0, 5.0, 5.0, 0.0]


def test_fold_models_are_put_on_one_scale() -> None:
    from fusion.cnn_scores import CnnScales, logit

    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    # Fold 1's model is twice as confident and shifted: same ranking, other calibration.
    oof = pd.DataFrame({"fold": [0] * 100 + [1] * 100, "prob": 1 / (1 + np.exp(-np.r_[base[:100], 2 * base[100:] + 1]))})
    fitted = CnnScales.fit({"small": oof})
    scales = fitted.by_cnn["small"]
    z = fitted.oof_scores({"small": oof})["cnn_small"].to_numpy()
    for fold in (0, 1):
        assert z[oof["fold"] == fold].mean() == pytest.approx(0, abs=1e-9)
        assert z[oof["fold"] == fold].std(ddof=1) == pytest.approx(1)
    test = pd.DataFrame({"prob_fold0": [0.2, 0.7], "prob_fold1": [0.4, 0.9]})
    expected = np.mean(
        [(logit(test[f"prob_fold{f}"]) - scales.loc[f, "mean"]) / scales.loc[f, "std"] for f in (0, 1)], axis=0
    )
    np.testing.assert_allclose(fitted.scores({"small": test})["cnn_small"], expected)
    np.testing.assert_array_equal(CnnScales.from_json(fitted.to_json()).scores({"small": test}), fitted.scores({"small": test}))  # stored exactly
