"""Command line of the melanoma pipeline: synth -> folds -> train-cnns -> stack -> report.

Each command reads and writes files in a run directory, so each can run alone, resume, or run on
another machine. TensorFlow is imported only by the commands that train.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from metadata.schema import DataError

if TYPE_CHECKING:
    import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

DataOption = Annotated[Path, typer.Option("--data", help="Data folder in any supported layout (see `inspect`).")]
RunOption = Annotated[Path, typer.Option("--run", help="Run directory for folds, models, predictions, reports.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
FormatOption = Annotated[Optional[str], typer.Option("--format", help="Data layout name; auto-detected when omitted.")]  # noqa: UP007
MetadataOption = Annotated[
    Optional[Path], typer.Option("--metadata", help="Metadata CSV joined by image id (class-folder data).")  # noqa: UP007
]
BadImageOption = Annotated[
    str, typer.Option("--on-bad-image", help="raise: stop at a missing/corrupt image; skip: drop it, listed in RUN.")
]


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(2)


def _run_table(
    data: Path, run: Path, fmt: str | None, metadata: Path | None, on_bad_image: str = "raise"
) -> pd.DataFrame:
    """The canonical table of `data` as this run uses it: skipped images recorded and left out."""
    from metadata.dataset import drop_skipped, load_dataset, record_skipped

    try:
        loaded = load_dataset(data, fmt, metadata, on_bad_image)
    except DataError as error:
        raise _fail(error) from error
    if len(loaded.skipped):
        record_skipped(run, loaded.skipped)
        console.print(f"[yellow]skipped {len(loaded.skipped)} image(s) with no file[/yellow]; see {run}/skipped_images.csv")
    return drop_skipped(loaded.table, run)


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
def folds(
    data: DataOption,
    run: RunOption,
    k: Annotated[int, typer.Option("--k", help="Number of folds (not used with --group-by source).")] = 5,
    group_by: Annotated[str, typer.Option("--group-by", help="patient: triple-stratified K folds; source: leave-one-source-out.")] = "patient",
    dedup: Annotated[bool, typer.Option(help="Keep exact/near-duplicate images in one fold (perceptual hash).")] = True,
    dedup_distance: Annotated[int, typer.Option("--dedup-distance", help="Max perceptual-hash bits apart for a near duplicate.")] = 2,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    on_bad_image: BadImageOption = "raise",
    seed: SeedOption = 0,
) -> None:
    """Patient-grouped, target-stratified, image-count-balanced folds -> RUN/folds.parquet.

    Every image is decoded once here: an unreadable one stops the run (or, with --on-bad-image skip,
    is left out of the whole run and listed in RUN/skipped_images.csv); duplicate images share a fold.
    """
    import pandas as pd

    from metadata.dataset import record_skipped
    from metadata.duplicates import find_duplicate_pairs, fingerprint_images
    from metadata.folds import fold_groups, source_folds, triple_stratified_folds
    from metadata.io import write_table

    if group_by not in ("patient", "source"):
        raise _fail(ValueError(f"--group-by {group_by!r}: choose patient or source."))
    table = _run_table(data, run, fmt, metadata, on_bad_image)
    pairs = None
    with_images = table["image_path"].notna()
    if with_images.any():
        try:
            with Progress(transient=True) as progress:
                task = progress.add_task("decoding and hashing images", total=int(with_images.sum()))
                fingerprints, unreadable = fingerprint_images(
                    table.loc[with_images, "image_id"].tolist(),
                    table.loc[with_images, "image_path"].tolist(),
                    on_bad_image,
                    advance=lambda: progress.advance(task),
                )
        except ValueError as error:
            raise _fail(error) from error
        if unreadable:
            record_skipped(run, pd.DataFrame(unreadable, columns=["image_id", "reason"]))
            table = table[~table["image_id"].isin([i for i, _ in unreadable])]
            console.print(f"[yellow]skipped {len(unreadable)} unreadable image(s)[/yellow]; see {run}/skipped_images.csv")
        if dedup:
            pairs = find_duplicate_pairs(fingerprints, max_distance=dedup_distance)
            console.print(f"{len(pairs)} duplicate image pair(s); each group is kept within one fold")
    train = table[table["split"] == "train"]
    try:
        assigned = (
            source_folds(train)
            if group_by == "source"
            else triple_stratified_folds(train, k=k, seed=seed, groups=fold_groups(train, pairs))
        )
    except ValueError as error:
        raise _fail(error) from error
    write_table(assigned, run / "folds.parquet")
    summary = assigned.assign(target=train["target"].to_numpy(dtype=int)).groupby("fold")
    out = Table("fold", "images", "patients", "melanoma rate", title=f"{assigned['fold'].nunique()} folds by {group_by}")
    for fold, rows in summary:
        out.add_row(str(fold), str(len(rows)), str(rows["patient_id"].nunique()), f"{rows['target'].mean():.3f}")
    console.print(out)


@app.command()
def inspect(
    data: DataOption,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the summary as JSON here.")] = None,  # noqa: UP007
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
) -> None:
    """Summarise a data folder: layout, counts, missing values, missing/unlisted/unreadable images, duplicates.

    Exits with status 1 when the data cannot be trained on as it is.
    """
    from metadata.inspect import inspect_dataset
    from metadata.io import write_json

    summary = inspect_dataset(data, fmt, metadata)
    if json_out is not None:
        write_json(summary, json_out)
    out = Table("item", "value", title=f"inspect {data}")
    for key in ("format", "metadata_only", "rows", "patients", "lesions", "melanoma", "diagnosis_counts", "sources", "missing_values"):
        if key in summary:
            out.add_row(key, str(summary[key]))
    for key in ("images_listed_but_missing", "images_present_but_not_listed", "unreadable_images"):
        if key in summary:
            out.add_row(key, f"{len(summary[key])} {summary[key][:3] if summary[key] else ''}")
    if "duplicate_pairs" in summary:
        d = summary["duplicate_pairs"]
        out.add_row(
            "duplicate pairs",
            f"{d['exact']} exact, {d['near']} near; {len(d['across_train_test'])} across train/test, "
            f"{len(d['conflicting_diagnosis'])} with conflicting diagnoses",
        )
    verdict = "[green]yes[/green]" if summary["trainable"] else f"[red]no[/red]: {'; '.join(summary['errors'])}"
    out.add_row("trainable", verdict)
    console.print(out)
    if not summary["trainable"]:
        raise typer.Exit(1)


@app.command("train-cnns")
def train_cnns(
    data: DataOption,
    run: RunOption,
    models: Annotated[str, typer.Option("--models", help="Backbones, each with an optional size: small:64,efficientnet_b0:128.")],
    image_size: Annotated[int, typer.Option("--image-size", help="Size for models given without one.")] = 64,
    epochs: Annotated[int, typer.Option("--epochs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Peak of the warm-up + cosine schedule.")] = 2e-3,
    weights: Annotated[str, typer.Option("--weights", help="none, imagenet, or a weights file path.")] = "none",
    target: Annotated[str, typer.Option("--target", help="auto, mel (binary) or diagnosis (multi-class head).")] = "auto",
    loss: Annotated[str, typer.Option("--loss", help="bce or focal.")] = "bce",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
    augment: Annotated[str, typer.Option("--augment", help="none, light or strong.")] = "light",
    mix: Annotated[str, typer.Option("--mix", help="none, mixup or cutmix.")] = "none",
    tta: Annotated[str, typer.Option("--tta", help="Test-time views: none,hflip,vflip,rot90,rot180,rot270.")] = "none,hflip,vflip",
    cache: Annotated[str, typer.Option("--cache", help="Decoded-image cache: memory, disk or none.")] = "memory",
    deterministic: Annotated[bool, typer.Option("--deterministic", help="TensorFlow op determinism (slower).")] = False,
    patience: Annotated[int, typer.Option("--patience", help="Early stop after N epochs without a better val AUC (0: off).")] = 0,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    seed: SeedOption = 0,
) -> None:
    """Train every model on every fold; write OOF and fold-averaged test probabilities (with TTA)."""
    from cnn.backbones import parse_model_specs
    from cnn.train import CnnConfig
    from cnn.train import train_cnns as run_training
    from metadata.io import read_table

    if cache not in ("memory", "disk", "none"):
        raise _fail(ValueError(f"--cache {cache!r}: choose memory, disk or none."))
    try:
        specs = parse_model_specs(models, image_size)
    except (KeyError, ValueError) as error:
        raise _fail(error) from error
    table = _run_table(data, run, fmt, metadata)
    config = CnnConfig(
        image_size=image_size, epochs=epochs, batch_size=batch_size, weights=weights, learning_rate=learning_rate,
        seed=seed, tta=tuple(v.strip() for v in tta.split(",") if v.strip()), target=target, loss=loss,
        label_smoothing=label_smoothing, augment=augment, mix=mix, cache=cache, deterministic=deterministic,
        patience=patience,
    )
    try:
        aucs = run_training(table, read_table(run / "folds.parquet", "folds"), specs, config, run)
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise _fail(error) from error
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
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    seed: SeedOption = 0,
) -> None:
    """LightGBM stacker over CNN OOF scores (zero or more CNNs) + metadata + patient context; then the report."""
    from fusion.stage import run_stack

    try:
        auc = run_stack(_run_table(data, run, fmt, metadata), run, num_boost_round=rounds, seed=seed)
    except ValueError as error:
        raise _fail(error) from error
    wrote = f"; submission: {run / 'submission.csv'}" if (run / "submission.csv").exists() else " (no test rows)"
    console.print(f"stack: OOF AUC {auc:.4f}{wrote}")
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
