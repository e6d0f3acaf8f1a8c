"""The training input: shuffled indices (not decoded images), a uint8 cache within a budget, negative sampling."""

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from cnn.pipeline import EpochSampler, choose_cache, decoded_bytes, image_dataset
from cnn.tfrecords import shard_sources, write_shards
from metadata.images import ImageBytesReader

N_IMAGES = 120


def _jpeg(value: int) -> bytes:
    """A flat 8x8 image whose grey level encodes its index (exactly recoverable after JPEG)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The same images as files, as entries of one HDF5 file (the ISIC 2024 layout) and in TFRecord shards."""
    root = tmp_path_factory.mktemp("images")
    files = []
    with h5py.File(root / "images.hdf5", "w") as handle:
        for i in range(N_IMAGES):
            (root / f"{i}.png").write_bytes(_jpeg(2 * i))
            files.append(str(root / f"{i}.png"))
            handle[f"img{i}"] = np.void(_jpeg(2 * i))
    table = pd.DataFrame({"image_id": [f"img{i}" for i in range(N_IMAGES)], "image_path": files, "split": "train"})
    write_shards(table, root, records_per_shard=16)  # 8 shards
    return {"files": files, "hdf5": [f"{root / 'images.hdf5'}#img{i}" for i in range(N_IMAGES)],
            "shards": list(shard_sources(table, root)["image_path"])}


def _epoch(ds) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(images)[:, 0, 0, 0] / 2, np.concatenate(labels)


@pytest.mark.parametrize("kind", ["files", "hdf5", "shards"])
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_every_epoch_is_a_new_order_with_labels_kept_on_their_images(sources: dict, kind: str, cache: str) -> None:
    labels = np.arange(N_IMAGES, dtype=np.float32)
    ds = image_dataset(sources[kind], labels, 8, 16, shuffle=True, cache=cache, seed=3)
    first_images, first_labels = _epoch(ds)
    second_images, second_labels = _epoch(ds)
    np.testing.assert_allclose(first_images, first_labels, atol=0.5)  # each image still carries its own label
    np.testing.assert_allclose(second_images, second_labels, atol=0.5)
    assert sorted(first_labels) == list(labels) and sorted(second_labels) == list(labels)
    assert not np.array_equal(first_labels, second_labels)
    again, _ = _epoch(image_dataset(sources[kind], labels, 8, 16, shuffle=True, cache=cache, seed=3))
    np.testing.assert_array_equal(again, first_images)  # seeded


def test_streaming_reads_images_after_shuffling_not_all_of_them_up_front(sources: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural: taking one batch from a shuffled stream reads a few batches' worth of images, not the dataset."""
    reads = []
    original = ImageBytesReader.read
    monkeypatch.setattr(ImageBytesReader, "read", lambda self, source: reads.append(source) or original(self, source))
    ds = image_dataset(sources["hdf5"], np.zeros(N_IMAGES), 8, 4, shuffle=True, cache="none")
    next(iter(ds))
    assert 4 <= len(reads) < N_IMAGES // 2


def test_cache_auto_keeps_memory_within_the_budget_and_streams_above_it() -> None:
    assert decoded_bytes(10_000, 64) == 10_000 * 64 * 64 * 3  # uint8 RGB, not float32
    assert choose_cache("auto", 10_000, 64, 1.0)[0] == "memory"
    mode, reason = choose_cache("auto", 200_000, 64, 1.0)
    assert mode == "none" and "2.46 GB" in reason and "over --cache-budget 1 GB" in reason
    mode, reason = choose_cache("auto", 200_000, 64, 1.0, shards=True)
    assert mode == "none" and "interleaved" in reason
    assert choose_cache("memory", 200_000, 64, 1.0)[0] == "memory"  # an explicit choice is the user's


def test_negatives_per_patient_keeps_every_positive_and_redraws_each_epoch() -> None:
    rng = np.random.default_rng(0)
    patient = rng.integers(0, 30, 1000)
    positive = rng.random(1000) < 0.02
    sampler = EpochSampler(1000, seed=1, patient=patient, positive=positive, negatives_per_patient=5)
    epochs = [sampler.indices(e) for e in range(2)]
    for rows in epochs:
        assert len(rows) == len(set(rows)) == sampler.epoch_size
        assert set(np.flatnonzero(positive)) <= set(rows)
        negatives = pd.Series(patient[rows][~positive[rows]])
        assert negatives.value_counts().max() <= 5
        assert negatives.nunique() == len(np.unique(patient[~positive]))  # every patient still contributes
    assert set(epochs[0]) != set(epochs[1])
    np.testing.assert_array_equal(EpochSampler(1000, 1, patient, positive, 5).indices(1), epochs[1])


def test_shard_stream_trains_each_epoch_on_exactly_the_sampled_rows(sources: dict) -> None:
    """TFRecord shards streamed for training: every epoch holds the sampler's rows once each, redrawn per epoch."""
    patient, positive = np.arange(N_IMAGES) % 7, np.arange(N_IMAGES) % 10 == 0
    sampler = EpochSampler(N_IMAGES, seed=2, patient=patient, positive=positive, negatives_per_patient=4)
    ds = image_dataset(sources["shards"], np.arange(N_IMAGES, dtype=np.float32), 8, 8, sampler=sampler, cache="none")
    for epoch in range(2):
        images, rows = _epoch(ds)
        np.testing.assert_allclose(images, rows, atol=0.5)
        assert sorted(rows.astype(int)) == list(np.flatnonzero(sampler.keep(epoch)))
    assert not np.array_equal(sampler.keep(0), sampler.keep(1))


def test_train_cnns_with_negative_sampling_still_predicts_every_row_once(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "2"]).exit_code == 0
    result = runner.invoke(
        app, ["train-cnns", "--data", str(tiny_cohort), "--run", str(run), "--models", "small", "--image-size", "16",
              "--epochs", "1", "--negatives-per-patient", "1", "--cache", "none"],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "streamed, not cached (--cache none)" in result.output
    folds = pd.read_parquet(run / "folds.parquet")
    oof = pd.read_parquet(run / "cnn" / "small" / "oof.parquet")
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])  # OOF covers every row exactly once
    history = json.loads((run / "cnn" / "small" / "fold0" / "history.json").read_text())
    sampling = history["sampling"]
    assert sampling["negatives_per_patient"] == 1 and sampling["images_per_epoch"] < sampling["training_images"]
