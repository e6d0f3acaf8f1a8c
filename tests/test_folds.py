import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from errors import UserError
from metadata.folds import attach_folds, cut_chaining_links, fold_groups, source_folds, triple_stratified_folds


def _cohort(seed: int = 0, patients: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        n = int(1 + rng.poisson(5))
        risk = rng.random() < 0.2
        for i in range(n):
            rows.append({"image_id": f"img{p}_{i}", "patient_id": f"p{p}", "target": int(risk and rng.random() < 0.3)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [3, 5])
def test_no_patient_in_two_folds_and_every_image_once(k: int) -> None:
    train = _cohort()
    folds = triple_stratified_folds(train, k=k, seed=1)
    assert list(folds["image_id"]) == list(train["image_id"])
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    assert sorted(folds["fold"].unique()) == list(range(k))


def test_fold_target_rate_and_size_balanced() -> None:
    train = _cohort(seed=3)
    folds = triple_stratified_folds(train, k=5, seed=0).assign(target=train["target"])
    overall = train["target"].mean()
    rates = folds.groupby("fold")["target"].mean()
    # Stated tolerance: each fold's melanoma rate within 35% (relative) of the overall rate.
    assert (abs(rates - overall) <= 0.35 * overall).all(), rates
    sizes = folds.groupby("fold").size()
    assert sizes.max() <= 1.25 * sizes.min(), sizes
    per_patient = folds.groupby(["fold", "patient_id"]).size().groupby("fold").mean()
    assert per_patient.max() <= 1.3 * per_patient.min(), per_patient


def test_same_seed_same_folds_other_seed_differs() -> None:
    train = _cohort()
    a = triple_stratified_folds(train, k=5, seed=4)
    b = triple_stratified_folds(train, k=5, seed=4)
    c = triple_stratified_folds(train, k=5, seed=5)
    assert a.equals(b)
    assert not a["fold"].equals(c["fold"])


def test_too_few_patients_is_refused() -> None:
    train = _cohort(patients=3)
    with pytest.raises(UserError, match="lower --k"):
        triple_stratified_folds(train, k=5)


def test_attach_folds_refuses_uncovered_rows() -> None:
    train = _cohort(patients=20).assign(split="train")
    folds = triple_stratified_folds(train, k=3)
    with pytest.raises(UserError, match="re-run `folds`"):
        attach_folds(train, folds.iloc[1:], "RUN/folds.parquet")


def test_duplicate_images_of_different_patients_share_a_fold() -> None:
    train = _cohort(patients=60)
    first_of = train.groupby("patient_id")["image_id"].first()
    pairs = pd.DataFrame(
        {"image_id_a": [first_of["p1"], first_of["p10"]], "image_id_b": [first_of["p2"], first_of["p11"]],
         "kind": ["exact", "near"], "distance": [0, 3]}
    )
    groups = fold_groups(train, pairs)
    for seed in range(5):
        folds = triple_stratified_folds(train, k=5, seed=seed, groups=groups).set_index("patient_id")["fold"]
        assert folds.groupby(level=0).nunique().max() == 1
        assert folds["p1"].iloc[0] == folds["p2"].iloc[0] and folds["p10"].iloc[0] == folds["p11"].iloc[0]


def test_leave_one_source_out() -> None:
    train = _cohort(patients=30).assign(source=lambda t: np.where(t["patient_id"].str[-1] < "5", "bcn", "ham"))
    folds = source_folds(train)
    assert folds.assign(source=train["source"]).groupby("fold")["source"].nunique().max() == 1
    assert folds["fold"].nunique() == 2
    with pytest.raises(UserError, match="at least 2 sources"):
        source_folds(train.assign(source="ham"))


def test_a_group_larger_than_a_fold_is_refused() -> None:
    train = _cohort(patients=40)
    chained = pd.Series(np.where(np.arange(len(train)) < len(train) // 2, "giant", train["patient_id"]), index=train.index)
    with pytest.raises(UserError, match="--no-dedup"):
        triple_stratified_folds(train, k=5, groups=chained)


def test_the_published_isic2020_duplicate_list_keeps_each_pair_in_one_fold(tiny_cohort: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cohort, data)
    train = pd.read_csv(data / "train.csv", dtype=str)
    first_of_patient = train.groupby("patient_id")["image_name"].first().to_numpy()
    listed = pd.DataFrame({"image_name_1": first_of_patient[0:12:2], "image_name_2": first_of_patient[1:12:2]})
    listed = pd.concat([listed, pd.DataFrame({"image_name_1": ["ISIC_not_here"], "image_name_2": [first_of_patient[0]]})])
    listed.to_csv(data / "ISIC_2020_Training_Duplicates.csv", index=False)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["folds", "--data", str(data), "--run", str(run), "--k", "3", "--no-dedup"])
    assert result.exit_code == 0, result.output
    assert "6 listed duplicate pair(s) kept within one fold (1 listed pair(s) name an image not in this data)" in " ".join(result.output.split())
    fold = pd.read_parquet(run / "folds.parquet").set_index("image_id")["fold"]
    assert (fold.loc[listed["image_name_1"].iloc[:6]].to_numpy() == fold.loc[listed["image_name_2"].iloc[:6]].to_numpy()).all()


def test_a_patient_with_thousands_of_lesions_folds_at_k5() -> None:
    """ISIC 2024 has patients with thousands of lesions; one real patient larger than a fold is no error."""
    rng = np.random.default_rng(0)
    counts = np.r_[3000, 1500, rng.integers(1, 60, 200)]
    patient = np.repeat([f"p{i}" for i in range(len(counts))], counts)
    train = pd.DataFrame({"image_id": [f"i{i}" for i in range(len(patient))], "patient_id": patient,
                          "target": (rng.random(len(patient)) < 0.01).astype(int)})
    folds = triple_stratified_folds(train, k=5, seed=0)
    assert sorted(folds["fold"].unique()) == [0, 1, 2, 3, 4]
    assert folds.groupby("patient_id")["fold"].nunique().max() == 1
    chained = pd.Series(np.where(np.isin(patient, ["p0", "p1", "p2"]), "chain", patient), index=train.index)
    with pytest.raises(UserError, match="joins 3 patients through duplicate images"):
        triple_stratified_folds(train, k=5, seed=0, groups=chained)


def test_near_duplicate_links_that_would_chain_many_patients_are_cut() -> None:
    """Look-alike lesions of different patients chain through near-duplicate links; exact copies never are cut."""
    train = _cohort(patients=40)
    first_of = train.groupby("patient_id")["image_id"].first()
    chain = [first_of[f"p{i}"] for i in range(1, 11)]  # p1~p2~...~p10 through near links
    near = pd.DataFrame({"image_id_a": chain[:-1], "image_id_b": chain[1:], "kind": "near", "distance": [2, 1] * 4 + [2]})
    exact = pd.DataFrame({"image_id_a": [first_of["p20"]], "image_id_b": [first_of["p21"]], "kind": "exact", "distance": [0]})
    kept, cut = cut_chaining_links(train, pd.concat([near, exact], ignore_index=True), max_patients=3)
    assert exact.iloc[0].to_dict() in kept.to_dict("records")
    groups = fold_groups(train, kept)
    patients_per_group = train.groupby(groups.to_numpy())["patient_id"].nunique()
    assert patients_per_group.max() == 3
    assert len(kept) + len(cut) == len(near) + 1
    assert (cut["distance"] >= kept.loc[kept["kind"] == "near", "distance"].min()).all()
    # every link that was cut would indeed have joined two groups that were already apart
    assert (groups.set_axis(train["image_id"]).loc[cut["image_id_a"]].to_numpy() != groups.set_axis(train["image_id"]).loc[cut["image_id_b"]].to_numpy()).all()
