"""Command line of the melanoma pipeline: synth -> folds -> train-cnns -> stack -> report.

Each command reads and writes files in a run directory, so each can run alone, resume, or run on
another machine. TensorFlow is imported only by the commands that train.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from metadata.dataset import DataError, load_dataset

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

DataOption = Annotated[Path, typer.Option("--data", help="Data folder (e.g. the output of `synth`).")]
RunOption = Annotated[Path, typer.Option("--run", help="Run directory for folds, models, predictions, reports.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]


def _load(data: Path):
    try:
        return load_dataset(data)
    except DataError as error:
        console.print(f"[red]data error:[/red] {error}")
        raise typer.Exit(2) from error


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort into.")],
    patients: Annotated[int, typer.Option(help="Number of patients (train + test).")] = 200,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels.")] = 64,
    seed: SeedOption = 0,
) -> None:
    """Write a synthetic cohort in the SIIM-ISIC 2020 layout (train.csv, test.csv, jpeg/)."""
    from metadata.synth import SynthConfig, generate_cohort

    cohort = generate_cohort(out, SynthConfig(patients=patients, image_size=image_size, seed=seed))
    train = cohort[cohort["split"] == "train"]
    console.print(
        f"wrote {len(train)} train images ({int(train['target'].sum())} melanomas) and "
        f"{len(cohort) - len(train)} test images of {patients} patients to {out}"
    )


@app.command()
def folds(data: DataOption, run: RunOption, k: Annotated[int, typer.Option("--k")] = 5, seed: SeedOption = 0) -> None:
    """Patient-grouped, target-stratified, image-count-balanced K folds -> RUN/folds.parquet."""
    from metadata.folds import triple_stratified_folds
    from metadata.io import write_table

    table = _load(data)
    train = table[table["split"] == "train"]
    assigned = triple_stratified_folds(train, k=k, seed=seed)
    write_table(assigned, run / "folds.parquet")
    summary = assigned.assign(target=train["target"].to_numpy(dtype=int)).groupby("fold")
    out = Table("fold", "images", "patients", "melanoma rate", title=f"{k} folds")
    for fold, rows in summary:
        out.add_row(str(fold), str(len(rows)), str(rows["patient_id"].nunique()), f"{rows['target'].mean():.3f}")
    console.print(out)


@app.command("train-cnns")
def train_cnns(
    data: DataOption,
    run: RunOption,
    models: Annotated[str, typer.Option("--models", help="Comma-separated backbone names, e.g. small,efficientnet_b0.")],
    image_size: Annotated[int, typer.Option("--image-size")] = 64,
    epochs: Annotated[int, typer.Option("--epochs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate")] = 2e-3,
    weights: Annotated[str, typer.Option("--weights", help="none, imagenet, or a weights file path.")] = "none",
    seed: SeedOption = 0,
) -> None:
    """Train every model on every fold; write OOF and fold-averaged test probabilities (flip TTA)."""
    from cnn.backbones import BACKBONES
    from cnn.train import CnnConfig
    from cnn.train import train_cnns as run_training
    from metadata.io import read_table

    names = [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in names if m not in BACKBONES]
    if unknown:
        console.print(f"[red]unknown model(s) {unknown}[/red]; registered: {', '.join(sorted(BACKBONES))}")
        raise typer.Exit(2)
    table = _load(data)
    config = CnnConfig(
        image_size=image_size, epochs=epochs, batch_size=batch_size, weights=weights,
        learning_rate=learning_rate, seed=seed,
    )
    aucs = run_training(table, read_table(run / "folds.parquet", "folds"), names, config, run)
    for name, auc in aucs.items():
        console.print(f"{name}: OOF AUC {auc:.4f}")


def _print_report(report: dict) -> None:
    out = Table("model", "kind", "AUC", "pAUC@80TPR", "AUC per fold", title="Out-of-fold CV")
    for e in report["entries"]:
        out.add_row(
            e["name"], e["kind"], f"{e['auc']:.4f}", f"{e['pauc_80tpr']:.4f}", " ".join(f"{a:.3f}" for a in e["fold_auc"])
        )
    console.print(out)


@app.command()
def report(run: RunOption) -> None:
    """Write RUN/report.json and RUN/report.html from the run's OOF predictions."""
    from ensemble.report import write_report

    _print_report(write_report(run))
    console.print(f"report: {run / 'report.html'}")


@app.command()
def stack(
    data: DataOption,
    run: RunOption,
    rounds: Annotated[int, typer.Option("--rounds", help="LightGBM boosting rounds (fixed, not tuned on the held-out fold).")] = 300,
    seed: SeedOption = 0,
) -> None:
    """LightGBM stacker over CNN OOF probabilities + metadata + patient context; then the report."""
    from fusion.stage import run_stack

    auc = run_stack(_load(data), run, num_boost_round=rounds, seed=seed)
    console.print(f"stack: OOF AUC {auc:.4f}; submission: {run / 'submission.csv'}")
    report(run)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory; the synthetic data goes to OUT/data.")] = Path("runs/demo"),
    patients: Annotated[int, typer.Option(help="Synthetic patients.")] = 160,
    seed: SeedOption = 0,
) -> None:
    """Whole pipeline on a small synthetic cohort: synth, 3 folds, two CNNs, stack, report (< 5 min on 2 CPUs)."""
    started = time.perf_counter()
    data = out / "data"
    synth(out=data, patients=patients, image_size=32, seed=seed)
    folds(data=data, run=out, k=3, seed=seed)
    train_cnns(data=data, run=out, models="small,mobilenet_v3_small", image_size=32, epochs=4, seed=seed)
    stack(data=data, run=out, seed=seed)
    console.print(f"submission: {out / 'submission.csv'}")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    app()
