"""K-fold CV report of a run: `RUN/report.json`, a standalone `RUN/report.html` and `RUN/report.md` (figures in `RUN/figures/`).

One table ranks every CNN, the mean and rank-mean blends of the CNNs, the logistic-regression
stack and the LightGBM stack out of fold, with patient-bootstrap intervals; the stack is tested
against the best CNN on the same resamples. A labelled test set is scored in its own table, never
pooled with CV. With the run's data (`--data`) the report adds subgroup AUCs and, for diagnosis
heads, multi-class metrics. Leakage checks (`ensemble.diagnostics`) put their warnings on top.
"""

from __future__ import annotations

import base64
import html
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.outputs import class_column
from ensemble.diagnostics import RunEvidence, leakage_warnings, stack_feature_table
from ensemble.figures import fold_auc_figure, importance_figure, pr_figure, reliability_figure, roc_figure, subgroup_figure
from ensemble.provenance import run_provenance
from ensemble.run_files import ModelPredictions, RunPredictions, load_run_predictions, rows_of
from errors import RunStateError
from evaluation.metrics import (
    METRICS,
    PROBABILITY_METRICS,
    bootstrap_ci,
    bootstrap_cis,
    expected_calibration_error,
    metric_text,
    multiclass_summary,
    paired_bootstrap,
    per_fold,
    roc_auc,
    top_n_sensitivity,
)
from fusion.family_gain import ALL_INPUTS, FEATURES_ONLY
from fusion.missingness import PATTERNS
from metadata.extra_data import read_extra_summary
from metadata.schema import SEXES, SITES
from rundir.completion import require_complete, writing
from rundir.io import atomic_write, read_json, read_table, write_json, write_text
from rundir.layout import FAMILY_GAIN_FILE, FIGURES_DIR, HISTORY_FILE, MASKED_OOF_FILE, SKIPPED_FILE, RunLayout

CI_LEVEL = 0.95
CI_METRICS = ("auc", "pauc_80tpr")  # the ranking metrics: the ones a CI decides between
TOP_N = 15  # ISIC 2024 secondary metric: melanomas among each patient's 15 top-scored lesions
AGE_BANDS = pd.IntervalIndex.from_breaks([0, 30, 45, 60, 75, np.inf], closed="left")
AGE_BAND_NAMES = ["<30", "30-44", "45-59", "60-74", "75+"]


def age_band(table: pd.DataFrame) -> pd.Categorical:
    """Age in the bands dermatology papers report (under 30 ... 75 and over)."""
    return pd.Categorical(pd.cut(table["age"].astype(float), AGE_BANDS).cat.rename_categories(AGE_BAND_NAMES))


def _vocabulary(column: str, categories: tuple[str, ...]) -> Callable[[pd.DataFrame], pd.Categorical]:
    return lambda table: pd.Categorical(table[column].astype("string"), categories=list(categories))


# Subgroup variable -> each row's group, with the groups in reading order.
SUBGROUPS: dict[str, Callable[[pd.DataFrame], pd.Categorical]] = {
    "sex": _vocabulary("sex", SEXES),
    "age band": age_band,
    "site": _vocabulary("site", SITES),
}


@dataclass(frozen=True)
class Bootstrap:
    """Bootstrap settings shared by every interval of a report (same seed: the same resamples for every model)."""

    n_boot: int = 1000
    seed: int = 0


def metric_entry(
    name: str, kind: str, is_probability: bool, target: np.ndarray, *, score: np.ndarray, patients: np.ndarray, boot: Bootstrap
) -> dict[str, object]:
    """Every binary metric of one model's scores, with patient-bootstrap intervals for the ranking metrics.

    Calibration metrics are None for scores that are not probabilities (a rank blend), and top-15
    sensitivity is None when no patient has more than 15 lesions (it would be 1 by construction).
    """
    entry: dict[str, object] = {"name": name, "kind": kind}
    entry.update({metric: fn(target, score) for metric, fn in METRICS.items()})
    intervals = bootstrap_cis({m: METRICS[m] for m in CI_METRICS}, target, score, patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL)
    entry.update({f"{m}_ci": list(ci) for m, ci in intervals.items()})
    entry.update({metric: fn(target, score) if is_probability else None for metric, fn in PROBABILITY_METRICS.items()})
    ranks_patients = pd.Series(patients).value_counts().max() > TOP_N
    entry["top15_sensitivity"] = top_n_sensitivity(target, score, patients, TOP_N) if ranks_patients else None
    return entry


def cv_entries(predictions: RunPredictions, boot: Bootstrap) -> list[dict[str, object]]:
    """Out-of-fold metrics of every model, with its per-fold AUC and their spread."""
    rows = predictions.rows
    target, folds, patients = rows["target"].to_numpy(dtype=int), rows["fold"].to_numpy(), rows["patient_id"].to_numpy()
    entries = []
    for model in predictions.models:
        score = model.oof["prob"].to_numpy()
        entry = metric_entry(model.name, model.kind, model.is_probability, target, score=score, patients=patients, boot=boot)
        entry["fold_auc"] = per_fold(roc_auc, target, score, folds)
        defined = [auc for auc in entry["fold_auc"] if not np.isnan(auc)]  # a fold of one class has none
        entry["fold_auc_sd"] = float(np.std(defined)) if defined else float("nan")
        entries.append(entry)
    return entries


def best_cnn(entries: list[dict[str, object]]) -> str | None:
    cnns = [e for e in entries if e["kind"] == "cnn"]
    return max(cnns, key=lambda e: e["auc"])["name"] if cnns else None


def headline_models(predictions: RunPredictions, entries: list[dict[str, object]]) -> list[ModelPredictions]:
    """The models the figures compare: the best CNN by OOF AUC and every stack."""
    best = best_cnn(entries)
    return [m for m in predictions.models if m.name == best or m.kind == "stack"]


def stack_vs_best_cnn(predictions: RunPredictions, entries: list[dict[str, object]], boot: Bootstrap) -> list[dict[str, object]]:
    """Paired patient bootstrap of each stack against the best single CNN, for AUC and pAUC."""
    best = best_cnn(entries)
    if best is None:
        return []
    target, patients = predictions.rows["target"].to_numpy(dtype=int), predictions.rows["patient_id"].to_numpy()
    cnn_score = predictions.model(best).oof["prob"].to_numpy()
    return [
        {
            "model": stack.name,
            "versus": best,
            "metric": metric,
            **asdict(
                paired_bootstrap(
                    METRICS[metric], target, stack.oof["prob"].to_numpy(), cnn_score, groups=patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL
                )
            ),
        }
        for stack in predictions.of_kind("stack")
        for metric in CI_METRICS
    ]


def multiclass_entries(predictions: RunPredictions, oof_rows: pd.DataFrame) -> list[dict[str, object]]:
    """Balanced accuracy, per-class AUC and confusion matrix of every multi-class (diagnosis-head) model."""
    diagnosis = oof_rows["diagnosis"].astype("string").to_numpy(dtype=object, na_value=None)

    def summary(model: ModelPredictions) -> dict[str, object]:
        probs = model.oof[[class_column(c) for c in model.classes]].to_numpy()
        prior = None if model.class_prior is None else model.class_prior[model.classes].to_numpy()
        return {"name": model.name, "classes": model.classes, **multiclass_summary(diagnosis, probs, model.classes, prior)}

    return [summary(m) for m in predictions.models if m.classes and m.is_probability]


def subgroup_entries(
    predictions: RunPredictions, oof_rows: pd.DataFrame, models: list[ModelPredictions], boot: Bootstrap
) -> list[dict[str, object]]:
    """AUC with a patient-bootstrap interval in every sex, age band and site, for the headline models."""
    target, patients = predictions.rows["target"].to_numpy(dtype=int), predictions.rows["patient_id"].to_numpy()
    entries = []
    for variable, grouping in SUBGROUPS.items():
        groups = grouping(oof_rows).add_categories("missing").fillna("missing")
        for group in groups.categories[np.isin(groups.categories, groups)]:
            rows = np.asarray(groups == group)
            for model in models:
                score = model.oof["prob"].to_numpy()[rows]
                entries.append(
                    {
                        "variable": variable,
                        "group": str(group),
                        "model": model.name,
                        "n": int(rows.sum()),
                        "n_melanoma": int(target[rows].sum()),
                        "auc": roc_auc(target[rows], score),
                        "auc_ci": list(
                            bootstrap_ci(roc_auc, target[rows], score, patients[rows], n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL)
                        ),
                    }
                )
    return entries


def labelled_test_set_section(predictions: RunPredictions, table: pd.DataFrame, boot: Bootstrap) -> dict[str, object] | None:
    """Metrics on the labelled test rows, if any: a separate table, never pooled with the CV figures."""
    labelled = table[(table["split"] == "test") & table["target"].notna()]
    if labelled.empty:
        return None
    ids = pd.Index(labelled["image_id"])
    target, patients = labelled["target"].to_numpy(dtype=int), labelled["patient_id"].to_numpy()
    training_sources = sorted(table.loc[table["split"] == "train", "source"].dropna().astype(str).unique())
    test_sources = sorted(labelled["source"].dropna().astype(str).unique())
    scored = [m for m in predictions.models if ids.isin(m.test.index).all()]
    return {
        "sources": test_sources,
        "training_sources": training_sources,
        "independent_source": not set(test_sources) & set(training_sources),
        "n_images": len(labelled),
        "n_melanoma": int(target.sum()),
        "entries": [
            metric_entry(m.name, m.kind, m.is_probability, target, score=m.test["prob"].reindex(ids).to_numpy(), patients=patients, boot=boot)
            for m in scored
        ],
    }


PATTERN_AUC_TOLERANCE = 0.005  # a stack ranking this far below the best CNN on a pattern's rows is flagged


def missingness_entries(run_dir: Path, predictions: RunPredictions, entries: list[dict[str, object]], boot: Bootstrap) -> list[dict[str, object]]:
    """Per missingness pattern, on the LightGBM stack's OOF predictions with those inputs masked
    (`RUN/stack/masked_oof.parquet`): the stack's AUC against the best CNN's on the same rows
    (paired patient bootstrap), and the calibration of its probabilities."""
    masked_file = RunLayout(run_dir).stack / MASKED_OOF_FILE
    best = best_cnn(entries)
    if not masked_file.exists():
        return []
    masked = read_table(masked_file, "stack")
    cnn_score = predictions.model(best).oof["prob"] if best else None
    found = []
    for pattern in [p for p in PATTERNS if p in set(masked["pattern"])]:
        rows = masked[masked["pattern"] == pattern]
        y, prob, patients = rows["target"].to_numpy(int), rows["prob"].to_numpy(), rows["patient_id"].to_numpy()
        if not 0 < y.sum() < len(y):
            continue
        entry = {
            "pattern": pattern, "n": int(len(rows)), "n_melanoma": int(y.sum()),
            "auc": roc_auc(y, prob), "auc_ci": list(bootstrap_ci(roc_auc, y, prob, patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL)),
            # ECE of the cross-fitted calibration: each fold calibrated without its own labels
            "ece": expected_calibration_error(y, rows["prob_cross_fitted"].to_numpy()), "versus": best,
        }
        if cnn_score is not None:
            cnn = cnn_score.reindex(rows["image_id"]).to_numpy()
            compared = paired_bootstrap(roc_auc, y, prob, cnn, groups=patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL)
            entry.update(cnn_auc=roc_auc(y, cnn), difference=compared.difference, difference_ci=list(compared.ci), p_value=compared.p_value)
        found.append(entry)
    return found


def family_gain_section(run_dir: Path, boot: Bootstrap) -> dict[str, object] | None:
    """Each dermoscopy feature family's gain (`RUN/stack/family_gain.parquet`, see `fusion.family_gain`):
    the plain stack's OOF AUC with every input minus without the family, paired patient bootstrap;
    and the stack on the features alone."""
    gain_file = RunLayout(run_dir).stack / FAMILY_GAIN_FILE
    if not gain_file.exists():
        return None
    scores = read_table(gain_file, "stack")
    y, patients = scores["target"].to_numpy(int), scores["patient_id"].to_numpy()
    with_all = scores[f"prob_{ALL_INPUTS}"].to_numpy()
    removed = [c.removeprefix("prob_without_") for c in scores.columns if c.startswith("prob_without_")]
    families = []
    for name in removed:
        without = scores[f"prob_without_{name}"].to_numpy()
        compared = paired_bootstrap(roc_auc, y, with_all, without, groups=patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL)
        families.append({"family": name, "auc_with": roc_auc(y, with_all), "auc_without": roc_auc(y, without), **asdict(compared)})
    alone = scores[f"prob_{FEATURES_ONLY}"].to_numpy()
    return {
        "families": families,
        "features_only_stack": {"auc": roc_auc(y, alone), "auc_ci": list(bootstrap_ci(roc_auc, y, alone, patients, n_boot=boot.n_boot, seed=boot.seed, level=CI_LEVEL))},
    }


def missingness_warnings(patterns: list[dict[str, object]]) -> list[str]:
    """A pattern on whose rows the stack ranks below the best CNN alone."""
    return [
        f"with inputs masked as {e['pattern']}, the LightGBM stack's OOF AUC {e['auc']:.3f} is below {e['versus']}'s "
        f"{e['cnn_auc']:.3f} on the same rows"
        for e in patterns
        if "cnn_auc" in e and e["difference"] < -PATTERN_AUC_TOLERANCE
    ]


def build_report(
    run_dir: Path, predictions: RunPredictions, table: pd.DataFrame | None = None, boot: Bootstrap = Bootstrap()
) -> dict[str, object]:
    """Every section of the report as JSON-ready data (the HTML and Markdown only format this)."""
    run_dir = Path(run_dir)
    rows = predictions.rows
    entries = cv_entries(predictions, boot)
    stack_features = stack_feature_table(run_dir, predictions)
    skipped_file = RunLayout(run_dir).skipped
    oof_rows = (
        rows_of(table.set_index("image_id"), rows.index, "the data", "pass the --data the run was trained on.")
        if table is not None else None
    )
    headline = headline_models(predictions, entries)
    patterns = missingness_entries(run_dir, predictions, entries, boot)
    return {
        "run": str(run_dir.resolve()),
        "skipped_images": int(len(pd.read_csv(skipped_file))) if skipped_file.exists() else 0,
        "n_images": int(len(rows)),
        "n_melanoma": int(rows["target"].sum()),
        "n_folds": int(rows["fold"].nunique()),
        "n_patients": int(rows["patient_id"].nunique()),
        "bootstrap": {"n_boot": boot.n_boot, "seed": boot.seed, "level": CI_LEVEL, "resampled": "patients"},
        "warnings": [*leakage_warnings(RunEvidence(run_dir, predictions, stack_features)), *missingness_warnings(patterns)],
        "entries": entries,
        "stack_vs_best_cnn": stack_vs_best_cnn(predictions, entries, boot),
        "test_set": labelled_test_set_section(predictions, table, boot) if table is not None else None,
        "multiclass": multiclass_entries(predictions, oof_rows) if oof_rows is not None else [],
        "subgroups": subgroup_entries(predictions, oof_rows, headline, boot) if oof_rows is not None else [],
        "missingness": patterns,
        "stack_features": stack_features,
        "image_feature_gain": family_gain_section(run_dir, boot),
        "with_data": table is not None,
        "provenance": run_provenance(run_dir),
        **({"extra_data": extra} if (extra := extra_data_section(run_dir)) else {}),
    }


def extra_data_section(run_dir: Path) -> dict[str, object] | None:
    """The other datasets that trained the CNNs (`folds --extra-data`): sources, what was kept and dropped,
    and the images of each that every model trained on; None for a run without extra data."""
    summary = read_extra_summary(run_dir)
    if summary is None:
        return None
    trained: dict[str, dict[str, int]] = {}
    for history_file in sorted(RunLayout(run_dir).cnn.glob(f"*/fold*/{HISTORY_FILE}")):
        history = json.loads(history_file.read_text())
        trained.setdefault(history["model"], {})[f"fold {history['fold']}"] = sum(history.get("extra_data", {}).values())
    return {**summary, "images_per_model_and_fold": trained}




@dataclass(frozen=True)
class ReportFigure:
    name: str  # its file is FIGURES_DIR/<name>.png
    caption: str
    png: bytes


def report_figures(report: dict[str, object], predictions: RunPredictions, run_dir: Path) -> list[ReportFigure]:
    """Every figure there is something to draw for."""
    target = predictions.rows["target"].to_numpy(dtype=int)
    headline = headline_models(predictions, report["entries"])
    scores = {m.name: m.oof["prob"].to_numpy() for m in headline}
    probabilities = {m.name: m.oof["prob"].to_numpy() for m in headline if m.is_probability}
    figures = {
        "roc": ("ROC curves of the best CNN and the stacks (shaded: the pAUC region)", roc_figure(target, scores)),
        "precision_recall": ("Precision-recall curves of the best CNN and the stacks", pr_figure(target, scores)),
        "fold_auc": ("AUC of every model on every fold", fold_auc_figure({e["name"]: e["fold_auc"] for e in report["entries"]})),
        "reliability": ("Reliability diagram (10 equal-width bins)", reliability_figure({n: (target, p) for n, p in probabilities.items()})),
        "reliability_by_pattern": (
            "Reliability of the LightGBM stack per missingness pattern (OOF, inputs masked, each fold calibrated by the others; 10 equal-width bins)",
            reliability_figure(_pattern_probabilities(run_dir), "Reliability per pattern (OOF, masked)"),
        ),
        "stack_importance": ("LightGBM stack feature importance (share of gain, mean over fold models)",
                             importance_figure(report["stack_features"])),
        "subgroups": ("Subgroup AUC by sex, age band and site", subgroup_figure(report["subgroups"])),
    }
    return [ReportFigure(name, caption, png) for name, (caption, png) in figures.items() if png is not None]


def _pattern_probabilities(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Target and cross-fitted calibrated stack probability of every pattern's masked OOF rows (empty without a stack)."""
    masked_file = RunLayout(run_dir).stack / MASKED_OOF_FILE
    if not masked_file.exists():
        return {}
    masked = read_table(masked_file, "stack")
    return {p: (rows["target"].to_numpy(int), rows["prob_cross_fitted"].to_numpy()) for p, rows in masked.groupby("pattern", sort=False)}


# ---- tables: one model of the report's tables, rendered as HTML and as Markdown --------------------------


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _decision_note(entry: dict) -> str:
    """How a multi-class entry's classes were predicted, with the plain argmax figure when they differ."""
    if entry["decision"] != "prior_adjusted":
        return ""
    return f" (argmax of probability / training prior; plain argmax {metric_text(entry['balanced_accuracy_argmax'])})"


def _with_ci(value: object, ci: list[float], digits: int = 3) -> str:
    return f"{metric_text(value, digits)} [{metric_text(ci[0], digits)}, {metric_text(ci[1], digits)}]"


# Column header -> the cell of one metric entry (CV or test set).
ENTRY_COLUMNS: dict[str, Callable[[dict], str]] = {
    "model": lambda e: e["name"],
    "kind": lambda e: e["kind"],
    "ROC AUC [95% CI]": lambda e: _with_ci(e["auc"], e["auc_ci"]),
    "pAUC TPR>=0.8 [95% CI]": lambda e: _with_ci(e["pauc_80tpr"], e["pauc_80tpr_ci"], 4),
    "sens @ 90% / 95% spec": lambda e: f"{metric_text(e['sens_at_90spec'])} / {metric_text(e['sens_at_95spec'])}",
    "spec @ 90% / 95% sens": lambda e: f"{metric_text(e['spec_at_90sens'])} / {metric_text(e['spec_at_95sens'])}",
    "AP": lambda e: metric_text(e["average_precision"]),
    "Brier": lambda e: metric_text(e["brier"], 4),
    "ECE": lambda e: metric_text(e["ece"], 4),
    "top-15 sens": lambda e: metric_text(e["top15_sensitivity"]),
}
FOLD_COLUMNS: dict[str, Callable[[dict], str]] = {
    "AUC per fold": lambda e: " ".join(metric_text(a) for a in e["fold_auc"]),
    "fold SD": lambda e: metric_text(e["fold_auc_sd"]),
}
CV_COLUMNS = {**ENTRY_COLUMNS, **FOLD_COLUMNS}
# What fits a terminal: the ranking metrics and the fold spread.
COMPACT_CV_COLUMNS = {k: CV_COLUMNS[k] for k in ("model", "kind", "ROC AUC [95% CI]", "pAUC TPR>=0.8 [95% CI]", "fold SD", "ECE")}


def _entry_table(title: str, entries: list[dict], columns: dict[str, Callable[[dict], str]], note: str) -> Table:
    return Table(title, list(columns), [[cell(e) for cell in columns.values()] for e in entries], note)


def summary_tables(report: dict[str, object], cv_columns: dict[str, Callable[[dict], str]] = CV_COLUMNS) -> list[Table]:
    """The CV table and, when the run has CNNs and a stack, the stack-vs-best-CNN test."""
    n_boot = report["bootstrap"]["n_boot"]
    tables = [
        _entry_table(
            "Out-of-fold cross-validation",
            report["entries"],
            cv_columns,
            f"Intervals: {n_boot} bootstrap resamples of patients. pAUC: ISIC 2024 partial AUC above 80% TPR (0 to 0.2). "
            "sens/spec: best achievable at the named specificity/sensitivity. ECE and Brier only for probabilities.",
        )
    ]
    if report["stack_vs_best_cnn"]:
        tables.append(
            Table(
                "Stack vs best single CNN (paired patient bootstrap)",
                ["model", "versus", "metric", "difference [95% CI]", "p (two-sided)"],
                [
                    [c["model"], c["versus"], c["metric"], _with_ci(c["difference"], c["ci"], 4), metric_text(c["p_value"], 4)]
                    for c in report["stack_vs_best_cnn"]
                ],
            )
        )
    return tables


def _missingness_table(report: dict[str, object]) -> Table | None:
    """The stack per missingness pattern against the best CNN on the same rows."""
    if not report["missingness"]:
        return None
    return Table(
        "LightGBM stack per missingness pattern (OOF, those inputs masked) vs the best CNN on the same rows",
        ["pattern", "images", "melanomas", "stack AUC [95% CI]", "CNN", "CNN AUC", "difference [95% CI]", "p", "ECE"],
        [
            [e["pattern"], str(e["n"]), str(e["n_melanoma"]), _with_ci(e["auc"], e["auc_ci"]), e["versus"] or "-",
             metric_text(e.get("cnn_auc")), _with_ci(e["difference"], e["difference_ci"], 4) if "difference" in e else "-",
             metric_text(e.get("p_value"), 4), metric_text(e["ece"], 4)]
            for e in report["missingness"]
        ],
        "Each row scores every OOF image as a lesion of that pattern would reach the stack: metadata fields blanked "
        "(partial: a random one or two per image) and/or each lesion its own patient; probabilities calibrated per pattern "
        "on OOF scores (ECE: each fold calibrated by the other folds). Difference: paired patient bootstrap, stack minus CNN.",
    )


def _stack_features_table(report: dict[str, object]) -> Table | None:
    """What the LightGBM stack used, and what stacking adds over each feature alone."""
    if not report["stack_features"]:
        return None
    return Table(
        "Stack features: what the LightGBM stack used, and how much stacking adds over each feature alone",
        ["feature", "gain share", "AUC alone", "stack AUC minus AUC alone"],
        [
            [f["feature"], metric_text(f["gain_share"]), metric_text(f["single_feature_auc"]), metric_text(f["stack_auc_minus_single"])]
            for f in report["stack_features"]
        ],
        "AUC alone: the feature's own OOF AUC in its better direction (numeric features only).",
    )


def _family_gain_table(report: dict[str, object]) -> Table | None:
    """What each dermoscopy feature family adds to the stack."""
    gain = report.get("image_feature_gain")
    if not gain:
        return None
    alone = gain["features_only_stack"]
    return Table(
        "Dermoscopy feature families: the stack with and without each (OOF, paired patient bootstrap)",
        ["family", "stack AUC with", "stack AUC without", "gain [95% CI]", "p (two-sided)"],
        [
            [g["family"], metric_text(g["auc_with"]), metric_text(g["auc_without"]), _with_ci(g["difference"], g["ci"], 4), metric_text(g["p_value"], 4)]
            for g in gain["families"]
        ],
        f"Plain LightGBM stacks (rows as given, no masked copies, no calibration) on the run's folds. "
        f"The features and their patient context alone (no CNN, no metadata): AUC {_with_ci(alone['auc'], alone['auc_ci'])}.",
    )


def report_tables(report: dict[str, object]) -> list[Table]:
    """Every table of the report, in reading order; sections without data are left out."""
    tables = summary_tables(report)
    test_set = report["test_set"]
    if test_set:
        kind = "Independent test set" if test_set["independent_source"] else "Test set from the training sources"
        tables.append(
            _entry_table(
                f"{kind}: {test_set['n_images']} images, {test_set['n_melanoma']} melanomas (never pooled with CV)",
                test_set["entries"],
                ENTRY_COLUMNS,
                f"Test sources: {', '.join(test_set['sources'])}; training sources: {', '.join(test_set['training_sources'])}.",
            )
        )
    for entry in report["multiclass"]:
        tables.append(
            Table(
                f"{entry['name']}: balanced accuracy {metric_text(entry['balanced_accuracy'])}{_decision_note(entry)}; "
                "confusion matrix (rows: true, columns: predicted)",
                ["true \\ predicted", *entry["classes"], "one-vs-rest AUC"],
                [
                    [c, *(str(n) for n in counts), metric_text(entry["class_auc"][c])]
                    for c, counts in zip(entry["classes"], entry["confusion_matrix"])
                ],
            )
        )
    if report["subgroups"]:
        tables.append(
            Table(
                "Subgroup AUC (out of fold) [95% CI]",
                ["variable", "group", "model", "images", "melanomas", "AUC [95% CI]"],
                [
                    [s["variable"], s["group"], s["model"], str(s["n"]), str(s["n_melanoma"]), _with_ci(s["auc"], s["auc_ci"])]
                    for s in report["subgroups"]
                ],
            )
        )
    tables += [
        table for table in (_extra_data_table(report), _missingness_table(report), _stack_features_table(report), _family_gain_table(report))
        if table is not None
    ]
    return tables


def _extra_data_table(report: dict[str, object]) -> Table | None:
    extra = report.get("extra_data")
    if not extra:
        return None
    return Table(
        "Extra training data (folds --extra-data): in every fold's training set, never validated on or scored",
        ["dataset", "layout", "images", "kept", "unlabelled", "same id as the run's", "copies of the run's", "unreadable", "no diagnosis class"],
        [
            [str(c["data"]), str(c["format"]), str(c["images"]), str(c["kept"]), str(c["unlabelled"]), str(c["dropped_same_id_as_the_run"]),
             str(c["dropped_perceptual_copies_of_the_run"]), str(c["unreadable"]), str(c["diagnosis_unmapped"])]
            for c in extra["sources"]
        ],
        "Extra images each model trained on, per fold: "
        + "; ".join(f"{model}: {', '.join(f'{f} {n}' for f, n in folds.items())}" for model, folds in extra["images_per_model_and_fold"].items()),
    )


def _summary(report: dict[str, object]) -> str:
    without_data = "" if report["with_data"] else " Subgroup, multi-class and test-set sections need the run's data: pass --data."
    return (
        f"{report['n_images']} training images of {report['n_patients']} patients, {report['n_melanoma']} melanomas, "
        f"{report['n_folds']} patient-grouped folds; every figure is out-of-fold. {report['skipped_images']} image(s) "
        f"skipped as missing or unreadable (listed in {SKIPPED_FILE}).{without_data}"
    )


def _html_table(table: Table) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in table.rows)
    note = f"<p class='note'>{html.escape(table.note)}</p>" if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2>\n<table><tr>{header}</tr>{rows}</table>{note}\n"


def render_html(report: dict[str, object], figures: list[ReportFigure]) -> str:
    """A standalone page: inline CSS, images as data URIs, no script and no network."""
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"])
    warning_block = f"<div class='warn'><h2>Warnings</h2><ul>{warnings}</ul></div>" if warnings else ""
    figure_block = "".join(
        f"<figure><img alt='{html.escape(f.caption)}' src='data:image/png;base64,{base64.b64encode(f.png).decode()}'>"
        f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
        for f in figures
    )
    provenance = html.escape(json.dumps(report["provenance"], indent=2, default=str))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CV report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 0.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th {{ text-align: left; }} th {{ background: #f2f2f2; }} .note {{ color: #555; font-size: 0.9em; }}
.warn {{ background: #fff3cd; border: 1px solid #e0b400; padding: 0.5em 1em; }}
figure {{ display: inline-block; margin: 1em; vertical-align: top; }}
figcaption {{ font-size: 0.9em; color: #555; max-width: 32em; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>Melanoma CV report</h1>
<p>{html.escape(_summary(report))}</p>
{warning_block}
{''.join(_html_table(t) for t in report_tables(report))}
<h2>Figures</h2>
{figure_block}
<h2>Provenance</h2>
<pre>{provenance}</pre>
<p>Run directory: {html.escape(report['run'])}</p>
</body></html>
"""


def _markdown_table(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [f"## {table.title}", "", line(table.header), line(["---"] * len(table.header)), *map(line, table.rows)]
    return "\n".join([*lines, *(["", table.note] if table.note else [])]) + "\n"


def render_markdown(report: dict[str, object], figures: list[ReportFigure]) -> str:
    """The same tables as Markdown, with the figures linked from FIGURES_DIR beside it."""
    warnings = "".join(f"- **warning:** {w}\n" for w in report["warnings"])
    tables = "\n".join(_markdown_table(t) for t in report_tables(report))
    figure_block = "".join(f"![{f.caption}]({FIGURES_DIR}/{f.name}.png)\n\n*{f.caption}*\n\n" for f in figures)
    provenance = json.dumps(report["provenance"], indent=2, default=str)
    return (
        f"# Melanoma CV report\n\n{_summary(report)}\n\n{warnings}\n{tables}\n## Figures\n\n{figure_block}"
        f"## Provenance\n\n```json\n{provenance}\n```\n"
    )


def write_figures(figures: list[ReportFigure], folder: Path) -> None:
    """Each figure as FOLDER/<name>.png; a figure an earlier report drew and this one has not is removed."""
    for stale in set(folder.glob("*.png")) - {folder / f"{f.name}.png" for f in figures}:
        stale.unlink()
    for figure in figures:
        atomic_write(folder / f"{figure.name}.png", lambda tmp, png=figure.png: tmp.write_bytes(png))


def write_report(
    run_dir: Path, table: pd.DataFrame | None = None, boot: Bootstrap = Bootstrap(), *, check_complete: bool = True
) -> dict[str, object]:
    """Write RUN/report.json, RUN/report.html, RUN/report.md and its RUN/figures/; return the report.

    `table` is the run's canonical data table (optional): it adds the subgroup, multi-class and test-set sections.
    The report records the stack it describes: once the stack is written again, it is stale (`read_report`).
    `check_complete=False`: written by the `stack` stage itself, which has not finished yet.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    predictions = load_run_predictions(run_dir, check_complete=check_complete)
    report = build_report(run_dir, predictions, table, boot)
    figures = report_figures(report, predictions, run_dir)
    report["report_seconds"] = round(time.perf_counter() - started, 2)
    with writing(run_dir, "report", reads=("stack",)):  # report.json, .html, .md and the figures: together or not at all
        write_json(report, RunLayout(run_dir).report_json)
        write_text(render_html(report, figures), RunLayout(run_dir).report_html)
        write_figures(figures, run_dir / FIGURES_DIR)
        write_text(render_markdown(report, figures), RunLayout(run_dir).report_md)
    return report


def read_report(run_dir: Path) -> dict[str, object]:
    """RUN/report.json, refused when the report is incomplete or older than the stack it describes."""
    require_complete(run_dir, "report")
    found = read_json(RunLayout(run_dir).report_json)
    if found is None:
        raise RunStateError(f"{run_dir} has no report: run `python cli.py report --run {run_dir}` (or `stack`).")
    return found
