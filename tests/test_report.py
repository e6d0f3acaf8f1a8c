"""The CV report on a run whose CNN outputs are written by hand (no training): one honest CNN with a
two-class diagnosis head, and one whose OOF predictions were made with the validation labels.

The leaked CNN is what a fold model refitted on all rows, or trained with its validation fold,
produces: near-perfect OOF scores that its own training-time validation never reached.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from ensemble.report import Bootstrap, build_report, write_report
from ensemble.run_files import load_run_predictions
from evaluation.metrics import roc_auc
from metadata.dataset import load_dataset
from metadata.folds import attach_folds
from rundir.io import write_json, write_table
from rundir.layout import RunLayout

HONEST_VAL_AUC_GAP = 0.04  # the honest CNN's best validation AUC is a little above its OOF AUC (TTA is not perfect)
LEAKED_VAL_AUCS = [0.62, 0.70]  # what the leaked CNN reached when validated honestly during training


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _write_cnn(run: Path, name: str, train: pd.DataFrame, test: pd.DataFrame, oof_prob: np.ndarray, val_aucs, head: bool) -> None:
    """The files `train-cnns` writes for one model: oof.parquet, test.parquet, fold<k>/history.json."""
    model_dir = run / "cnn" / name
    classes = {"prob_MEL": oof_prob, "prob_NV": 1 - oof_prob} if head else {}
    write_table(train[["image_id", "patient_id", "target", "fold"]].assign(prob=oof_prob, **classes), model_dir / "oof.parquet")
    rng = np.random.default_rng(len(name))
    folds = sorted(train["fold"].unique())
    test_frame = test[["image_id", "patient_id"]].assign(**{f"prob_fold{f}": rng.random(len(test)) for f in folds})
    test_prob = test_frame[[f"prob_fold{f}" for f in folds]].mean(axis=1)
    test_classes = {"prob_MEL": test_prob, "prob_NV": 1 - test_prob} if head else {}
    write_table(test_frame.assign(prob=test_prob, **test_classes), model_dir / "test.parquet")
    for fold in folds:
        in_fold = (train["fold"] == fold).to_numpy()
        history = {"model": name, "fold": int(fold), "config": {"epochs": 2}, "seconds": 1.0, "val_auc": val_aucs(in_fold)}
        write_json(history, model_dir / f"fold{fold}" / "history.json")


@pytest.fixture(scope="module")
def leaky_run(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folds (CLI) -> an honest and a leaked CNN (files) -> stack and report (CLI, with the data)."""
    from cli import app

    run = tmp_path_factory.mktemp("leaky_run")
    runner = CliRunner()
    result = runner.invoke(app, ["folds", "--data", str(cohort_dir), "--run", str(run), "--k", "3", "--seed", "7"])
    assert result.exit_code == 0, result.output
    table = load_dataset(cohort_dir).table
    train = attach_folds(table, pd.read_parquet(run / "folds.parquet"), "folds")
    test = table[table["split"] == "test"]
    target = train["target"].to_numpy(dtype=int)
    rng = np.random.default_rng(0)
    honest = _sigmoid(1.2 * target + rng.normal(size=len(train)) - 1)
    _write_cnn(
        run, "honest", train, test, honest,
        lambda rows: [roc_auc(target[rows], honest[rows]) + d for d in (-HONEST_VAL_AUC_GAP, HONEST_VAL_AUC_GAP)], head=True,
    )
    leaked = _sigmoid(8 * target + 0.5 * rng.normal(size=len(train)) - 4)
    _write_cnn(run, "leaky", train, test, leaked, lambda rows: LEAKED_VAL_AUCS, head=False)
    result = runner.invoke(app, ["stack", "--data", str(cohort_dir), "--run", str(run), "--seed", "7"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return run


@pytest.fixture(scope="module")
def report(leaky_run: Path) -> dict:
    return json.loads((leaky_run / "report.json").read_text())


def test_one_table_ranks_every_model_with_intervals(report: dict) -> None:
    entries = {e["name"]: e for e in report["entries"]}
    assert list(entries) == ["honest", "leaky", "mean_blend", "rank_blend", "logreg_stack", "lightgbm_stack"]
    assert report["n_folds"] == 3 and report["bootstrap"]["resampled"] == "patients"
    for entry in entries.values():
        for metric in ("auc", "pauc_80tpr"):
            low, high = entry[f"{metric}_ci"]
            assert low <= entry[metric] <= high
        assert len(entry["fold_auc"]) == 3 and entry["fold_auc_sd"] == pytest.approx(np.std(entry["fold_auc"]))
        assert all(0 <= entry[m] <= 1 for m in ("sens_at_90spec", "sens_at_95spec", "spec_at_90sens", "spec_at_95sens"))
        # Calibration is only reported for probabilities: not for the rank blend.
        assert (entry["ece"] is None) == (entry["name"] == "rank_blend")
    assert entries["leaky"]["auc"] > 0.99 and entries["honest"]["auc"] < 0.9


def test_stacks_are_tested_against_the_best_cnn(report: dict) -> None:
    comparisons = {(c["model"], c["metric"]): c for c in report["stack_vs_best_cnn"]}
    assert set(comparisons) == {(s, m) for s in ("logreg_stack", "lightgbm_stack") for m in ("auc", "pauc_80tpr")}
    entries = {e["name"]: e for e in report["entries"]}
    for (stack, metric), comparison in comparisons.items():
        assert comparison["versus"] == "leaky"  # the best CNN by OOF AUC
        assert comparison["difference"] == pytest.approx(entries[stack][metric] - entries["leaky"][metric])
        assert 0 < comparison["p_value"] <= 1


def test_leaked_oof_is_flagged_and_the_honest_cnn_is_not(report: dict) -> None:
    warnings = report["warnings"]
    above_validation = [w for w in warnings if "above the best validation AUC" in w]
    assert sorted(w.split(":")[0] for w in above_validation) == [f"leaky fold {f}" for f in range(3)]
    assert any(w.startswith("CNN leaky (OOF) alone has AUC") for w in warnings)
    assert any(w.startswith("stack feature cnn_leaky alone has AUC") for w in warnings)
    assert not [w for w in warnings if "honest" in w]
    features = {f["feature"]: f for f in report["stack_features"]}
    # The stacker adds nothing over the leaked feature: its CV AUC minus the feature's own AUC is about 0.
    assert features["cnn_leaky"]["single_feature_auc"] > 0.99
    assert abs(features["cnn_leaky"]["stack_auc_minus_single"]) < 0.01
    assert features["cnn_honest"]["stack_auc_minus_single"] > 0.05
    assert max(features, key=lambda f: features[f]["gain_share"] or 0).startswith("cnn_leaky")


def test_oof_folds_that_differ_from_the_run_folds_are_flagged(leaky_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(leaky_run, tmp_path / "run"))
    oof = pd.read_parquet(run / "cnn" / "honest" / "oof.parquet")
    oof.loc[:9, "fold"] = (oof.loc[:9, "fold"] + 1) % 3
    write_table(oof, run / "cnn" / "honest" / "oof.parquet")
    warnings = build_report(run, load_run_predictions(run), None, Bootstrap(n_boot=20))["warnings"]
    assert [w for w in warnings if w.startswith("honest: 10 OOF row(s) carry another fold")]


def test_subgroups_and_multiclass_from_the_data(report: dict) -> None:
    assert {s["variable"] for s in report["subgroups"]} == {"sex", "age band", "site"}
    for variable in ("sex", "age band", "site"):
        rows = [s for s in report["subgroups"] if s["variable"] == variable and s["model"] == "lightgbm_stack"]
        assert sum(s["n"] for s in rows) == report["n_images"]
        assert sum(s["n_melanoma"] for s in rows) == report["n_melanoma"]
    (head,) = report["multiclass"]  # the honest CNN's two-class head; the leaked one is binary
    assert head["name"] == "honest" and head["classes"] == ["MEL", "NV"]
    matrix = np.array(head["confusion_matrix"])
    assert matrix.sum() == report["n_images"] and matrix[0].sum() == report["n_melanoma"]
    assert head["class_auc"]["MEL"] == pytest.approx(next(e["auc"] for e in report["entries"] if e["name"] == "honest"))


def _labelled_test(cohort_dir: Path, source: str | None) -> pd.DataFrame:
    """The cohort with labels on its test rows, from `source` (None: the training source)."""
    table = load_dataset(cohort_dir).table
    test = table["split"] == "test"
    labels = pd.Series(np.random.default_rng(1).random(len(table)) < 0.2, index=table.index).astype(float)
    table["target"] = table["target"].where(~test, labels)
    if source is not None:
        table["source"] = table["source"].astype("string").where(~test, source)
    return table


@pytest.mark.parametrize("source", ["other_hospital", None])
def test_labelled_test_set_has_its_own_table_never_pooled(leaky_run: Path, cohort_dir: Path, source: str | None) -> None:
    table = _labelled_test(cohort_dir, source)
    report = build_report(leaky_run, load_run_predictions(leaky_run), table, Bootstrap(n_boot=50))
    test_set = report["test_set"]
    n_test = int((table["split"] == "test").sum())
    assert test_set["n_images"] == n_test and test_set["independent_source"] == (source is not None)
    assert {e["name"] for e in test_set["entries"]} == {e["name"] for e in report["entries"]}
    assert report["n_images"] == int((table["split"] == "train").sum())  # CV rows only
    assert "fold_auc" not in test_set["entries"][0]


def test_html_stands_alone_with_every_figure(leaky_run: Path, report: dict) -> None:
    page = (leaky_run / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page and "<script" not in page
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    captions = [caption for caption, _ in images]
    assert len(images) == 7 and any("per missingness pattern" in c for c in captions) and any("Subgroup" in c for c in captions) and any("importance" in c for c in captions)
    for _, png in images:
        with Image.open(io.BytesIO(base64.b64decode(png))) as image:
            assert image.format == "PNG" and min(image.size) > 100
    for warning in report["warnings"]:
        assert warning.replace("'", "&#x27;") in page


def test_markdown_has_the_same_tables(leaky_run: Path) -> None:
    page = (leaky_run / "report.html").read_text()
    markdown = (leaky_run / "report.md").read_text()
    titles = re.findall(r"<h2>([^<]+)</h2>\n<table>", page)
    assert titles and all(f"## {title.replace('&amp;', '&')}" in markdown for title in titles)
    assert "| lightgbm_stack | stack |" in markdown


def test_markdown_links_every_figure_of_the_html_page(leaky_run: Path, tmp_path: Path) -> None:
    page = (leaky_run / "report.html").read_text()
    markdown = (leaky_run / "report.md").read_text()
    inlined = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    linked = re.findall(r"!\[[^\]]+\]\((figures/[a-z_]+\.png)\)", markdown)
    assert inlined and len(linked) == len(inlined)
    assert sorted((leaky_run / p).read_bytes() for p in linked) == sorted(base64.b64decode(png) for png in inlined)
    # a figure the next report does not draw leaves no stale file behind: without --data, no subgroup figure
    run = Path(shutil.copytree(leaky_run, tmp_path / "run"))
    (run / "figures" / "old_figure.png").write_bytes(b"stale")
    write_report(run, None, Bootstrap(n_boot=20))
    relinked = re.findall(r"!\[[^\]]+\]\(figures/([a-z_]+\.png)\)", (run / "report.md").read_text())
    assert "subgroups.png" in {Path(p).name for p in linked} and "subgroups.png" not in relinked
    assert sorted(p.name for p in (run / "figures").iterdir()) == sorted(relinked)


def test_provenance_comes_from_the_run_manifest(leaky_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(leaky_run, tmp_path / "run"))
    manifest = {"git_commit": "0123abc", "data_fingerprint": {"table_sha256": "feed"}, "stage_seconds": {"stack": 1.5}}
    write_json(manifest, run / "manifest.json")
    report = write_report(run, None, Bootstrap(n_boot=20))
    assert report["provenance"] == {"source": str(run / "manifest.json"), **manifest}
    assert "0123abc" in (run / "report.html").read_text() and "feed" in (run / "report.md").read_text()
    (run / "manifest.json").unlink()
    fallback = write_report(run, None, Bootstrap(n_boot=20))["provenance"]
    assert "no manifest.json" in fallback["source"] and fallback["packages"]["python"]
    assert set(fallback["config"]["train-cnns"]) == {"honest", "leaky"} and fallback["config"]["stack"]["seed"] == 7


def test_html_images_load_in_headless_chromium(browser, leaky_run: Path) -> None:  # noqa: ANN001
    page = browser.new_page()
    try:
        page.goto((leaky_run / "report.html").as_uri(), wait_until="load")
        images = page.evaluate("() => [...document.images].map(i => ({src: i.src, decoded: i.complete && i.naturalWidth > 0}))")
    finally:
        page.close()
    assert len(images) >= 3 and all(image["decoded"] for image in images), images


def test_each_oof_row_gets_its_fold_models_training_prior(tmp_path: Path) -> None:
    from cnn.outputs import training_priors

    layout = RunLayout(tmp_path)
    for fold, prior in ((0, [0.1, 0.9]), (1, [0.2, 0.8])):
        layout.fold_dir("cnn_a", fold).mkdir(parents=True)
        layout.history("cnn_a", fold).write_text(json.dumps({"classes": ["MEL", "NV"], "training_prior": prior}))
    folds = pd.Series([1, 0, 1], index=pd.Index(["a", "b", "c"], name="image_id"))
    priors = training_priors(tmp_path, "cnn_a", folds)
    assert priors.index.tolist() == ["a", "b", "c"] and priors.columns.tolist() == ["MEL", "NV"]
    assert priors.to_numpy().tolist() == [[0.2, 0.8], [0.1, 0.9], [0.2, 0.8]]
    layout.history("cnn_a", 1).write_text(json.dumps({"classes": ["MEL"], "training_prior": None}))
    assert training_priors(tmp_path, "cnn_a", folds) is None  # a binary head: plain argmax


def test_diagnosis_heads_blend_per_class_in_a_run_without_test_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        mel = rng.random(6)
        oof = pd.DataFrame({"image_id": list("uvwxyz"), "patient_id": list("uvwxyz"), "fold": [0, 1] * 3,
                            "target": [0, 1] * 3, "prob": mel, "prob_MEL": mel, "prob_NV": 1 - mel})
        write_table(oof, tmp_path / "cnn" / name / "oof.parquet")
        # what train-cnns writes when the data has no test split: an empty table with `prob` only
        write_table(pd.DataFrame({"image_id": [], "patient_id": [], "prob": []}), tmp_path / "cnn" / name / "test.parquet")
    blend = load_run_predictions(tmp_path).model("mean_blend")
    assert blend.classes == ["MEL", "NV"] and len(blend.test) == 0
    np.testing.assert_allclose(blend.oof["prob_NV"], 1 - blend.oof["prob_MEL"])
