"""The dermoscopy feature stage: documented values on hand-drawn lesions, the stage's files, resuming,
the stack's third input family and its gain, and identical features in `features` and `predict`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import draw
from typer.testing import CliRunner

from cli import app
from fusion.image_features import stage as feature_stage
from fusion.image_features.families import FEATURE_FAMILIES, family_columns, image_features, lesion_mask, mirror_asymmetry
from fusion.image_features.stage import FeatureRecipe, compute_image_features, read_run_features, run_features
from fusion.patient_context import denial_reason
from metadata.dataset import load_dataset
from rundir.layout import RunLayout

SKIN, BROWN = (205, 170, 150), (60, 10, 5)


def _lesion(size: int = 96, radius: int = 28, colour: tuple[int, int, int] = BROWN) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8) + np.array(SKIN, np.uint8)
    rr, cc = draw.disk((size // 2, size // 2), radius)
    image[rr, cc] = colour
    return image


def test_a_symmetric_disc_has_no_asymmetry_and_a_one_sided_lesion_has_much() -> None:
    disc = image_features(_lesion(), ["shape"])
    assert disc["shape_asymmetry_major"] < 0.02 and disc["shape_asymmetry_minor"] < 0.02
    assert disc["shape_border_irregularity"] == pytest.approx(1.0, abs=0.15)
    assert disc["shape_eccentricity"] < 0.1
    # an ellipse turned 30 degrees is symmetric about its own axes, whatever its orientation
    mask = np.zeros((96, 96), bool)
    rr, cc = draw.ellipse(48, 48, 30, 14, rotation=np.deg2rad(30))
    mask[rr, cc] = True
    assert max(mirror_asymmetry(mask)) < 0.03
    # a disc with a quarter cut away: its halves across one axis do not match
    mask = np.zeros((96, 96), bool)
    rr, cc = draw.disk((48, 48), 28)
    mask[rr, cc] = True
    mask[48:, :48] = False
    assert max(mirror_asymmetry(mask)) > 0.2


def test_a_two_colour_lesion_counts_two_dermoscopic_colours() -> None:
    one = image_features(_lesion(colour=(51, 0, 0)), ["color"])
    two = _lesion(colour=(51, 0, 0))
    two[:, 48:][np.all(two[:, 48:] == (51, 0, 0), axis=2)] = (0, 0, 0)  # right half black
    counted = image_features(two, ["color"])
    assert one["color_n_colors"] == 1 and one["color_share_dark_brown"] == pytest.approx(1.0)
    assert counted["color_n_colors"] == 2
    assert counted["color_share_dark_brown"] == pytest.approx(0.5, abs=0.05)
    assert counted["color_share_black"] == pytest.approx(0.5, abs=0.05)
    assert counted["color_contrast_delta_e"] > 40  # dark lesion on light skin


def test_an_image_without_a_lesion_gets_missing_features_not_invented_ones() -> None:
    blank = np.full((64, 64, 3), 180, np.uint8)
    assert not lesion_mask(blank).any()
    features = image_features(blank, list(FEATURE_FAMILIES))
    assert list(features) == [c for f in FEATURE_FAMILIES for c in family_columns(f)]
    assert all(np.isnan(v) for v in features.values())


def test_the_mask_finds_the_central_lesion_not_a_dark_corner() -> None:
    image = _lesion(radius=16)
    rr, cc = draw.disk((0, 0), 30, shape=image.shape[:2])  # a dermoscope's dark corner, as large as the lesion
    image[rr, cc] = (10, 10, 10)
    mask = lesion_mask(image)
    assert mask[48, 48] and not mask[5, 5]


def test_shades_of_gray_takes_a_camera_cast_out_of_the_colour_features(tmp_path: Path) -> None:
    lesion = _lesion()
    cast = np.clip(lesion * np.array([1.25, 1.0, 0.75]), 0, 255).astype(np.uint8)
    paths = []
    for name, image in {"plain": lesion, "cast": cast}.items():
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(image).save(paths[-1])
    raw = compute_image_features(paths, FeatureRecipe(("color",), 96, "none"))
    normalised = compute_image_features(paths, FeatureRecipe(("color",), 96, "shades-of-gray"))
    gap = lambda table: abs(table["color_skin_b_mean"][0] - table["color_skin_b_mean"][1])  # noqa: E731
    assert gap(raw) > 5 and gap(normalised) < 1.5


def test_unknown_family_is_a_usage_error(tiny_cohort: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["features", "--data", str(tiny_cohort), "--run", str(tmp_path / "run"), "--families", "shape,hue"])
    assert result.exit_code == 2
    assert "hue" in result.output and "registered" in result.output


def test_features_resume_from_saved_chunks_and_equal_a_fresh_run(cohort_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = load_dataset(cohort_dir).table
    recipe = FeatureRecipe(("shape", "color"), 32)
    monkeypatch.setattr(feature_stage, "CHUNK_ROWS", 200)
    fresh = tmp_path / "fresh"
    run_features(table, fresh, recipe, n_jobs=1)

    resumed, calls = tmp_path / "resumed", []
    original = feature_stage.compute_image_features

    def interrupted(sources, recipe, n_jobs=None, advance=None):  # noqa: ANN001, ANN202
        calls.append(len(sources))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(sources, recipe, n_jobs, advance)

    monkeypatch.setattr(feature_stage, "compute_image_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_features(table, resumed, recipe, n_jobs=1)
    assert not RunLayout(resumed).feature_recipe.exists()  # nothing finished is claimed
    calls.clear()
    monkeypatch.setattr(feature_stage, "compute_image_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    run_features(table, resumed, recipe, n_jobs=1)
    n_chunks = -(-int(table["image_path"].notna().sum()) // 200)
    assert len(calls) == n_chunks - 1  # the first chunk was read back, not recomputed
    ids = table["image_id"]
    pd.testing.assert_frame_equal(read_run_features(fresh, ids), read_run_features(resumed, ids))
    assert not RunLayout(resumed).feature_chunks.exists()
    calls.clear()
    run_features(table, resumed, recipe, n_jobs=1)  # finished for this recipe and these images: nothing recomputed
    assert calls == []
    run_features(table, resumed, FeatureRecipe(("shape",), 32), n_jobs=1)  # another recipe is computed afresh
    assert len(calls) == n_chunks and FeatureRecipe.from_json(__import__("json").loads(RunLayout(resumed).feature_recipe.read_text())["recipe"]).families == ("shape",)


def test_hdf5_layout_images_get_features(tmp_path: Path) -> None:
    from metadata.synth import SynthConfig, generate_cohort

    data = tmp_path / "isic2024"
    generate_cohort(data, SynthConfig(patients=12, image_size=32, seed=5, layout="isic2024"))
    table = load_dataset(data).table
    assert table["image_path"].str.contains("#").all()
    run_features(table, tmp_path / "run", FeatureRecipe(("shape",), 32), n_jobs=1)
    features = read_run_features(tmp_path / "run", table["image_id"])
    assert len(features) == len(table) and features["shape_area_share"].notna().mean() > 0.8


@pytest.fixture(scope="module")
def features_run(pipeline_run: Path, cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline run, copied, with dermoscopy features and a stack refitted on them, through the CLI."""
    run = tmp_path_factory.mktemp("features_run") / "run"
    shutil.copytree(pipeline_run, run)
    runner = CliRunner()
    for args in (
        ["features", "--data", str(cohort_dir), "--run", str(run), "--image-size", "32", "--jobs", "2"],
        ["stack", "--data", str(cohort_dir), "--run", str(run), "--seed", "7"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return run


def test_stack_takes_features_with_patient_context_and_no_label_column(features_run: Path, cohort_dir: Path) -> None:
    import json

    from fusion.stack_model import StackModel

    recipe = json.loads(RunLayout(features_run).stack_recipe.read_text())
    columns = StackModel.load(RunLayout(features_run).stack).features
    feature_columns = FeatureRecipe.from_json(recipe["image_features"]).columns()
    assert set(feature_columns) <= set(columns)
    assert {f"{c}_patient_rank" for c in feature_columns} | {f"{c}_patient_z" for c in feature_columns} <= set(columns)
    assert not [c for c in columns if denial_reason(c)]
    # the stack's inputs never read a label: the same rows with their labels and diagnoses shuffled give the same features
    from fusion.stacker import build_stack_features

    table = load_dataset(cohort_dir).table
    rng = np.random.default_rng(0)
    shuffled = table.assign(target=rng.permutation(table["target"].to_numpy()), diagnosis=rng.permutation(table["diagnosis"].to_numpy()))
    images = read_run_features(features_run, table["image_id"])
    no_cnn = pd.DataFrame(index=table.index)
    pd.testing.assert_frame_equal(build_stack_features(table, no_cnn, images), build_stack_features(shuffled, no_cnn, images))


def test_report_gives_each_family_gain_and_the_features_only_stack(features_run: Path) -> None:
    import json

    report = json.loads(RunLayout(features_run).report_json.read_text())
    gain = report["image_feature_gain"]
    assert [g["family"] for g in gain["families"]] == [*FEATURE_FAMILIES, "image_features"]
    for entry in gain["families"]:
        assert entry["difference"] == pytest.approx(entry["auc_with"] - entry["auc_without"])
        assert entry["ci"][0] <= entry["ci"][1] and 0 < entry["p_value"] <= 1
    assert 0.5 < gain["features_only_stack"]["auc"] <= 1
    assert "Dermoscopy feature families" in RunLayout(features_run).report_md.read_text()


def test_predict_computes_the_features_exactly_as_the_features_stage(features_run: Path, cohort_dir: Path, tmp_path: Path) -> None:
    from ensemble.bundle import export_bundle, load_bundle
    from ensemble.predict import score_patients, scoring_rows

    export_bundle(features_run, tmp_path / "bundle", n_boot=100)
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.stack.feature_recipe == FeatureRecipe.from_json(__import__("json").loads(RunLayout(features_run).feature_recipe.read_text())["recipe"])
    rows = scoring_rows(cohort_dir, None, split="test")
    scored = score_patients(bundle, rows, batch_size=64, advance=lambda n: None)
    stage_features = read_run_features(features_run, rows["image_id"]).set_axis(rows["image_id"])
    pd.testing.assert_frame_equal(scored.image_features, stage_features)
    # and the bundle reproduces the run's test predictions with them
    run_test = pd.read_parquet(RunLayout(features_run).stack_outputs("lightgbm_stack")[1]).set_index("image_id")["prob"]
    predicted = scored.predictions.set_index("image_id")["melanoma_probability"]
    np.testing.assert_allclose(predicted.reindex(run_test.index), run_test, atol=2e-3)
