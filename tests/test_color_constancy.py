"""Colour constancy: the same lesion under another light looks the same to the CNNs, in training and at scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def test_shades_of_gray_removes_a_known_colour_cast_and_leaves_grey_alone() -> None:
    import tensorflow as tf

    from cnn.pipeline import shades_of_gray

    rng = np.random.default_rng(0)
    lesion = rng.uniform(20, 150, (16, 16, 3)).astype(np.float32)
    cast = lesion * np.array([1.3, 1.0, 0.7], np.float32)  # another camera's white balance
    corrected, reference = (shades_of_gray(tf.constant(x)).numpy() for x in (cast, lesion))
    # the cast is gone; what is left is one overall brightness factor (Shades of Gray keeps the light's strength)
    np.testing.assert_allclose(corrected / corrected.mean(), reference / reference.mean(), atol=1e-4)
    assert not np.allclose(cast / cast.mean(), lesion / lesion.mean(), atol=1e-2)
    grey = np.full((8, 8, 3), 90.0, np.float32)
    np.testing.assert_allclose(shades_of_gray(tf.constant(grey)).numpy(), grey, atol=1e-3)


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_dark_dermoscope_border_is_cropped_before_colour_constancy() -> None:
    import tensorflow as tf

    from cnn.options import COLOR_CONSTANCY_CHOICES
    from cnn.pipeline import COLOR_CONSTANCY, dark_border_box, decode_image

    assert tuple(COLOR_CONSTANCY) == COLOR_CONSTANCY_CHOICES  # the CLI offers exactly what the pipeline can do
    rng = np.random.default_rng(0)
    lesion = np.clip(rng.normal([190, 140, 120], 15, (48, 48, 3)), 0, 255).astype(np.uint8)
    lesion[16:32, 14:34] = (60, 35, 30)  # a dark lesion on skin
    framed = np.zeros((64, 64, 3), np.uint8)
    framed[6:54, 10:58] = lesion  # the same field inside another device's black surround
    cropped = decode_image(tf.constant(_png(framed)), 32, "shades-of-gray-cropped").numpy()
    np.testing.assert_allclose(cropped, decode_image(tf.constant(_png(lesion)), 32, "shades-of-gray").numpy(), atol=1e-3)
    assert np.abs(decode_image(tf.constant(_png(framed)), 32, "shades-of-gray").numpy() - cropped).mean() > 20
    # a round field of view is cut to about its inscribed square; an image without a border is left whole
    yy, xx = np.mgrid[:100, :100]
    round_field = np.where(((yy - 49.5) ** 2 + (xx - 49.5) ** 2 < 50**2)[..., None], 170, 0).astype(np.uint8).repeat(3, axis=2)
    top, bottom, left, right = (int(edge) for edge in dark_border_box(round_field))
    assert abs(top - 15) <= 2 and abs(bottom - 85) <= 2 and (top, bottom) == (left, right)
    assert [int(edge) for edge in dark_border_box(lesion)] == [0, 48, 0, 48]
    assert [int(edge) for edge in dark_border_box(np.zeros((20, 30, 3), np.uint8))] == [0, 20, 0, 30]  # all dark: kept whole


def test_a_cropped_views_grad_cam_lies_inside_the_crop_on_the_whole_image() -> None:
    from ensemble.explain import heat_on_image

    framed = np.zeros((64, 64, 3), np.uint8)
    framed[6:54, 10:58] = 180
    heat = heat_on_image(np.ones((4, 4), np.float32), framed, cropped=True)
    assert heat.shape == (64, 64) and heat[6:54, 10:58].min() > 0.99 and heat.sum() == heat[6:54, 10:58].sum()
    assert heat_on_image(np.ones((4, 4), np.float32), framed, cropped=False).min() > 0.99


def test_the_bundle_scores_with_the_colour_constancy_it_was_trained_with(tiny_cohort: Path, tmp_path: Path) -> None:
    from cnn.pipeline import image_dataset

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2", "--no-dedup"]).exit_code == 0
    result = runner.invoke(app, ["train-cnns", *common, "--models", "small:16", "--epochs", "1", "--color-constancy", "shades-of-gray"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "cnn" / "small" / "fold0" / "history.json").read_text())["config"]["color_constancy"] == "shades-of-gray"
    assert runner.invoke(app, ["stack", *common, "--rounds", "20"]).exit_code == 0
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(bundle)]).exit_code == 0
    assert json.loads((bundle / "config.json").read_text())["cnns"][0]["color_constancy"] == "shades-of-gray"
    from ensemble.bundle import load_bundle

    loaded = load_bundle(bundle)
    assert loaded.cnns[0].color_constancy == "shades-of-gray"
    out = tmp_path / "predicted"
    result = runner.invoke(app, ["predict", "--bundle", str(bundle), "--data", str(tiny_cohort), "--split", "test", "--out", str(out)])
    assert result.exit_code == 0, result.output
    # what predict feeds the CNNs is what training fed them: the corrected images, not the raw ones
    sources = pd.read_csv(tiny_cohort / "test.csv")["image_name"].map(lambda i: str(tiny_cohort / "jpeg" / "test" / f"{i}.jpg")).tolist()[:8]
    corrected = next(iter(image_dataset(sources, None, 16, 8, cache="none", color_constancy="shades-of-gray"))).numpy()
    raw = next(iter(image_dataset(sources, None, 16, 8, cache="none"))).numpy()
    from cnn.pipeline import named_image_batches

    fed = next(named_image_batches(sources, 16, 8, loaded.cnns[0].color_constancy)).numpy()
    np.testing.assert_allclose(fed, corrected)
    assert np.abs(fed - raw).mean() > 1.0


def test_illuminant_shift_relights_each_image_under_a_drawn_illuminant() -> None:
    import tensorflow as tf

    from cnn.pipeline import IlluminantShift, build_augmenter, estimate_illuminant

    lights = np.array([[0.7, 0.55, 0.45], [0.45, 0.6, 0.66]])
    lights /= np.linalg.norm(lights, axis=1, keepdims=True)
    grey = tf.fill([16, 8, 8, 3], 100.0)
    relit = IlluminantShift(lights, seed=3)(grey, training=True)
    found = estimate_illuminant(relit).numpy()
    nearest = np.abs(found[:, None, :] - lights[None]).sum(axis=2).min(axis=1)
    assert nearest.max() < 1e-4  # every image is lit by one of the drawn lights
    assert len({tuple(np.round(f, 3)) for f in found}) == 2  # and both lights are drawn
    np.testing.assert_allclose(IlluminantShift(lights)(grey, training=False), grey)  # scoring is untouched
    # an image already under a cast takes the drawn light instead (casts do not pile up)
    cast = grey * tf.constant([1.3, 1.0, 0.7])
    replaced = estimate_illuminant(IlluminantShift(lights, seed=3)(cast, training=True)).numpy()
    assert np.abs(replaced[:, None, :] - lights[None]).sum(axis=2).min(axis=1).max() < 1e-3
    assert isinstance(build_augmenter(0, "none", lights).layers[0], IlluminantShift)
    assert build_augmenter(0, "none") is None


def test_members_of_one_backbone_train_from_their_own_seeds_with_illuminant_augmentation(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2", "--no-dedup"]).exit_code == 0
    result = runner.invoke(app, ["train-cnns", *common, "--models", "small:16,small:16@1", "--epochs", "1", "--illuminant-augment"])
    assert result.exit_code == 0, result.output
    configs = {m: json.loads((run / "cnn" / m / "fold0" / "history.json").read_text())["config"] for m in ("small", "small_s1")}
    assert configs["small"]["illuminant_augment"] and configs["small_s1"]["illuminant_augment"]
    assert configs["small_s1"]["seed"] == configs["small"]["seed"] + 1000
    oof = {m: pd.read_parquet(run / "cnn" / m / "oof.parquet").set_index("image_id")["prob"] for m in configs}
    assert not np.allclose(oof["small"], oof["small_s1"].reindex(oof["small"].index))
