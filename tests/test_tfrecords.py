from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from cnn.pipeline import image_dataset
from cnn.tfrecords import shard_sources, write_shards
from errors import UserError
from metadata.dataset import load_dataset
from rundir.layout import INDEX_FILE, SHARD_DIR


def test_shards_stream_any_subset_in_order_with_the_original_pixels(tiny_cohort: Path, tmp_path: Path) -> None:
    table = load_dataset(tiny_cohort).table
    index = write_shards(table, tmp_path, records_per_shard=7)
    assert sorted(index["image_id"]) == sorted(table["image_id"])
    assert index.groupby("shard").size().max() <= 7
    sharded = shard_sources(table, tmp_path)
    subset = np.sort(np.random.default_rng(0).choice(len(table), size=len(table) // 3, replace=False))
    from_shards = np.concatenate([x.numpy() for x in image_dataset(sharded["image_path"].iloc[subset], None, 16, 8)])
    from_files = np.concatenate([x.numpy() for x in image_dataset(table["image_path"].iloc[subset], None, 16, 8)])
    np.testing.assert_array_equal(from_shards, from_files)
    # A known size: Keras re-opens the dataset each epoch only then. A filtered stream of unknown size
    # ran dry after the first epoch, and every later epoch of a run from shards trained on nothing.
    assert image_dataset(sharded["image_path"].iloc[subset], None, 16, 8).cardinality() == -(-len(subset) // 8)


def test_resized_shards_hold_images_of_the_stored_size(tiny_cohort: Path, tmp_path: Path) -> None:
    table = load_dataset(tiny_cohort).table.head(5)
    write_shards(table, tmp_path, image_size=12)
    sharded = shard_sources(table, tmp_path)
    images = next(iter(image_dataset(sharded["image_path"], None, 12, 5))).numpy()
    assert images.shape == (5, 12, 12, 3) and images.std() > 0


def test_out_of_order_sources_and_stale_shards_are_refused(tiny_cohort: Path, tmp_path: Path) -> None:
    table = load_dataset(tiny_cohort).table
    write_shards(table.head(10), tmp_path)
    with pytest.raises(UserError, match="not in the shards"):
        shard_sources(table, tmp_path)
    sharded = shard_sources(table.head(10), tmp_path)
    with pytest.raises(ValueError, match="stored order"):
        image_dataset(sharded["image_path"].iloc[::-1], None, 16, 4)


def test_cli_trains_from_shards_with_the_same_rows_as_from_files(tiny_cohort: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    run = tmp_path / "run"
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2"]).exit_code == 0
    result = runner.invoke(app, ["tfrecords", *common, "--image-size", "16", "--records-per-shard", "50"])
    assert result.exit_code == 0, result.output
    assert (run / SHARD_DIR / INDEX_FILE).exists()
    result = runner.invoke(app, ["train-cnns", *common, "--models", "small:16", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert "TFRecord shards" in result.output
    oof = pd.read_parquet(run / "cnn" / "small" / "oof.parquet")
    train_ids = load_dataset(tiny_cohort).table.query("split == 'train'")["image_id"]
    assert sorted(oof["image_id"]) == sorted(train_ids) and oof["prob"].between(0, 1).all()
