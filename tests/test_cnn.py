from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cnn.backbones import BACKBONES, build_classifier, get_backbone
from cnn.pipeline import build_augmenter, image_dataset, predict_tta
from cnn.train import best_epoch


def test_best_epoch_picks_highest_validation_auc() -> None:
    assert best_epoch([0.7, 0.9, 0.85, 0.9]) == 1  # first of ties
    assert best_epoch([float("nan"), 0.6, 0.5]) == 1  # undefined AUC never wins
    with pytest.raises(ValueError):
        best_epoch([])


def test_unknown_backbone_lists_registered_names() -> None:
    with pytest.raises(KeyError, match="small"):
        get_backbone("no_such_net")
    assert {"small", "efficientnet_b0", "mobilenet_v3_small", "resnet50v2"} <= set(BACKBONES)


def test_small_backbone_builds_offline_and_trains_one_step() -> None:
    model = build_classifier("small", 32, weights="none")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    loss = model.train_on_batch(x, np.array([0, 1, 0, 1], dtype="float32"))
    assert np.isfinite(loss)
    assert model.predict(x, verbose=0).shape == (4, 1)


def test_small_has_no_imagenet_weights() -> None:
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_classifier("small", 32, weights="imagenet")


def _images(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        # Left half bright for even images, dark for odd ones: a label the augmentation must not move.
        array = np.zeros((20, 20, 3), np.uint8)
        array[:, :10] = 250 if i % 2 == 0 else 5
        Image.fromarray(array).save(path, quality=95)
        paths.append(str(path))
    return paths


def test_pipeline_shapes_dtypes_and_label_alignment(tmp_path: Path) -> None:
    paths = _images(tmp_path, 10)
    labels = np.array([i % 2 for i in range(10)], dtype=np.float32)
    ds = image_dataset(paths, labels, 16, 4, shuffle=True, augment=build_augmenter(0), seed=0)
    seen = 0
    for images, y in ds:
        assert images.dtype == "float32" and images.shape[1:] == (16, 16, 3)
        # Flips and rotations move the bright half, never its brightness: mean intensity tracks the label.
        means = images.numpy().mean(axis=(1, 2, 3))
        assert np.all((means > 100) == (y.numpy() == 0))
        seen += len(y)
    assert seen == 10


def test_tta_is_the_mean_of_the_views(tmp_path: Path) -> None:
    paths = _images(tmp_path, 6)
    inputs = keras.Input((16, 16, 3))
    left_column = keras.layers.Cropping2D(((0, 0), (0, 15)))(inputs)  # what the model sees depends on flips
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="ones")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(left_column))
    )
    model = keras.Model(inputs, outputs)
    images = image_dataset(paths, None, 16, 4)
    views = {v: predict_tta(model, images, (v,)) for v in ("none", "hflip", "vflip")}
    assert not np.allclose(views["none"], views["hflip"])
    np.testing.assert_allclose(predict_tta(model, images), np.mean(list(views.values()), axis=0), rtol=1e-6)
    with pytest.raises(KeyError):
        predict_tta(model, images, ("rot45",))
