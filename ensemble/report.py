"""K-fold CV report of a run: every CNN, their mean blend and the stack, as JSON and standalone HTML."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ensemble.blend import cnn_names, mean_blend, rank_blend  # noqa: E402
from ensemble.metrics import METRICS, per_fold, roc_auc  # noqa: E402
from metadata.dataset import SKIPPED_FILE  # noqa: E402
from metadata.io import read_table, write_json, write_text  # noqa: E402


def _entry(name: str, kind: str, target: np.ndarray, probs: np.ndarray, folds: np.ndarray) -> dict:
    entry: dict = {"name": name, "kind": kind}
    entry.update({metric: fn(target, probs) for metric, fn in METRICS.items()})
    entry["fold_auc"] = per_fold(roc_auc, target, probs, folds)
    return entry


def oof_predictions(run_dir: Path) -> pd.DataFrame:
    """One row per training image: fold, target, and one probability column per model of the run."""
    run_dir = Path(run_dir)
    names = cnn_names(run_dir)
    sources = {f"cnn_{n}": run_dir / "cnn" / n / "oof.parquet" for n in names}
    if (run_dir / "stack" / "oof.parquet").exists():
        sources["stack"] = run_dir / "stack" / "oof.parquet"
    if not sources:
        raise FileNotFoundError(f"{run_dir}: no OOF predictions found; run `train-cnns` or `stack` first.")
    frames = {key: read_table(path, "train-cnns").set_index("image_id") for key, path in sources.items()}
    first = next(iter(frames.values()))
    table = first[["fold", "target"]].copy()
    for key, frame in frames.items():
        table[key] = frame["prob"].reindex(table.index)
    return table


def build_report(run_dir: Path, oof: pd.DataFrame) -> dict:
    """Metrics of every CNN, the mean and rank-mean blends of the CNNs and the stack, out of fold."""
    target = oof["target"].to_numpy(dtype=int)
    folds = oof["fold"].to_numpy()
    cnn_columns = [c for c in oof.columns if c.startswith("cnn_")]
    entries = [_entry(c.removeprefix("cnn_"), "cnn", target, oof[c].to_numpy(), folds) for c in cnn_columns]
    if len(cnn_columns) > 1:
        entries.append(_entry("mean_blend", "blend", target, mean_blend(oof[cnn_columns]).to_numpy(), folds))
        entries.append(_entry("rank_blend", "blend", target, rank_blend(oof[cnn_columns]).to_numpy(), folds))
    if "stack" in oof.columns:
        entries.append(_entry("lightgbm_stack", "stack", target, oof["stack"].to_numpy(), folds))
    skipped_file = Path(run_dir) / SKIPPED_FILE
    return {
        "run": str(Path(run_dir).resolve()),
        "skipped_images": int(len(pd.read_csv(skipped_file))) if skipped_file.exists() else 0,
        "n_images": int(len(oof)),
        "n_melanoma": int(target.sum()),
        "n_folds": int(len(np.unique(folds))),
        "entries": entries,
    }


def _roc_plot_png(oof: pd.DataFrame) -> str:
    """ROC curves of every model, as a base64 PNG so the HTML stands alone."""
    target = oof["target"].to_numpy(dtype=int)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for column in [c for c in oof.columns if c not in ("fold", "target")]:
        fpr, tpr, _ = roc_curve(target, oof[column])
        ax.plot(fpr, tpr, label=f"{column} (AUC {roc_auc(target, oof[column]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.axhline(0.8, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate (melanoma)", title="Out-of-fold ROC")
    ax.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(report: dict, roc_png_b64: str) -> str:
    """A standalone HTML page (inline CSS and images; no network needed)."""
    rows = "".join(
        "<tr>"
        f"<td>{html.escape(e['name'])}</td><td>{e['kind']}</td><td>{e['auc']:.4f}</td>"
        f"<td>{e['pauc_80tpr']:.4f}</td><td>{' '.join(f'{a:.3f}' for a in e['fold_auc'])}</td>"
        f"<td>{np.std(e['fold_auc']):.3f}</td>"
        "</tr>"
        for e in report["entries"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CV report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, td:nth-child(2), th {{ text-align: left; }} th {{ background: #f2f2f2; }}
</style></head><body>
<h1>Melanoma CV report</h1>
<p>{report['n_images']} training images, {report['n_melanoma']} melanomas, {report['n_folds']} patient-grouped folds.
All figures are out-of-fold. pAUC is the partial AUC above 80% TPR (range 0 to 0.2).
{report['skipped_images']} image(s) skipped as missing or unreadable (listed in skipped_images.csv).</p>
<table><tr><th>model</th><th>kind</th><th>ROC AUC</th><th>pAUC (TPR&ge;0.8)</th><th>AUC per fold</th><th>fold SD</th></tr>
{rows}</table>
<h2>ROC curves</h2>
<img alt="out-of-fold ROC curves" src="data:image/png;base64,{roc_png_b64}">
<p>Run directory: {html.escape(report['run'])}</p>
</body></html>
"""


def write_report(run_dir: Path) -> dict:
    """Write RUN/report.json and RUN/report.html; return the report."""
    run_dir = Path(run_dir)
    oof = oof_predictions(run_dir)
    report = build_report(run_dir, oof)
    write_json(report, run_dir / "report.json")
    write_text(render_html(report, _roc_plot_png(oof)), run_dir / "report.html")
    return report
