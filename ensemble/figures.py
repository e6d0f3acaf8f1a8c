"""The report's figures, each as PNG bytes (report.html inlines them, report.md links their files).

Every function returns None when there is nothing to draw, and the report leaves that figure out.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from evaluation.metrics import ISIC_MIN_TPR, average_precision, calibration_bins, roc_auc  # noqa: E402

Scores = dict[str, np.ndarray]  # model name -> its score for every row


def png_bytes(fig: Figure) -> bytes:
    """The figure as a PNG (closed afterwards: figures are not kept alive between reports)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def roc_figure(target: np.ndarray, scores: Scores) -> bytes | None:
    """ROC curves, with the ISIC 2024 pAUC region (TPR above 80%) marked."""
    if not scores:
        return None
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(target, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(target, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axhspan(ISIC_MIN_TPR, 1, color="grey", alpha=0.1, label=f"pAUC region (TPR >= {ISIC_MIN_TPR:.0%})")
    ax.set(xlabel="false positive rate", ylabel="true positive rate (melanoma)", title="Out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def pr_figure(target: np.ndarray, scores: Scores) -> bytes | None:
    """Precision-recall curves: at melanoma's low prevalence they show what ROC curves flatter."""
    if not scores:
        return None
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for name, score in scores.items():
        precision, recall, _ = precision_recall_curve(target, score)
        ax.step(recall, precision, where="post", label=f"{name} (AP {average_precision(target, score):.3f})")
    ax.axhline(np.mean(target), color="grey", linestyle=":", linewidth=1, label=f"prevalence {np.mean(target):.3f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Out-of-fold precision-recall", ylim=(0, 1.02))
    ax.legend(loc="upper right", fontsize=8)
    return png_bytes(fig)


def fold_auc_figure(fold_aucs: dict[str, list[float]]) -> bytes | None:
    """Each model's AUC on every fold: the spread says how far to trust a difference between models."""
    if not fold_aucs:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(fold_aucs) + 1), layout="constrained")
    for row, (name, aucs) in enumerate(fold_aucs.items()):
        ax.scatter(aucs, np.full(len(aucs), row), color="tab:blue", alpha=0.7)
        ax.plot([np.nanmean(aucs)] * 2, [row - 0.3, row + 0.3], color="black")
    ax.set_yticks(range(len(fold_aucs)), list(fold_aucs))
    ax.invert_yaxis()
    ax.set(xlabel="ROC AUC of the fold (bar: mean)", title="Per-fold AUC")
    return png_bytes(fig)


def reliability_figure(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "Reliability (OOF)", n_bins: int = 10
) -> bytes | None:
    """Observed melanoma rate against mean predicted probability per bin, one line per (target, probability)
    pair; the diagonal is perfect calibration."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    for name, (target, prob) in curves.items():
        bins = calibration_bins(target, prob, n_bins)
        ax.plot(bins["mean_prob"], bins["observed_rate"], marker="o", label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="mean predicted probability", ylabel="observed melanoma rate", title=title)
    ax.legend(loc="upper left", fontsize=8)
    return png_bytes(fig)


def importance_figure(stack_features: list[dict[str, object]], top: int = 20) -> bytes | None:
    """The LightGBM stack's features by share of split gain (mean over fold models)."""
    ranked = [row for row in stack_features if row["gain_share"]][:top]
    if not ranked:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(ranked) + 1), layout="constrained")
    ax.barh([str(row["feature"]) for row in ranked], [float(row["gain_share"]) for row in ranked], color="tab:green")
    ax.invert_yaxis()
    ax.set(xlabel="share of total gain", title="LightGBM stack: feature importance (gain)")
    return png_bytes(fig)


def subgroup_figure(subgroups: list[dict[str, object]]) -> bytes | None:
    """AUC with its bootstrap interval in each subgroup, one panel per variable, one colour per model."""
    frame = pd.DataFrame(subgroups)
    if frame.empty:
        return None
    variables = list(dict.fromkeys(frame["variable"]))
    models = list(dict.fromkeys(frame["model"]))
    heights = [frame.loc[frame["variable"] == v, "group"].nunique() for v in variables]
    size = (6, 0.35 * sum(heights) + 1.2 * len(variables))
    fig, axes = plt.subplots(len(variables), 1, figsize=size, squeeze=False, layout="constrained")
    for ax, variable in zip(axes[:, 0], variables):
        rows = frame[frame["variable"] == variable]
        groups = list(dict.fromkeys(rows["group"]))
        for offset, model in enumerate(models):
            part = rows[rows["model"] == model].set_index("group").reindex(groups)
            y = np.arange(len(groups)) + (offset - (len(models) - 1) / 2) * 0.25
            low, high = part["auc_ci"].map(lambda ci: ci[0]), part["auc_ci"].map(lambda ci: ci[1])
            # A percentile interval need not contain the estimate (AUC near 1 is biased): clip the bar there.
            error = np.clip(np.vstack([part["auc"] - low, high - part["auc"]]).astype(float), 0, None)
            ax.errorbar(part["auc"], y, xerr=np.nan_to_num(error), fmt="o", capsize=2, label=model)
        counts = rows.groupby("group", sort=False)[["n", "n_melanoma"]].first().reindex(groups)
        ax.set_yticks(range(len(groups)), [f"{g} ({c.n} img, {c.n_melanoma} mel)" for g, c in counts.iterrows()])
        ax.invert_yaxis()
        ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title=f"AUC by {variable}", xlim=(0, 1.02))
    axes[0, 0].legend(loc="lower left", fontsize=8)
    axes[-1, 0].set_xlabel("ROC AUC with 95% bootstrap interval")
    return png_bytes(fig)
