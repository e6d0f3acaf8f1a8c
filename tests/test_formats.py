"""Each published layout read into the canonical table, on tiny fixtures written per test."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from errors import DataError, UserError
from fusion.patient_context import check_feature_columns, extra_numeric_features
from metadata.dataset import drop_skipped, load_dataset, record_skipped
from metadata.formats import DATASET_FORMATS
from metadata.images import read_image_bytes
from metadata.schema import CANONICAL_COLUMNS


def _jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A small JPEG of random pixels (a different picture per seed)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_images(folder: Path, names: list[str], suffix: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        (folder / f"{name}{suffix}").write_bytes(_jpeg_bytes(seed))


def _by_id(table: pd.DataFrame) -> pd.DataFrame:
    return table.set_index("image_id")


# ---- ISIC 2019 --------------------------------------------------------------------------------

ISIC2019_IDS = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]


def _write_isic2019(root: Path, images: bool = True) -> Path:
    onehot = {code: [0.0] * 4 for code in ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")}
    for row, code in enumerate(("NV", "MEL", "BCC", "UNK")):
        onehot[code][row] = 1.0
    pd.DataFrame({"image": ISIC2019_IDS, **onehot}).to_csv(root / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame(
        {
            "image": ISIC2019_IDS,
            "age_approx": [55.0, 30.0, None, 70.0],
            "anatom_site_general": ["anterior torso", "head/neck", "", "lower extremity"],
            "lesion_id": ["BCN_0000001", "HAM_0000118", "", "BCN_0000001"],
            "gender": ["male", "female", "", "male"],
        }
    ).to_csv(root / "ISIC_2019_Training_Metadata.csv", index=False)
    if images:
        _write_images(root / "ISIC_2019_Training_Input", ISIC2019_IDS)
    return root


def test_isic2019_is_detected_and_unified(tmp_path: Path) -> None:
    loaded = load_dataset(_write_isic2019(tmp_path))
    assert loaded.format_name == "isic2019"
    table = _by_id(loaded.table)
    assert list(loaded.table.columns[: len(CANONICAL_COLUMNS)]) == list(CANONICAL_COLUMNS)
    assert table["diagnosis"].astype(str).tolist() == ["NV", "MEL", "BCC", "UNK"]
    assert table["target"].tolist() == [0, 1, 0, 0]
    assert (table["split"] == "train").all()
    # patient_id: lesion id, else image id
    assert table["patient_id"].tolist() == ["BCN_0000001", "HAM_0000118", "ISIC_0000002", "BCN_0000001"]
    assert table.loc["ISIC_0000000", "lesion_id"] == "BCN_0000001"
    assert pd.isna(table.loc["ISIC_0000002", "lesion_id"])
    assert table["source"].tolist() == ["isic2019:BCN", "isic2019:HAM", "isic2019", "isic2019:BCN"]
    # missing values stay missing, present ones unified
    assert table.loc["ISIC_0000000", "site"] == "anterior torso"
    assert table.loc["ISIC_0000000", "sex"] == "male"
    assert table.loc["ISIC_0000000", "age"] == 55.0
    for column in ("age", "sex", "site"):
        assert pd.isna(table.loc["ISIC_0000002", column])
    assert all(Path(p).is_file() for p in table["image_path"])
    assert loaded.skipped.empty and loaded.unlisted_images == []


def test_isic2019_metadata_only_has_no_image_paths(tmp_path: Path) -> None:
    loaded = load_dataset(_write_isic2019(tmp_path, images=False))
    assert loaded.format_name == "isic2019"
    assert len(loaded.table) == 4
    assert loaded.table["image_path"].isna().all()
    assert loaded.skipped.empty


def test_isic2019_two_diagnoses_on_one_row_is_refused(tmp_path: Path) -> None:
    _write_isic2019(tmp_path)
    truth = pd.read_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv")
    truth.loc[2, "MEL"] = 1.0  # row 2 is now both MEL and BCC
    truth.to_csv(tmp_path / "ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(DataError, match=r"ISIC_2019_Training_GroundTruth\.csv: row 4 has 2 diagnosis columns"):
        load_dataset(tmp_path)


# ---- HAM10000 / ISIC 2018 ---------------------------------------------------------------------

def test_ham10000_metadata_is_unified(tmp_path: Path) -> None:
    ids = ["ISIC_0027419", "ISIC_0025030", "ISIC_0026769", "ISIC_0025661"]
    pd.DataFrame(
        {
            "lesion_id": ["HAM_0000118", "HAM_0000118", "HAM_0002730", "HAM_0001466"],
            "image_id": ids,
            "dx": ["akiec", "akiec", "mel", "nv"],
            "dx_type": ["histo", "histo", "histo", "follow_up"],
            "age": ["80.0", "80.0", "0.0", "60.0"],
            "sex": ["male", "male", "unknown", "female"],
            "localization": ["scalp", "scalp", "back", "unknown"],
        }
    ).to_csv(tmp_path / "HAM10000_metadata.csv", index=False)
    _write_images(tmp_path / "images", ids)
    loaded = load_dataset(tmp_path)
    assert loaded.format_name == "ham10000"
    table = _by_id(loaded.table)
    assert "dx_type" not in table.columns and "dx" not in table.columns
    assert table["diagnosis"].astype(str).tolist() == ["AK", "AK", "MEL", "NV"]
    assert table["target"].tolist() == [0, 0, 1, 0]
    assert table["patient_id"].tolist() == ["HAM_0000118", "HAM_0000118", "HAM_0002730", "HAM_0001466"]
    assert table["lesion_id"].tolist() == table["patient_id"].tolist()
    assert table.loc["ISIC_0027419", "site"] == "head/neck"
    assert table.loc["ISIC_0026769", "site"] == "posterior torso"
    assert pd.isna(table.loc["ISIC_0025661", "site"])
    assert pd.isna(table.loc["ISIC_0026769", "age"]) and table.loc["ISIC_0025661", "age"] == 60.0
    assert pd.isna(table.loc["ISIC_0026769", "sex"])
    assert (table["source"] == "ham10000").all()
    assert all(Path(p).is_file() for p in table["image_path"])


def test_isic2018_onehot_ground_truth_alone(tmp_path: Path) -> None:
    ids = ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308"]
    pd.DataFrame(
        {
            "image": ids,
            "MEL": [0.0, 1.0, 0.0],
            "NV": [1.0, 0.0, 0.0],
            "BCC": [0.0, 0.0, 0.0],
            "AKIEC": [0.0, 0.0, 1.0],
            "BKL": [0.0, 0.0, 0.0],
            "DF": [0.0, 0.0, 0.0],
            "VASC": [0.0, 0.0, 0.0],
        }
    ).to_csv(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    _write_images(tmp_path / "ISIC2018_Task3_Training_Input", ids)
    (tmp_path / "ISIC2018_Task3_Training_Input" / "LICENSE.txt").write_text("not an image")
    loaded = load_dataset(tmp_path)
    assert loaded.format_name == "ham10000"
    table = _by_id(loaded.table)
    assert table["diagnosis"].astype(str).tolist() == ["NV", "MEL", "AK"]
    assert table["target"].tolist() == [0, 1, 0]
    assert table["patient_id"].tolist() == ids  # no lesion ids: each image is its own patient
    assert table["lesion_id"].isna().all() and table["age"].isna().all()
    assert table["sex"].isna().all() and table["site"].isna().all()
    assert all(Path(p).parent.name == "ISIC2018_Task3_Training_Input" for p in table["image_path"])
    assert loaded.unlisted_images == []


# ---- ISIC 2024 (SLICE-3D) ---------------------------------------------------------------------

def _isic2024_frame(ids: list[str], patients: list[str], target: list[int] | None) -> pd.DataFrame:
    n = len(ids)
    frame = pd.DataFrame(
        {
            "isic_id": ids,
            "patient_id": patients,
            "age_approx": [60.0, None, 45.0][:n],
            "sex": ["male", "female", ""][:n],
            "anatom_site_general": ["posterior torso", "lower extremity", ""][:n],
            "tbp_lv_A": [20.5, 18.25, 22.0][:n],
            "tbp_lv_areaMM2": [3.1, None, 7.4][:n],
            "tbp_lv_location": ["Torso Back Top Third", "Left Leg - Lower", "Unknown"][:n],
            "attribution": ["Memorial Sloan Kettering Cancer Center", "ACEMID MIA", "ViDIR Group"][:n],
        }
    )
    if target is not None:
        frame.insert(1, "target", target)
        frame["iddx_full"] = ["Benign", "Malignant::Malignant melanocytic proliferations (Melanoma)", "Benign"][:n]
        frame["mel_thick_mm"] = [None, 0.4, None][:n]
    return frame


def _write_hdf5(file: Path, images: dict[str, bytes], as_void: bool = True) -> None:
    with h5py.File(file, "w") as handle:
        for key, data in images.items():
            if as_void:
                handle.create_dataset(key, data=np.void(data))
            else:
                handle[key] = np.bytes_(data)  # the Kaggle files hold a bytes scalar per id


def _write_isic2024(root: Path, as_void: bool = True) -> dict[str, bytes]:
    train = _isic2024_frame(["ISIC_0015670", "ISIC_0015845", "ISIC_0015864"], ["IP_1", "IP_1", "IP_2"], [0, 1, 0])
    test = _isic2024_frame(["ISIC_0015657", "ISIC_0015729"], ["IP_3", "IP_4"], None)
    train.to_csv(root / "train-metadata.csv", index=False)
    test.to_csv(root / "test-metadata.csv", index=False)
    images = {i: _jpeg_bytes(seed) for seed, i in enumerate([*train["isic_id"], *test["isic_id"]])}
    _write_hdf5(root / "train-image.hdf5", {i: images[i] for i in train["isic_id"]}, as_void)
    _write_hdf5(root / "test-image.hdf5", {i: images[i] for i in test["isic_id"]}, as_void)
    return images


@pytest.mark.parametrize("as_void", [True, False], ids=["void", "bytes-scalar"])
def test_isic2024_hdf5_images_and_numeric_extras(tmp_path: Path, as_void: bool) -> None:
    images = _write_isic2024(tmp_path, as_void)
    loaded = load_dataset(tmp_path)
    assert loaded.format_name == "isic2024"
    table = _by_id(loaded.table)
    assert table["split"].value_counts().to_dict() == {"train": 3, "test": 2}
    assert table.loc[table["split"] == "train", "target"].tolist() == [0, 1, 0]
    assert table.loc[table["split"] == "test", "target"].isna().all()
    assert table.loc["ISIC_0015845", "patient_id"] == "IP_1"
    assert table.loc["ISIC_0015670", "source"] == "isic2024:Memorial Sloan Kettering Cancer Center"
    assert pd.isna(table.loc["ISIC_0015845", "age"]) and pd.isna(table.loc["ISIC_0015864", "site"])
    for image_id, data in images.items():
        path = table.loc[image_id, "image_path"]
        split = table.loc[image_id, "split"]
        assert path == f"{tmp_path.resolve() / f'{split}-image.hdf5'}#{image_id}"
        assert read_image_bytes(path) == data
    # tbp_lv_* numbers kept as floats (missing stays NaN); label-derived and text columns are not
    assert table["tbp_lv_A"].dtype == float and table["tbp_lv_areaMM2"].dtype == float
    assert table.loc["ISIC_0015670", "tbp_lv_A"] == 20.5 and pd.isna(table.loc["ISIC_0015845", "tbp_lv_areaMM2"])
    assert "iddx_full" not in table.columns and "mel_thick_mm" not in table.columns
    assert sorted(extra_numeric_features(loaded.table).columns) == ["tbp_lv_A", "tbp_lv_areaMM2"]


def test_isic2024_stray_text_in_a_numeric_column_is_refused(tmp_path: Path) -> None:
    _write_isic2024(tmp_path)
    train = pd.read_csv(tmp_path / "train-metadata.csv", dtype=str, keep_default_na=False)
    train.loc[1, "tbp_lv_A"] = "n.a."
    train.to_csv(tmp_path / "train-metadata.csv", index=False)
    with pytest.raises(DataError, match=r"train-metadata\.csv: row 3 has tbp_lv_A='n\.a\.'"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("column", ["iddx_full", "mel_thick_mm", "dx_type", "target", "diagnosis"])
def test_label_derived_columns_are_never_features(column: str) -> None:
    with pytest.raises(UserError, match=column):
        check_feature_columns(["age", column])
    check_feature_columns(["age", "tbp_lv_A"])


def test_isic2024_missing_hdf5_key(tmp_path: Path) -> None:
    images = _write_isic2024(tmp_path)
    train_ids = ["ISIC_0015670", "ISIC_0015845", "ISIC_0015864"]
    _write_hdf5(tmp_path / "train-image.hdf5", {i: images[i] for i in train_ids if i != "ISIC_0015845"})
    with pytest.raises(DataError, match="ISIC_0015845"):
        load_dataset(tmp_path)
    loaded = load_dataset(tmp_path, on_bad_image="skip")
    assert loaded.skipped["image_id"].tolist() == ["ISIC_0015845"]
    assert "ISIC_0015845" not in set(loaded.table["image_id"])
    assert len(loaded.table) == 4
    with pytest.raises(OSError, match="ISIC_0015845"):
        read_image_bytes(f"{tmp_path / 'train-image.hdf5'}#ISIC_0015845")


# ---- Class folders ----------------------------------------------------------------------------

def _write_class_folders(root: Path) -> Path:
    _write_images(root / "Train" / "melanoma", ["a"])
    _write_images(root / "Train" / "nevus", ["b"])
    _write_images(root / "Train" / "seborrheic keratosis", ["c"])
    _write_images(root / "Test" / "melanoma", ["d"])
    shutil.copy(root / "Train" / "melanoma" / "a.jpg", root / "Train" / "nevus" / "a(1).jpg")
    (root / "Train" / "nevus" / "e.jpg").write_bytes(_jpeg_bytes(10))
    (root / "Test" / "melanoma" / "e.jpg").write_bytes(_jpeg_bytes(11))
    (root / "Train" / "nevus" / ".DS_Store").write_bytes(b"\0")
    return root


def test_class_folders_with_repeated_file_names(tmp_path: Path) -> None:
    loaded = load_dataset(_write_class_folders(tmp_path))
    assert loaded.format_name == "class-folders"
    table = _by_id(loaded.table)
    assert sorted(table.index) == sorted(["a", "a(1)", "b", "c", "d", "e~train~NV", "e~test~MEL"])
    assert table.loc["a", "diagnosis"] == "MEL" and table.loc["a(1)", "diagnosis"] == "NV"
    assert table.loc["c", "diagnosis"] == "BKL"
    assert table.loc[["a", "a(1)", "b", "c", "d"], "target"].tolist() == [1, 0, 0, 0, 1]
    assert table.loc["e~train~NV", "split"] == "train" and table.loc["e~train~NV", "target"] == 0
    assert table.loc["e~test~MEL", "split"] == "test" and table.loc["e~test~MEL", "target"] == 1
    # a copy "a(1)" belongs with "a"; the repeated "e" files share the base name as patient
    assert table.loc["a(1)", "patient_id"] == "a"
    assert table.loc["e~train~NV", "patient_id"] == table.loc["e~test~MEL", "patient_id"] == "e"
    assert Path(table.loc["e~test~MEL", "image_path"]).parent == (tmp_path / "Test" / "melanoma").resolve()
    assert table[["age", "sex", "site", "lesion_id"]].isna().all().all()
    assert (table["source"] == "isic-classes").all()


def test_class_folders_joined_to_a_metadata_csv(tmp_path: Path) -> None:
    _write_class_folders(tmp_path)
    metadata = tmp_path / "meta.csv"
    pd.DataFrame(
        {
            "image": ["a", "b", "zzz"],
            "age_approx": [40.0, None, 20.0],
            "anatom_site_general": ["anterior torso", "upper extremity", "head/neck"],
            "lesion_id": ["BCN_0000007", "", "HAM_1"],
            "gender": ["female", "male", "male"],
        }
    ).to_csv(metadata, index=False)
    table = _by_id(load_dataset(tmp_path, metadata=metadata).table)
    assert table.loc["a", ["age", "sex", "site"]].tolist() == [40.0, "female", "anterior torso"]
    assert table.loc["a(1)", ["age", "sex", "site"]].tolist() == [40.0, "female", "anterior torso"]
    assert table.loc["a", "patient_id"] == "BCN_0000007" and table.loc["a", "source"] == "isic-classes:BCN"
    assert pd.isna(table.loc["b", "age"]) and table.loc["b", "sex"] == "male"
    assert table.loc["b", "patient_id"] == "b" and table.loc["b", "source"] == "isic-classes"
    assert table.loc[["c", "d", "e~train~NV"], ["age", "sex", "site"]].isna().all().all()
    assert "zzz" not in table.index


def test_class_folders_metadata_without_image_column_is_refused(tmp_path: Path) -> None:
    _write_class_folders(tmp_path)
    metadata = tmp_path / "meta.csv"
    pd.DataFrame({"isic_id": ["a"], "age_approx": [40.0]}).to_csv(metadata, index=False)
    with pytest.raises(DataError, match=r"meta\.csv: missing required column\(s\) \['image'\]"):
        load_dataset(tmp_path, metadata=metadata)


def test_unknown_class_folder_is_named(tmp_path: Path) -> None:
    _write_class_folders(tmp_path)
    _write_images(tmp_path / "Train" / "freckle", ["f"])
    with pytest.raises(DataError, match="freckle"):
        load_dataset(tmp_path)


# ---- SIIM-ISIC 2020 ---------------------------------------------------------------------------

SIIM2020 = pd.DataFrame(
    {
        "image_name": ["ISIC_2637011", "ISIC_0015719", "ISIC_0052212", "ISIC_0068279"],
        "patient_id": ["IP_7279968", "IP_3075186", "IP_2842074", "IP_7279968"],
        "lesion_id": ["IL_7972535", "IL_4649854", "IL_9087444", "IL_4255399"],
        "sex": ["male", "female", "female", ""],
        "age_approx": ["45.0", "45.0", "", "50.0"],
        "anatom_site_general_challenge": ["head/neck", "upper extremity", "torso", ""],
        "diagnosis": ["unknown", "melanoma", "seborrheic keratosis", "nevus"],
        "benign_malignant": ["benign", "malignant", "benign", "benign"],
        "target": [0, 1, 0, 0],
    }
)


def test_siim2020_ground_truth_alone_is_metadata_only(tmp_path: Path) -> None:
    SIIM2020.to_csv(tmp_path / "ISIC_2020_Training_GroundTruth_v2.csv", index=False)
    loaded = load_dataset(tmp_path)
    assert loaded.format_name == "isic2020"
    table = _by_id(loaded.table)
    assert len(table) == 4 and (table["split"] == "train").all()
    assert table["image_path"].isna().all()
    assert table["diagnosis"].astype(str).tolist() == ["UNK", "MEL", "BKL", "NV"]
    assert table["target"].tolist() == [0, 1, 0, 0]
    assert table.loc["ISIC_0052212", "site"] == "torso"
    assert pd.isna(table.loc["ISIC_0052212", "age"]) and pd.isna(table.loc["ISIC_0068279", "sex"])
    assert table.loc["ISIC_0068279", "patient_id"] == "IP_7279968"


def test_siim2020_patient_in_train_and_test_is_refused(tmp_path: Path) -> None:
    SIIM2020.to_csv(tmp_path / "train.csv", index=False)
    test = SIIM2020.drop(columns=["diagnosis", "benign_malignant", "target"]).iloc[:1]
    test.assign(image_name=["ISIC_9999999"]).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DataError, match="IP_7279968"):
        load_dataset(tmp_path)


# ---- Layout choice ----------------------------------------------------------------------------

def test_unknown_format_name_lists_the_known_ones(tmp_path: Path) -> None:
    _write_isic2019(tmp_path)
    with pytest.raises(DataError, match="isic-2017") as error:
        load_dataset(tmp_path, format_name="isic-2017")
    assert all(name in str(error.value) for name in DATASET_FORMATS)


@pytest.mark.parametrize("name", sorted(DATASET_FORMATS))
def test_named_format_without_its_files_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "unrelated.txt").write_text("no layout here")
    with pytest.raises(DataError, match=str(tmp_path.resolve())):
        load_dataset(tmp_path, format_name=name)


def test_named_format_is_used_instead_of_detection(tmp_path: Path) -> None:
    SIIM2020.to_csv(tmp_path / "train.csv", index=False)
    _write_isic2019(tmp_path, images=False)  # detection alone would pick isic2020 first
    assert load_dataset(tmp_path).format_name == "isic2020"
    assert load_dataset(tmp_path, format_name="isic2019").format_name == "isic2019"


def test_folder_matching_no_layout_is_refused(tmp_path: Path) -> None:
    pd.DataFrame({"id": ["x"], "label": [1]}).to_csv(tmp_path / "labels.csv", index=False)
    _write_images(tmp_path / "pictures", ["x"])
    with pytest.raises(DataError, match="no known data layout") as error:
        load_dataset(tmp_path)
    assert all(name in str(error.value) for name in DATASET_FORMATS)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset(tmp_path / "absent")


# ---- Bad-image policy -------------------------------------------------------------------------

def test_skip_drops_and_records_missing_images(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    _write_isic2019(tmp_path / "data")
    (tmp_path / "data" / "ISIC_2019_Training_Input" / "ISIC_0000001.jpg").unlink()
    with pytest.raises(DataError, match="ISIC_0000001"):
        load_dataset(tmp_path / "data")
    loaded = load_dataset(tmp_path / "data", on_bad_image="skip")
    assert loaded.skipped.to_dict(orient="records") == [{"image_id": "ISIC_0000001", "reason": "image file missing"}]
    assert "ISIC_0000001" not in set(loaded.table["image_id"]) and len(loaded.table) == 3

    run = tmp_path / "run"
    run.mkdir()
    record_skipped(run, loaded.skipped)
    written = pd.read_csv(run / "skipped_images.csv", dtype=str)
    assert written.to_dict(orient="records") == [{"image_id": "ISIC_0000001", "reason": "image file missing"}]
    # a second record adds, without repeating ids
    merged = record_skipped(run, pd.DataFrame({"image_id": ["ISIC_0000001", "ISIC_0000003"], "reason": ["x", "y"]}))
    assert merged["image_id"].tolist() == ["ISIC_0000001", "ISIC_0000003"]
    full = load_dataset(tmp_path / "data", format_name="isic2019", on_bad_image="skip").table
    assert drop_skipped(full, run)["image_id"].tolist() == ["ISIC_0000000", "ISIC_0000002"]
    assert drop_skipped(full, tmp_path / "other-run").equals(full)


def test_unknown_bad_image_policy_is_refused(tmp_path: Path) -> None:
    _write_isic2019(tmp_path)
    with pytest.raises(DataError, match="on-bad-image"):
        load_dataset(tmp_path, on_bad_image="ignore")
