from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from errors import DataError
from metadata.dataset import load_dataset

TRAIN = pd.DataFrame(
    {
        "image_name": ["ISIC_1", "ISIC_2", "ISIC_3"],
        "patient_id": ["IP_1", "IP_1", "IP_2"],
        "sex": ["male", "male", ""],
        "age_approx": [45.0, 45.0, None],
        "anatom_site_general_challenge": ["torso", None, "head/neck"],
        "diagnosis": ["nevus", "melanoma", "nevus"],
        "benign_malignant": ["benign", "malignant", "benign"],
        "target": [0, 1, 0],
    }
)
TEST = TRAIN.drop(columns=["diagnosis", "benign_malignant", "target"]).assign(
    image_name=["ISIC_4", "ISIC_5", "ISIC_6"], patient_id=["IP_3", "IP_3", "IP_4"]
)


def _write(root: Path, train: pd.DataFrame = TRAIN, test: pd.DataFrame = TEST, images: bool = True) -> Path:
    for split, frame in (("train", train), ("test", test)):
        (root / "jpeg" / split).mkdir(parents=True, exist_ok=True)
        frame.to_csv(root / f"{split}.csv", index=False)
        if images:
            for name in frame["image_name"]:
                Image.new("RGB", (8, 8), (120, 80, 60)).save(root / "jpeg" / split / f"{name}.jpg")
    return root


def test_loads_canonical_table_with_missing_kept(tmp_path: Path) -> None:
    table = load_dataset(_write(tmp_path)).table
    assert len(table) == 6
    assert table["split"].value_counts().to_dict() == {"train": 3, "test": 3}
    train = table[table["split"] == "train"]
    assert train["target"].tolist() == [0, 1, 0]
    assert table["target"][table["split"] == "test"].isna().all()
    assert pd.isna(train["sex"].iloc[2]) and pd.isna(train["age"].iloc[2]) and pd.isna(train["site"].iloc[1])
    assert all(Path(p).exists() for p in table["image_path"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.drop(columns="patient_id"), "missing required column"),
        (lambda t: t.assign(age_approx=["old", 40, 50]), "not a number"),
        (lambda t: t.assign(anatom_site_general_challenge=["elbow", "torso", "torso"]), "elbow"),
        (lambda t: t.assign(image_name=["ISIC_1", "ISIC_1", "ISIC_3"]), "more than once"),
        (lambda t: t.assign(target=[0, 2, 0]), "0 or 1"),
        (lambda t: t.assign(patient_id=["IP_3", "IP_1", "IP_2"]), "both train and test"),
        (lambda t: t.assign(image_name=["../x", "ISIC_2", "ISIC_3"]), "looks like a path"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path: Path, mutate, message: str) -> None:
    _write(tmp_path, train=mutate(TRAIN.copy()))
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "jpeg" / "train" / "ISIC_2.jpg").unlink()
    with pytest.raises(DataError, match="ISIC_2.jpg"):
        load_dataset(tmp_path)


def test_empty_csv_and_unknown_layout(tmp_path: Path) -> None:
    _write(tmp_path)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="no known data layout"):
        load_dataset(tmp_path / "jpeg")
