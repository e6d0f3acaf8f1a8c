"""Other labelled datasets in every fold (`folds --extra-data`): trained on, never validated, scored or submitted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from metadata.dataset import load_dataset
from metadata.extra_data import extra_training_rows
from metadata.schema import DIAGNOSES, DIAGNOSIS_ALIASES
from metadata.sources import DataSource
from tests.conftest import SHARED_DATA, synthetic_cohort


@pytest.fixture(scope="module")
def extra_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another cohort, plus one of the run's training images under a new name (a perceptual copy) and one
    image under the id of a run image (the same id)."""
    extra = synthetic_cohort(tmp_path_factory, "extra_cohort", patients=20, image_size=16, seed=11)
    run_rows = pd.read_csv(tiny_cohort / "train.csv")
    extra_rows = pd.read_csv(extra / "train.csv")
    copied, same_id = run_rows.iloc[0], run_rows.iloc[1]
    shutil.copy(tiny_cohort / "jpeg" / "train" / f"{copied['image_name']}.jpg", extra / "jpeg" / "train" / "ISIC_copy.jpg")
    shutil.copy(extra / "jpeg" / "train" / f"{extra_rows['image_name'].iloc[0]}.jpg", extra / "jpeg" / "train" / f"{same_id['image_name']}.jpg")
    added = pd.DataFrame([{**extra_rows.iloc[0].to_dict(), "image_name": "ISIC_copy"}, {**extra_rows.iloc[0].to_dict(), "image_name": same_id["image_name"]}])
    pd.concat([extra_rows, added], ignore_index=True).to_csv(extra / "train.csv", index=False)
    return extra


@pytest.fixture(scope="module")
def extra_run(tiny_cohort: Path, extra_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folds --extra-data -> train-cnns -> stack -> report -> submit, through the CLI."""
    run = tmp_path_factory.mktemp("extra_run")
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    for args in (
        ["folds", *common, "--k", "2", "--extra-data", str(extra_dir)],
        ["train-cnns", *common, "--models", "small", "--image-size", "16", "--epochs", "1", "--deterministic"],
        ["stack", *common],
        ["report", *common, "--bootstrap", "20"],
        ["submit", "--run", str(run), "--submission-format", "isic2020"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return run


def test_duplicates_of_the_run_are_dropped_and_counted(extra_run: Path, extra_dir: Path) -> None:
    summary = json.loads((extra_run / "extra_data.json").read_text())
    (source,) = summary["sources"]
    assert source["dropped_same_id_as_the_run"] == 1 and source["dropped_perceptual_copies_of_the_run"] == 1
    extra_table = load_dataset(extra_dir).table
    labelled = int(extra_table["target"].notna().sum())
    assert source["unlabelled"] == int(extra_table["target"].isna().sum()) > 0  # the extra set's test images
    assert source["kept"] == summary["rows"] == labelled - 2
    rows = pd.read_parquet(extra_run / "extra_data.parquet")
    assert "x0_ISIC_copy" not in set(rows["image_id"]) and rows["image_id"].str.startswith("x0_").all()


def test_extra_rows_reach_no_output_of_the_run(extra_run: Path, tiny_cohort: Path) -> None:
    """Every table, report and submission of the run holds the run's own image ids only."""
    table = load_dataset(tiny_cohort).table
    own = set(table["image_id"])
    extra_ids = set(pd.read_parquet(extra_run / "extra_data.parquet")["image_id"])
    checked = 0
    for path in [*extra_run.rglob("*.parquet"), *extra_run.rglob("*.csv")]:
        if path.name == "extra_data.parquet":
            continue
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
        for column in {"image_id", "image_name", "isic_id"} & set(frame.columns):
            assert set(frame[column].astype(str)) <= own, path
            checked += 1
    assert checked >= 5  # folds, the CNN's OOF and test predictions, the stack's OOF, the submission
    report = json.loads((extra_run / "report.json").read_text())
    assert report["n_images"] == int((table["split"] == "train").sum())
    assert not any(image_id in (extra_run / "report.json").read_text() for image_id in extra_ids)
    stack_rows = pd.read_parquet(extra_run / "stack" / "oof.parquet")
    assert set(stack_rows["image_id"]) == set(table.loc[table["split"] == "train", "image_id"])


def test_history_report_and_bundle_say_what_extra_data_trained(extra_run: Path, extra_dir: Path, tmp_path: Path) -> None:
    kept = json.loads((extra_run / "extra_data.json").read_text())["rows"]
    for fold in range(2):
        history = json.loads((extra_run / "cnn" / "small" / f"fold{fold}" / "history.json").read_text())
        assert history["extra_data"] == {str(extra_dir): kept}
    report = json.loads((extra_run / "report.json").read_text())
    assert report["extra_data"]["images_per_model_and_fold"] == {"small": {"fold 0": kept, "fold 1": kept}}
    assert "Extra training data" in (extra_run / "report.md").read_text()
    result = CliRunner().invoke(app, ["export", "--run", str(extra_run), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    (cnn,) = json.loads((tmp_path / "bundle" / "config.json").read_text())["cnns"]
    assert cnn["name"] == "small" and cnn["extra_data"] == {str(extra_dir): kept}


def test_extra_data_spec_is_checked(tiny_cohort: Path, tmp_path: Path) -> None:
    assert DataSource.parse("d,format=ham10000").format == "ham10000"
    result = CliRunner().invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(tmp_path), "--extra-data", "d,colour=red"])
    assert result.exit_code == 2 and "DIR,format=NAME,metadata=CSV" in result.output


def test_diagnosis_vocabulary_maps_every_class_of_the_shared_layouts() -> None:
    """HAM10000's 7 `dx`, the isic9 folders' 9, ISIC 2019's one-hot 8 + UNK and ISIC 2020's strings: one vocabulary."""
    spellings = {
        "ham10000": ["nv", "bkl", "mel", "bcc", "akiec", "vasc", "df"],
        "isic9": ["actinic keratosis", "basal cell carcinoma", "dermatofibroma", "melanoma", "nevus",
                  "pigmented benign keratosis", "seborrheic keratosis", "squamous cell carcinoma", "vascular lesion"],
        "isic2019": ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"],
        "isic2020": ["unknown", "nevus", "melanoma", "seborrheic keratosis", "lentigo NOS", "lichenoid keratosis",
                     "solar lentigo", "atypical melanocytic proliferation", "cafe-au-lait macule"],
    }
    for layout, names in spellings.items():
        mapped = [DIAGNOSIS_ALIASES.get(name.lower()) for name in names]
        assert all(code in DIAGNOSES for code in mapped), (layout, dict(zip(names, mapped)))
    assert {DIAGNOSIS_ALIASES[n.lower()] for n in spellings["isic9"]} == set(DIAGNOSES) - {"UNK"}


@pytest.mark.skipif(not SHARED_DATA.exists(), reason=f"the shared ISIC data ({SHARED_DATA}) is absent")
def test_isic9_images_also_in_ham10000_are_dropped_from_the_extra_set() -> None:
    """The README of the shared data counts 743 isic9 images that are also HAM10000's: by id or hash, none is kept."""
    from metadata.duplicates import fingerprint_images

    ham = load_dataset(SHARED_DATA / "ham10000").table
    ham_prints, _ = fingerprint_images(ham["image_id"].tolist(), ham["image_path"].tolist())
    extra = extra_training_rows([DataSource(SHARED_DATA / "isic9")], ham, ham_prints)
    (counts,) = extra.counts
    dropped = counts["dropped_same_id_as_the_run"] + counts["dropped_perceptual_copies_of_the_run"]
    assert dropped >= 743 and counts["kept"] == counts["images"] - counts["unlabelled"] - dropped - counts["unreadable"]
    assert not set(extra.rows["source_image_id"]) & set(ham["image_id"])
