import json
from dataclasses import asdict
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cnn.backbones import BACKBONES, build_classifier, get_backbone
from cnn.options import CnnConfig
from cnn.pipeline import build_augmenter, image_dataset, predict_tta
from cnn.train import best_epoch, changed_options, should_stop
from errors import UserError


def test_best_epoch_picks_highest_validation_auc() -> None:
    assert best_epoch([0.7, 0.9, 0.85, 0.9]) == 1  # first of ties
    assert best_epoch([float("nan"), 0.6, 0.5]) == 1  # undefined AUC never wins
    with pytest.raises(ValueError):
        best_epoch([])


def test_early_stopping_waits_for_patience() -> None:
    assert not should_stop([0.7, 0.8, 0.79], patience=2)
    assert should_stop([0.7, 0.8, 0.79, 0.78], patience=2)
    assert not should_stop([0.7, 0.6, 0.5, 0.4], patience=0)  # 0 = never stop early


def test_unknown_backbone_lists_registered_names() -> None:
    with pytest.raises(UserError, match="small"):
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
    with pytest.raises(UserError, match="no ImageNet weights"):
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
    with pytest.raises(UserError):
        predict_tta(model, images, ("rot45",))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_offline_and_trains_one_step(name: str) -> None:
    size = max(32, get_backbone(name).min_size)
    model = build_classifier(name, size, weights="none", n_outputs=3)
    model.compile(optimizer="adam", loss="categorical_crossentropy", run_eagerly=True)  # one step: skip graph tracing
    x = np.random.default_rng(0).uniform(0, 255, (4, size, size, 3)).astype("float32")
    loss = model.train_on_batch(x, np.eye(3, dtype="float32")[[0, 2, 1, 0]])
    assert np.isfinite(loss)
    probs = model(x, training=False).numpy()
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_parse_model_specs() -> None:
    from cnn.backbones import parse_model_specs

    assert parse_model_specs("small:48, mobilenet_v3_small", 64) == {"small": 48, "mobilenet_v3_small": 64}
    with pytest.raises(UserError):
        parse_model_specs("nope:32", 64)
    with pytest.raises(UserError):
        parse_model_specs("small:big", 64)
    # members of one backbone: a seed each, the first keeps the backbone's name
    assert parse_model_specs("small:64,small:96@1,small@2", 48) == {"small": 64, "small_s1": 96, "small_s2": 48}
    with pytest.raises(UserError, match="twice"):
        parse_model_specs("small:64,small:96", 64)
    with pytest.raises(UserError, match="seed"):
        parse_model_specs("small@x", 64)


def test_strong_augmentation_and_dermoscopy_layers(tmp_path: Path) -> None:
    import tensorflow as tf

    from cnn.pipeline import HairLines, MicroscopeVignette

    flat = tf.fill((4, 24, 24, 3), 200.0)
    vignetted = MicroscopeVignette(max_strength=0.6, seed=1)(flat, training=True).numpy()
    assert np.allclose(vignetted[:, 12, 12], 200.0, atol=3)  # centre untouched
    assert (vignetted[:, 0, 0] <= 200.0).all() and (vignetted[:, 0, 0] < 199).any()  # corners darkened
    np.testing.assert_array_equal(MicroscopeVignette()(flat, training=False), flat)
    hairy = HairLines(max_hairs=3, probability=1.0, seed=2)(flat, training=True).numpy()
    dark = hairy < 100
    assert dark.any() and dark.mean() < 0.5  # thin lines, not a dark image
    paths = _images(tmp_path, 8)
    labels = np.array([i % 2 for i in range(8)], dtype=np.float32)
    ds = image_dataset(paths, labels, 24, 4, shuffle=True, augment=build_augmenter(0, "strong"), seed=0)
    for images, y in ds:
        assert images.shape[1:] == (24, 24, 3) and images.dtype == "float32" and y.shape == (4,)
    reddish = tf.constant(np.tile(np.array([200.0, 90.0, 70.0], np.float32), (8, 24, 24, 1)))
    augmented = build_augmenter(3, "strong")(reddish, training=True).numpy()
    # Colour is the signal in dermoscopy: jitter may shift it, never wash it out to grey.
    assert (augmented[..., 0].mean(axis=(1, 2)) - augmented[..., 1].mean(axis=(1, 2)) > 50).all()
    assert build_augmenter(0, "none") is None
    with pytest.raises(UserError):
        build_augmenter(0, "extreme")


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_batches_keep_label_shape_and_range(tmp_path: Path, mix: str) -> None:
    paths = _images(tmp_path, 8)
    one_hot = np.eye(3, dtype=np.float32)[[i % 3 for i in range(8)]]
    for images, y in image_dataset(paths, one_hot, 16, 8, mix=mix, seed=0):
        assert y.shape == (8, 3) and np.allclose(y.numpy().sum(axis=1), 1, atol=1e-5)
        assert (y.numpy() >= 0).all() and images.shape == (8, 16, 16, 3)


def test_target_resolution_labels_and_weights() -> None:
    import pandas as pd

    from cnn.targets import resolve_target

    rows = pd.DataFrame({"diagnosis": ["NV", "MEL", "BCC", "NV", "NV", "MEL"], "target": [0, 1, 0, 0, 0, 1]})
    spec = resolve_target("auto", rows)
    assert spec.classes == ("MEL", "NV", "BCC") and spec.multiclass
    labels = spec.labels(rows)
    assert labels.shape == (6, 3) and labels[1].tolist() == [1, 0, 0]
    weights = spec.class_weight(labels)
    totals = [weights[i] * (labels.argmax(axis=1) == i).sum() for i in range(3)]
    assert np.allclose(totals, totals[0])  # every class carries the same total weight
    counts = np.bincount(labels.argmax(axis=1))  # MEL 2, NV 3, BCC 1
    sqrt = spec.class_weight(labels, "sqrt")
    assert np.isclose(sum(sqrt[i] * counts[i] for i in range(3)), 6)  # mean weight 1 per row
    assert np.isclose(sqrt[2] / sqrt[1], np.sqrt(3))  # milder than balanced, where the ratio is 3
    assert spec.class_weight(labels, "none") is None
    np.testing.assert_allclose(spec.training_prior(labels, "none"), counts / 6)
    np.testing.assert_allclose(spec.training_prior(labels, "balanced"), [1 / 3] * 3)
    with pytest.raises(UserError, match="--class-weight"):
        spec.class_weight(labels, "inverse")
    assert spec.melanoma_prob(np.array([[0.7, 0.2, 0.1]])).tolist() == [0.7]
    assert resolve_target("mel", rows).classes == ("MEL",)
    binary = resolve_target("auto", rows.assign(diagnosis=None))
    assert binary.classes == ("MEL",) and binary.labels(rows).tolist() == rows["target"].tolist()
    with pytest.raises(UserError, match="--target mel"):
        resolve_target("diagnosis", rows.assign(diagnosis=None))


def test_empty_split_gives_an_empty_dataset() -> None:
    assert sum(1 for _ in image_dataset([], None, 16, 4)) == 0


def test_pipeline_streams_images_from_hdf5(tmp_path: Path) -> None:
    import h5py

    paths = _images(tmp_path, 3)
    with h5py.File(tmp_path / "train-image.hdf5", "w") as handle:
        for i, path in enumerate(paths):
            handle[f"ISIC_{i}"] = np.void(Path(path).read_bytes())
    sources = [f"{tmp_path / 'train-image.hdf5'}#ISIC_{i}" for i in range(3)]
    from_hdf5 = np.concatenate([x.numpy() for x in image_dataset(sources, None, 16, 2)])
    from_files = np.concatenate([x.numpy() for x in image_dataset(paths, None, 16, 2)])
    np.testing.assert_array_equal(from_hdf5, from_files)



def test_a_checkpoint_resumes_only_under_the_options_that_wrote_it() -> None:
    saved = json.loads(json.dumps(asdict(CnnConfig(epochs=12, learning_rate=1e-3))))
    assert changed_options(saved, CnnConfig(epochs=12, learning_rate=1e-3, tta=("none",), cache="none")) == {}  # inference/IO only
    assert changed_options(saved, CnnConfig(epochs=12, learning_rate=2e-3)) == {"learning_rate": 1e-3}
    # a checkpoint from before --weight-decay existed was trained with today's default (1e-4)
    older = {k: v for k, v in saved.items() if k != "weight_decay"}
    assert changed_options(older, CnnConfig(epochs=12, learning_rate=1e-3)) == {}
    assert changed_options(older, CnnConfig(epochs=12, learning_rate=1e-3, weight_decay=0.05)) == {"weight_decay": 1e-4}


def test_each_tf_free_copy_of_a_registry_equals_the_registry() -> None:
    """`cnn.options` lists every registry's keys without TensorFlow, for the CLI and config checks: a
    key added to a registry but not to its copy would be refused before training starts."""
    from cnn import options
    from cnn.pipeline import AUGMENTATIONS, COLOR_CONSTANCY, MIXES, TTA_VIEWS
    from cnn.targets import CLASS_WEIGHT_POWERS, LOSSES
    from cnn.train import STRATEGIES

    pairs = {
        "COLOR_CONSTANCY_CHOICES": COLOR_CONSTANCY, "AUGMENT_LEVELS": AUGMENTATIONS, "TTA_VIEW_CHOICES": TTA_VIEWS, "MIX_CHOICES": MIXES,
        "LOSS_CHOICES": LOSSES, "CLASS_WEIGHT_CHOICES": CLASS_WEIGHT_POWERS, "STRATEGY_CHOICES": STRATEGIES,
    }
    for name, registry in pairs.items():
        assert getattr(options, name) == tuple(registry), name


def test_a_recipe_is_checked_when_it_is_built() -> None:
    with pytest.raises(UserError, match="--augment 'heavy'"):
        CnnConfig(augment="heavy")
    with pytest.raises(UserError, match="--epochs 0"):
        CnnConfig(epochs=0)
    with pytest.raises(UserError, match="--tta"):
        CnnConfig.from_options({"tta": "none,spin"})
    with pytest.raises(TypeError, match="no field"):  # a renamed option is a bug, never a silent default
        CnnConfig.from_options({"epoch": 3})


def test_every_recipe_field_is_a_train_cnns_option() -> None:
    import inspect
    from dataclasses import fields

    from cli import TRAIN_CNNS_RUN_OPTIONS, train_cnns

    parameters = set(inspect.signature(inspect.unwrap(train_cnns)).parameters)
    assert {f.name for f in fields(CnnConfig)} == parameters - TRAIN_CNNS_RUN_OPTIONS
