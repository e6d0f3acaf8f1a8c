"""Command line of the melanoma pipeline: synth -> folds -> train-cnns -> stack -> report.

Each command reads and writes files in a run directory, so each can run alone, resume, or run on
another machine. TensorFlow is imported only by the commands that train.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from inspect import signature, unwrap
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table
from typer.core import TyperGroup

from cnn.options import (
    AUGMENT_LEVELS,
    CACHE_CHOICES,
    CLASS_WEIGHT_CHOICES,
    COLOR_CONSTANCY_CHOICES,
    DEFAULT_CACHE_BUDGET_GB,
    LOSS_CHOICES,
    MIX_CHOICES,
    STRATEGY_CHOICES,
    TARGET_CHOICES,
)
from ensemble.submission_formats import SUBMISSION_FORMATS
from errors import OptionError, RunStateError, UserError
from metadata.dataset import BAD_IMAGE_POLICIES, SPLITS
from metadata.formats import DATASET_FORMATS
from rundir.completion import writing
from rundir.config import ConfigError, command_options, read_config, resolve_config, split_config_argument
from rundir.layout import RunLayout

if TYPE_CHECKING:
    import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console
CONFIG_EPILOG = (
    "Any option can also come from a run config: --config FILE (TOML or JSON; keys are option names "
    "without --, in a section named after the command, or at the top level for every command that has "
    "them). Flags given here override the file."
)


class ConfigGroup(TyperGroup):
    """Gives every command `--config FILE`: the file's options (rundir/config.py) become its defaults.

    One mechanism for all commands: the file is read before the command parses its flags and its
    options are handed over as click's `default_map`, so flags on the command line still win.
    """

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for command in self.commands.values():
            command.epilog = "\n\n".join(filter(None, [command.epilog, CONFIG_EPILOG]))

    def resolve_command(self, ctx: typer.Context, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        try:
            path, rest = split_config_argument(rest)
            if path is not None:
                options = {n: command_options(unwrap(c.callback)) for n, c in self.commands.items()}
                ctx.default_map = {name: resolve_config(read_config(path), options, str(path))[name]}
        except ConfigError as error:
            raise _fail(error) from error
        return name, command, rest

    def invoke(self, ctx: typer.Context) -> Any:
        """The one place a user's mistake becomes a message and exit status 2 (a traceback only with --debug),
        a bug a traceback and exit status 1, and Ctrl-C a short note (status 130): stages mark their
        outputs, so an interrupted one is refused, not used."""
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):  # typer's own answers (its Exit is a RuntimeError)
            raise
        except KeyboardInterrupt as error:
            console.print("[yellow]interrupted[/yellow]: finished parts are kept; run the same command again to complete it")
            raise typer.Exit(130) from error
        except Exception as error:
            if ctx.params.get("debug") or os.environ.get("MELANOMA_DEBUG"):
                raise
            raise (_fail(error) if is_user_error(error) else _bug(error)) from error


app = typer.Typer(cls=ConfigGroup, add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
log = logging.getLogger("cli")


@app.callback()
def main(debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error (also: MELANOMA_DEBUG=1).")] = False) -> None:
    """Melanoma pipeline: synth -> folds -> train-cnns -> stack -> report; export -> predict / validate."""

def _writable_folder(folder: Path) -> Path:
    """Checked once, before any work: a --run / --out that is a file, or a folder that cannot be written."""
    if folder.exists() and not folder.is_dir():
        raise typer.BadParameter(f"{folder} is a file; name a folder (it is created if missing).")
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{existing} cannot be written by this user; choose another folder or fix its permissions.")
    return folder


# Options shared by several commands, each with one meaning wherever it appears: one `typer.Option`
# per name, so a run config's top-level key reaches every command that has it meaning the same thing.
# An option that means different things to different commands (`--out`, `--image-size`, ...) is
# declared per command, and a config file may set it only in that command's [section].
DATA = typer.Option("--data", help="Data folder in any supported layout (see `inspect`).")
RUN = typer.Option("--run", help="Run directory for folds, models, predictions, reports.", callback=_writable_folder)
SEED = typer.Option("--seed", help="Random seed.")
FORMAT = typer.Option("--format", help="The data's layout; auto-detected when omitted.")
METADATA = typer.Option("--metadata", help="Metadata CSV joined by image id: patient_id, age, sex, site (class-folder data, a folder of images).")
BAD_IMAGE = typer.Option("--on-bad-image", help="raise: stop at a missing/corrupt image; skip: drop it, listed in RUN.")
BUNDLE = typer.Option("--bundle", help="Bundle folder written by `export` (checksums verified).")
SPLIT = typer.Option("--split", help="Rows of --data: all, train or test.")
BOOTSTRAP = typer.Option("--bootstrap", min=1, help="Bootstrap resamples (of patients) per interval.")
DATABASE = typer.Option("--database", help="The triage service's database, a SQLAlchemy URL: sqlite:///FILE (default runs/triage/triage.db) or postgresql+psycopg://...")
PATIENTS = typer.Option("--patients", min=1, help="Synthetic patients (train + test).")
WAIT = typer.Option("--wait", help="When another command is writing the run, wait for it to finish instead of refusing.")
COLOR_CONSTANCY = typer.Option(
    "--color-constancy",
    help="Colour normalisation after decoding, kept in the bundle and applied alike at scoring: none, shades-of-gray (p=6), "
    "or shades-of-gray-cropped (the dark dermoscope border cropped first).",
)

DATA_LAYOUTS = tuple(DATASET_FORMATS)
SUBMISSION_FORMAT_NAMES = tuple(SUBMISSION_FORMATS)
METADATA_MODE_CHOICES = ("as-given", "none")  # ensemble.validate.METADATA_MODES, without its imports
DataOption = Annotated[Path, DATA]
OptionalDataOption = Annotated[Optional[Path], DATA]  # noqa: UP007
RunOption = Annotated[Path, RUN]
SeedOption = Annotated[int, SEED]
FormatOption = Annotated[Optional[Literal[DATA_LAYOUTS]], FORMAT]  # noqa: UP007
MetadataOption = Annotated[Optional[Path], METADATA]  # noqa: UP007
BadImageOption = Annotated[Literal[BAD_IMAGE_POLICIES], BAD_IMAGE]
BundleOption = Annotated[Path, BUNDLE]
SplitOption = Annotated[Literal[SPLITS], SPLIT]
BootstrapOption = Annotated[int, BOOTSTRAP]
DatabaseOption = Annotated[Optional[str], DATABASE]  # noqa: UP007
PatientsOption = Annotated[int, PATIENTS]
WaitOption = Annotated[bool, WAIT]
ColorConstancyOption = Annotated[Literal[COLOR_CONSTANCY_CHOICES], COLOR_CONSTANCY]


# OS errors a user fixes on their side: a folder they cannot write, a full or read-only disk.
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_user_error(error: BaseException) -> bool:
    """A mistake the user can fix (errors.UserError), or a folder or disk they must fix; anything else is a bug."""
    return isinstance(error, UserError) or (isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS)


def _fail(error: Exception) -> typer.Exit:
    message = str(error)
    if isinstance(error, OSError) and error.filename:
        message = f"{error.filename}: {error.strerror}; check that --run / --out name a folder you can write to, on a disk with room"
    console.print(f"[red]error:[/red] {escape(message)}")  # escaped: messages name [sections] and lists
    return typer.Exit(2)


def _bug(error: Exception) -> typer.Exit:
    """A traceback and a line saying it is a bug: not a message to act on, but one to report."""
    console.print_exception()
    console.print(f"[red]this is a bug in melanoma-pipeline[/red] ({type(error).__name__}), not a mistake in your data or options: please report it with the traceback above.")
    return typer.Exit(1)


# Writers that share the run's lock: train-cnns jobs, each claiming its own (model, fold) pairs. Every other writer holds it alone.
SHARED_WRITERS = frozenset({"train-cnns"})
# Options about how a command shares the run with others, not what it computes: left out of RUN/config.json.
UNRECORDED_OPTIONS = frozenset({"wait"})


def _note(message: str) -> None:
    console.print(f"[yellow]note:[/yellow] {escape(message)}")


def _arguments_reader(command: Callable[..., None]) -> Callable[[tuple, dict], dict[str, Any]]:
    """A function giving the arguments one call of `command` binds, by name, its defaults filled in."""
    parameters = signature(command)

    def arguments_of(args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = parameters.bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments

    return arguments_of


def holding_run_lock(command: Callable[..., None]) -> Callable[..., None]:
    """Run a command that writes RUN while it holds the run's lock (rundir.lock): a second writer refuses at
    once, naming the holder, or with --wait waits for it."""
    stage = command.__name__.replace("_", "-")
    arguments_of = _arguments_reader(command)

    @functools.wraps(command)
    def locked(*args: Any, **kwargs: Any) -> None:
        from rundir.lock import run_lock

        arguments = arguments_of(args, kwargs)
        run, wait = Path(arguments["run"]), arguments["wait"]
        with run_lock(run, stage, shared=stage in SHARED_WRITERS, wait=wait, note=_note):
            command(*args, **kwargs)

    return locked


def recorded_stage(command: Callable[..., None]) -> Callable[..., None]:
    """Run a stage under the run's lock with RUN/log.txt attached: its resolved options go to RUN/config.json
    and the manifest before it starts, its wall time after it succeeds (called from Python, as `demo` does, too)."""
    stage = command.__name__.replace("_", "-")
    arguments_of = _arguments_reader(command)

    @functools.wraps(command)
    def run_stage(*args: Any, **kwargs: Any) -> None:
        from rundir.config import config_section
        from rundir.manifest import record_stage_seconds, record_stage_start
        from rundir.runlog import run_log

        arguments = arguments_of(args, kwargs)
        run = Path(arguments["run"])
        options = {k: v for k, v in config_section(command_options(command), arguments).items() if k not in UNRECORDED_OPTIONS}
        with run_log(run):
            record_stage_start(run, stage, options)
            log.info("%s started", stage)
            started = time.perf_counter()
            try:
                command(*args, **kwargs)
            except BaseException as error:
                log.error("%s stopped: %s", stage, str(error) or type(error).__name__, exc_info=not (is_user_error(error) or isinstance(error, KeyboardInterrupt)))
                raise
            record_stage_seconds(run, stage, time.perf_counter() - started)
            log.info("%s finished in %.1f s", stage, time.perf_counter() - started)

    return holding_run_lock(run_stage)


def _run_table(
    data: Path, run: Path, fmt: str | None, metadata: Path | None, on_bad_image: str = "raise"
) -> pd.DataFrame:
    """The canonical table of `data` as this run uses it (skipped images recorded and left out), fingerprinted in the manifest."""
    return _run_data(data, run, fmt, metadata, on_bad_image)[0]


def _run_data(
    data: Path, run: Path, fmt: str | None, metadata: Path | None, on_bad_image: str = "raise"
) -> tuple[pd.DataFrame, str]:
    """`_run_table` and the name of the data's layout."""
    from metadata.dataset import run_data

    used = run_data(data, run, fmt=fmt, metadata=metadata, on_bad_image=on_bad_image)
    for note in used.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    if used.newly_skipped:
        console.print(f"[yellow]skipped {used.newly_skipped} image(s) with no file[/yellow]; see {RunLayout(run).skipped}")
    return used.table, used.format_name


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort into.")],
    patients: PatientsOption = 200,
    train_images: Annotated[Optional[int], typer.Option("--train-images", min=1, help="Number of training images instead (patients follow).")] = None,  # noqa: UP007
    layout: Annotated[
        Literal["isic2020", "isic2024"],
        typer.Option("--layout", help="isic2020: train.csv + jpeg/; isic2024: *-metadata.csv + *-image.hdf5 with tbp_lv_* columns."),
    ] = "isic2020",
    prevalence: Annotated[
        Optional[float], typer.Option("--prevalence", help="Expected melanoma share (default: the layout's, 0.1% for isic2024).")  # noqa: UP007
    ] = None,
    image_size: Annotated[int, typer.Option("--image-size", help="Image side in pixels.")] = 64,
    seed: SeedOption = 0,
) -> None:
    """Write a synthetic cohort in a competition layout (SIIM-ISIC 2020 or ISIC 2024), rendered on every core."""
    from metadata.synth import SynthConfig, generate_cohort

    config = SynthConfig(patients=patients, image_size=image_size, seed=seed, layout=layout, images=train_images, prevalence=prevalence)
    with Progress(transient=True) as progress:
        task = progress.add_task("synth: drawing lesions")
        cohort = generate_cohort(out, config, advance=lambda n, total: progress.update(task, total=total, advance=n))
    train = cohort[cohort["split"] == "train"]
    console.print(
        f"wrote {len(train)} train images ({int(train['target'].sum())} melanomas) and "
        f"{len(cohort) - len(train)} test images of {cohort['patient_id'].nunique()} patients to {out} ({layout} layout)"
    )


@app.command()
@recorded_stage
def folds(
    data: DataOption,
    run: RunOption,
    k: Annotated[int, typer.Option("--k", help="Number of folds (not used with --group-by source).")] = 5,
    group_by: Annotated[
        Literal["patient", "source"],
        typer.Option("--group-by", help="patient: triple-stratified K folds; source: leave-one-source-out."),
    ] = "patient",
    dedup: Annotated[bool, typer.Option(help="Keep exact/near-duplicate images in one fold (perceptual hash).")] = True,
    dedup_distance: Annotated[int, typer.Option("--dedup-distance", help="Max perceptual-hash bits apart for a near duplicate.")] = 2,
    max_linked_patients: Annotated[
        int, typer.Option("--max-linked-patients", help="Cut near-duplicate links that would join more patients than this into one group.")
    ] = 4,
    extra_data: Annotated[
        Optional[list[str]],  # noqa: UP007
        typer.Option("--extra-data", help="Another labelled dataset every fold trains on (repeatable): DIR, or DIR,format=NAME,metadata=CSV. Never validated on."),
    ] = None,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    on_bad_image: BadImageOption = "raise",
    seed: SeedOption = 0,
    wait: WaitOption = False,
) -> None:
    """Patient-grouped, target-stratified, image-count-balanced folds -> RUN/folds.parquet.

    Every image is decoded once here: an unreadable one stops the run (or, with --on-bad-image skip,
    is left out of the whole run and listed in RUN/skipped_images.csv); duplicate images share a fold.
    """
    from metadata.run_folds import FoldOptions, write_run_folds
    from metadata.sources import DataSource

    options = FoldOptions(k, group_by, dedup, dedup_distance, max_linked_patients, on_bad_image, seed, tuple(DataSource.parse(spec) for spec in extra_data or ()))
    table = _run_table(data, run, fmt, metadata, on_bad_image)
    with Progress(transient=True) as progress:
        task = progress.add_task("decoding and hashing images", total=int(table["image_path"].notna().sum()))
        result = write_run_folds(table, data, run, options, advance=lambda: progress.advance(task))
    for note in result.notes:
        console.print(note)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    assigned = result.folds
    summary = assigned.assign(target=result.train["target"].to_numpy(dtype=int)).groupby("fold")
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
    from rundir.io import write_json

    with Progress(transient=True) as progress:
        task = progress.add_task("decoding and hashing images")
        summary = inspect_dataset(data, fmt, metadata, advance=lambda: progress.advance(task))
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


# train-cnns options that say what to train on and where, not how: every other option is a CnnConfig field.
TRAIN_CNNS_RUN_OPTIONS = frozenset({"data", "run", "models", "model", "fold", "on_bad_image", "fmt", "metadata", "wait"})


@app.command("train-cnns")
@recorded_stage
def train_cnns(
    data: DataOption,
    run: RunOption,
    models: Annotated[str, typer.Option("--models", help="Backbones, each with an optional size and seed: small:64,small:96@1,efficientnet_b0:128.")],
    image_size: Annotated[int, typer.Option("--image-size", help="Size for models given without one.")] = 64,
    epochs: Annotated[int, typer.Option("--epochs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Peak of the warm-up + cosine schedule.")] = 2e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW's decoupled weight decay.")] = 1e-4,
    weights: Annotated[str, typer.Option("--weights", help="none, imagenet, a weights file path, or a BACKBONE folder of `pretrain` to fine-tune.")] = "none",
    target: Annotated[Literal[TARGET_CHOICES], typer.Option("--target", help="mel: binary; diagnosis: multi-class head; auto: diagnosis when every row has one.")] = "auto",
    loss: Annotated[Literal[LOSS_CHOICES], typer.Option("--loss")] = "bce",
    class_weight: Annotated[Literal[CLASS_WEIGHT_CHOICES], typer.Option("--class-weight", help="none (ranks melanoma best), sqrt, or balanced (equal weight per class).")] = "none",
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.0,
    augment: Annotated[Literal[AUGMENT_LEVELS], typer.Option("--augment")] = "light",
    mix: Annotated[Literal[MIX_CHOICES], typer.Option("--mix")] = "none",
    tta: Annotated[str, typer.Option("--tta", help="Test-time views: none,hflip,vflip,rot90,rot180,rot270.")] = "none,hflip,vflip",
    cache: Annotated[
        Literal[CACHE_CHOICES],
        typer.Option("--cache", help="auto: decoded uint8 images in memory within --cache-budget, else streamed; memory, disk or none."),
    ] = "auto",
    cache_budget_gb: Annotated[float, typer.Option("--cache-budget", min=0.0, help="GB of decoded images --cache auto keeps in memory.")] = DEFAULT_CACHE_BUDGET_GB,
    negatives_per_patient: Annotated[
        Optional[int],  # noqa: UP007
        typer.Option("--negatives-per-patient", min=1, help="Each epoch: every melanoma, at most N non-melanomas per patient, drawn afresh."),
    ] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="TensorFlow op determinism (slower); identical OOF on a CPU.")] = False,
    patience: Annotated[int, typer.Option("--patience", help="Early stop after N epochs without a better val AUC (0: off).")] = 0,
    model: Annotated[Optional[str], typer.Option("--model", help="Train only this model of --models (one job of a scale-out).")] = None,  # noqa: UP007
    fold: Annotated[Optional[int], typer.Option("--fold", help="Train only this fold (one job of a scale-out).")] = None,  # noqa: UP007
    strategy: Annotated[Literal[STRATEGY_CHOICES], typer.Option("--strategy", help="tf.distribute: auto (mirrored over 2+ GPUs), mirrored, multiworker (TF_CONFIG), tpu, none.")] = "auto",
    mixed_precision: Annotated[bool, typer.Option("--mixed-precision", help="float16 (GPU) / bfloat16 (TPU) compute; a no-op on a CPU.")] = False,
    jit: Annotated[Optional[bool], typer.Option("--jit/--no-jit", help="XLA on or off (default: Keras decides); a no-op on a CPU.")] = None,  # noqa: UP007
    color_constancy: ColorConstancyOption = "none",
    illuminant_augment: Annotated[bool, typer.Option("--illuminant-augment", help="Re-light training images under the illuminants (Shades of Gray) of other training images.")] = False,
    on_bad_image: BadImageOption = "raise",
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    seed: SeedOption = 0,
    wait: WaitOption = False,
) -> None:
    """Train every model on every fold (or one pair, for a cluster job); write OOF and fold-averaged test probabilities.

    Finished pairs are skipped; an interrupted one resumes from its last epoch checkpoint. Jobs share the run, each claiming its own pairs."""
    recipe = {name: value for name, value in locals().items() if name not in TRAIN_CNNS_RUN_OPTIONS}  # the rest is the recipe
    from cnn.options import CnnConfig
    from cnn.pairs import describe_pairs
    from cnn.train import train_run_cnns, training_progress

    table = _run_table(data, run, fmt, metadata, on_bad_image)
    with training_progress() as progress:
        outcome = train_run_cnns(table, run, models, CnnConfig.from_options(recipe), model=model, fold=fold, progress=progress, on_bad_image=on_bad_image)
    if outcome.skipped:
        console.print(f"[yellow]skipped {outcome.skipped} unreadable image(s)[/yellow]; see {RunLayout(run).skipped}")
    if outcome.shards is not None:
        console.print(f"images read from the TFRecord shards in {outcome.shards}")
    for name, auc in outcome.aucs.items():
        console.print(f"{name}: OOF AUC {auc:.4f}")
    if outcome.unfinished:
        console.print(f"still to train: {describe_pairs(outcome.unfinished)}; see `python cli.py status --run {run}`")


@app.command()
@recorded_stage
def tfrecords(
    data: DataOption,
    run: RunOption,
    image_size: Annotated[int, typer.Option("--image-size", help="Store images at this size (0: keep the original bytes).")] = 0,
    records_per_shard: Annotated[int, typer.Option("--records-per-shard")] = 2048,
    quality: Annotated[int, typer.Option("--quality", help="JPEG quality of resized images.")] = 95,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    on_bad_image: BadImageOption = "raise",
    wait: WaitOption = False,
) -> None:
    """Write the run's images as TFRecord shards; later `train-cnns` on RUN read them instead of the files.

    For large sets (ISIC 2020's multi-megapixel JPEGs): each image is decoded and resized once here,
    not on every run. Store at least the largest size a model of the run uses.
    """
    from cnn.tfrecords import write_shards

    table = _run_table(data, run, fmt, metadata, on_bad_image)
    with Progress(console=console) as progress:
        task = progress.add_task("writing shards", total=len(table))
        index = write_shards(table, run, image_size=image_size, records_per_shard=records_per_shard, quality=quality, advance=lambda n: progress.advance(task, n))
    size = sum(f.stat().st_size for f in RunLayout(run).shards.glob("*.tfrec"))
    console.print(f"{len(index)} images in {index['shard'].nunique()} shard(s), {size / 2**20:.1f} MiB: {RunLayout(run).shards}")


@app.command()
def pretrain(
    data: Annotated[list[str], DATA],  # repeatable here: every folder's images, labels ignored
    model: Annotated[str, typer.Option("--model", help="The backbone and image size to pretrain, as in --models: small:64.")],
    out: Annotated[Path, typer.Option("--out", help="BACKBONE folder to write (train-cnns --weights BACKBONE fine-tunes from it).")],
    epochs: Annotated[int, typer.Option("--epochs")] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch: each is its own pair's positive and every other view's negative.")] = 128,
    learning_rate: Annotated[float, typer.Option("--learning-rate", help="Peak of the warm-up + cosine schedule.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 1e-4,
    temperature: Annotated[float, typer.Option("--temperature", help="NT-Xent softmax temperature.")] = 0.1,
    projection_dim: Annotated[int, typer.Option("--projection-dim", help="Output size of the projection head (discarded after pretraining).")] = 64,
    augment: Annotated[Literal[AUGMENT_LEVELS], typer.Option("--augment", help="Augmentation of each view.")] = "strong",
    cache: Annotated[Literal[CACHE_CHOICES], typer.Option("--cache", help="As train-cnns: auto, memory, disk or none (streamed).")] = "auto",
    cache_budget_gb: Annotated[float, typer.Option("--cache-budget", min=0.0, help="GB of decoded images --cache auto keeps in memory.")] = DEFAULT_CACHE_BUDGET_GB,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="TensorFlow op determinism: a resumed call ends where an uninterrupted one would (CPU).")] = False,
    color_constancy: ColorConstancyOption = "none",
    seed: SeedOption = 0,
) -> None:
    """Self-supervised pretraining (SimCLR: two augmented views per image, NT-Xent loss) of a backbone on unlabelled images.

    --data is repeatable: every image of each folder is used (test images too, labels ignored); a folder
    is DIR in any layout, DIR,format=NAME,metadata=CSV, or a run's tfrecords/ folder. Resumable: an interrupted call picks up at its last finished epoch. Fine-tune with `train-cnns --weights BACKBONE`.
    """
    from cnn.options import PretrainConfig
    from cnn.pretrain import pretrain_backbone
    from metadata.sources import DataSource

    backbone, image_size = _single_model(model)
    config = PretrainConfig(
        backbone=backbone, image_size=image_size, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        temperature=temperature, projection_dim=projection_dim, augment=augment, color_constancy=color_constancy, cache=cache,
        cache_budget_gb=cache_budget_gb, seed=seed, deterministic=deterministic,
    )
    record = pretrain_backbone([DataSource.parse(spec, option="--data") for spec in data], config, out=_writable_folder(out))
    console.print(f"{record['backbone']}:{record['image_size']} pretrained on {record['images']} images, final contrastive loss {record['loss'][-1]:.4f}: {out}")


def _single_model(spec: str) -> tuple[str, int]:
    """`--model small:64` as (backbone, size): one backbone, no member seed."""
    from cnn.backbones import parse_model_specs

    models = parse_model_specs(spec, 64)
    if len(models) != 1 or "@" in spec:
        raise OptionError(f"--model {spec!r}: name one backbone and its size, e.g. small:64.")
    return next(iter(models.items()))


@app.command()
@recorded_stage
def features(
    data: DataOption,
    run: RunOption,
    families: Annotated[str, typer.Option("--families", help="Feature families, comma-separated: shape,color,texture.")] = "shape,color,texture",
    image_size: Annotated[int, typer.Option("--image-size", min=32, help="Images are resized to this square before the lesion is segmented.")] = 128,
    color_constancy: ColorConstancyOption = "none",
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="Worker processes (default: every core).")] = None,  # noqa: UP007
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    wait: WaitOption = False,
) -> None:
    """Dermoscopy features of every image (shape and asymmetry, colour, texture on a lesion mask): RUN/features/<family>.parquet.

    The next `stack` takes them as a third input family, with their rank and z-score within the
    patient, and reports each family's gain. An interrupted call resumes from its last saved chunk.
    """
    from fusion.image_features.stage import FeatureRecipe, image_rows, run_features

    recipe = FeatureRecipe(tuple(f.strip() for f in families.split(",") if f.strip()), image_size, color_constancy)
    table = _run_table(data, run, fmt, metadata)
    with Progress(console=console) as progress:
        task = progress.add_task("dermoscopy features", total=len(image_rows(table)))
        counts = run_features(table, run, recipe, n_jobs=jobs, advance=lambda n: progress.advance(task, n))
    console.print(f"features: {len(recipe.columns())} per image for {counts['images']} images in {RunLayout(run).features}")
    if counts["no_lesion_found"]:
        console.print(f"[yellow]note:[/yellow] no lesion stood out in {counts['no_lesion_found']} image(s); their features are missing (NaN)")


def _write_report(run: Path, table: pd.DataFrame | None, n_boot: int, seed: int, *, check_complete: bool = True) -> None:
    """Write the report files and print its CV and stack-vs-CNN tables and its warnings (`check_complete=False`:
    as part of the stage that has just written what the report reads)."""
    from ensemble.report import COMPACT_CV_COLUMNS, Bootstrap, summary_tables, write_report

    written = write_report(run, table, Bootstrap(n_boot=n_boot, seed=seed), check_complete=check_complete)
    for summary in summary_tables(written, COMPACT_CV_COLUMNS):
        out = Table(*summary.header, title=summary.title)
        for row in summary.rows:
            out.add_row(*row)
        console.print(out)
    for warning in written["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    layout = RunLayout(run)
    console.print(f"report: {layout.report_html} (standalone), {layout.report_md} (+ figures/), {layout.report_json}")


@app.command()
@holding_run_lock
def report(
    run: RunOption,
    data: OptionalDataOption = None,
    bootstrap: BootstrapOption = 1000,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    seed: SeedOption = 0,
    wait: WaitOption = False,
) -> None:
    """Write RUN/report.json, RUN/report.html (standalone) and RUN/report.md (+ RUN/figures/) from the run's OOF predictions.

    With the run's --data: subgroup AUCs, multi-class metrics and a labelled test set's table too.
    """
    _write_report(run, _run_table(data, run, fmt, metadata) if data is not None else None, bootstrap, seed)


@app.command()
@recorded_stage
def stack(
    data: DataOption,
    run: RunOption,
    rounds: Annotated[int, typer.Option("--rounds", help="LightGBM boosting rounds (fixed, not tuned on the held-out fold).")] = 300,
    fmt: FormatOption = None,
    metadata: MetadataOption = None,
    seed: SeedOption = 0,
    wait: WaitOption = False,
) -> None:
    """LightGBM stacker over CNN OOF scores (zero or more CNNs) + metadata + patient context; then the report.

    With test rows, RUN/submission.csv is the stack's submission in the data's own challenge format
    (ISIC 2024 data: isic_id,target; otherwise SIIM-ISIC 2020's image_name,target), written by `submit`'s code.
    """
    from ensemble.submission import write_stack_submission
    from fusion.stage import fit_run_stack, write_stack

    table, layout = _run_data(data, run, fmt, metadata)
    fit = fit_run_stack(table, run, num_boost_round=rounds, seed=seed)
    with writing(run, "stack"):  # the stack's files, its submission and its report: together or not at all
        write_stack(run, fit)
        chosen = write_stack_submission(run, table, layout)
        wrote = f"; submission ({chosen.title}): {RunLayout(run).submission}" if chosen else " (no test rows)"
        console.print(f"stack: OOF AUC {fit.auc:.4f}{wrote}")
        _write_report(run, table, 1000, seed, check_complete=False)


@app.command()
@holding_run_lock
def submit(
    run: RunOption,
    submission_format: Annotated[
        Literal[SUBMISSION_FORMAT_NAMES],
        typer.Option(
            "--submission-format", help="isic2020 (image_name,target), isic2024 (isic_id,target), isic2019 or isic2018 (image + a column per diagnosis)."
        ),
    ],
    model: Annotated[
        Optional[str],  # noqa: UP007
        typer.Option("--model", help="Model whose test predictions to submit; default lightgbm_stack (multi-class: mean_blend)."),
    ] = None,
    data: OptionalDataOption = None,
    fmt: FormatOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="CSV to write; default RUN/submission_<format>.csv.")] = None,  # noqa: UP007
    raw_probabilities: Annotated[
        bool,
        typer.Option("--raw-probabilities", help="isic2018/2019: submit the probabilities as predicted, not divided by the training class prior."),
    ] = False,
    wait: WaitOption = False,
) -> None:
    """Write a validated competition submission CSV (atomically) from the run's test predictions.

    With the run's --data, its test split is the id list the submission is checked against (default:
    the ids every model predicted).
    """
    from ensemble.run_files import load_run_predictions
    from ensemble.submission import expected_test_ids, run_submission, submitted_model

    chosen = SUBMISSION_FORMATS[submission_format]
    predictions = load_run_predictions(run)
    expected = expected_test_ids(predictions, None if data is None else _run_table(data, run, fmt, None))
    path = out or RunLayout(run).submission_file(submission_format)
    frame, notes = run_submission(predictions, chosen, model, expected, path=path, adjust_prior=not raw_probabilities)
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"{chosen.title}: {len(frame)} test images from {submitted_model(chosen, predictions, model)} -> {path}")


@app.command()
def export(
    run: RunOption,
    out: Annotated[Path, typer.Option("--out", help="New folder for the bundle.")],
    sensitivity: Annotated[float, typer.Option("--sensitivity", help="Target sensitivity of the alert threshold, on OOF predictions.")] = 0.95,
    seed: SeedOption = 0,
) -> None:
    """Export a finished run (CNNs + stack) as a self-contained bundle that scores new patients (`predict`)."""
    from ensemble.bundle import export_bundle

    exported = export_bundle(run, out, sensitivity=sensitivity, seed=seed)
    console.print(f"bundle: {out} ({', '.join(exported.cnns)} x {len(exported.folds)} folds + stack)")
    out_table = Table("operating point", "alert at", "OOF sens.", "OOF spec. [95% CI]", title=f"Alert for {sensitivity:.0%} sensitivity per missingness pattern (OOF, inputs masked)")
    for name, point in exported.operating_points.items():
        low, high = point.oof_specificity_ci
        out_table.add_row(name, f">= {point.threshold:.4f}", f"{point.oof_sensitivity:.3f}", f"{point.oof_specificity:.3f} [{low:.3f}, {high:.3f}]")
    console.print(out_table)
    for pattern, source in exported.pattern_sources.items():
        if pattern != source:
            console.print(f"note: too few OOF melanomas of pattern {pattern}: its lesions are judged by {source}")


@app.command()
def predict(
    bundle: BundleOption,
    out: Annotated[Path, typer.Option("--out", help="Folder for predictions.csv, summary.json and explain/.")],
    data: OptionalDataOption = None,
    images: Annotated[Optional[Path], typer.Option("--images", help="A folder of images (each its own patient unless --metadata names patients).")] = None,  # noqa: UP007
    metadata: MetadataOption = None,
    split: SplitOption = "all",
    recursive: Annotated[bool, typer.Option("--recursive", help="With --images: score the images in its sub-folders too.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded and scored at a time (bounds memory).")] = 32,
    explain: Annotated[bool, typer.Option("--explain", help="Grad-CAM overlay of every alerted image; an HTML page per patient.")] = False,
    fmt: FormatOption = None,
) -> None:
    """Score new patients with an exported bundle: probability, alert at the operating point, rank within patient."""
    from ensemble.bundle import load_bundle, version_differences
    from ensemble.predict import files_not_scored, score_patients, scoring_rows, write_predictions

    rows = scoring_rows(data, images, metadata=metadata, fmt=fmt, split=split, recursive=recursive)
    not_scored = files_not_scored(images, recursive) if images is not None else []
    if not_scored:
        hint = " (images in sub-folders are scored with --recursive)" if not recursive else ""
        console.print(f"[yellow]note:[/yellow] {len(not_scored)} file(s) in {images} not scored{hint}, e.g. {', '.join(not_scored[:3])}; listed in summary.json")
    loaded = load_bundle(bundle)
    for difference in version_differences(loaded.manifest):
        console.print(f"[yellow]note:[/yellow] {difference}")
    with Progress(console=console) as progress:
        task = progress.add_task("scoring images", total=len(rows) * len(loaded.cnns))
        scored = score_patients(loaded, rows, batch_size=batch_size, advance=lambda n: progress.advance(task, n))
    summary = write_predictions(scored, loaded, out, not_scored)
    for note in summary["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    for warning in summary["shift_warnings"]:
        console.print(f"[yellow]warning: this batch looks unlike the training data:[/yellow] {warning}")
    console.print(
        f"{summary['images']} image(s) of {summary['patients']} patient(s), {summary['alerts']} alert(s): {out / 'predictions.csv'}"
    )
    if explain:
        from ensemble.explain import write_explanations

        with Progress(console=console) as progress:
            task = progress.add_task("Grad-CAM of alerted images", total=summary["alerts"])
            index = write_explanations(
                loaded, rows, scored.predictions, out / "explain", batch_size=batch_size, advance=lambda n: progress.advance(task, n)
            )
        console.print(f"explanations: {index}")


@app.command()
def serve(
    bundle: Annotated[Optional[Path], BUNDLE] = None,  # noqa: UP007
    host: Annotated[Optional[str], typer.Option("--host", help="Interface to listen on; 127.0.0.1 keeps the service on this machine.")] = None,  # noqa: UP007
    port: Annotated[Optional[int], typer.Option("--port")] = None,  # noqa: UP007
    database: DatabaseOption = None,
    store: Annotated[Optional[Path], typer.Option("--store", help="Folder of the uploaded images (default: beside the SQLite file; required for other databases).")] = None,  # noqa: UP007
    token: Annotated[Optional[str], typer.Option("--token", help="Access tokens, label=secret comma-separated (24+ characters each); every call and page then needs one.")] = None,  # noqa: UP007
    settings_file: Annotated[Optional[Path], typer.Option("--settings", help="A TOML file of the service's settings (flags and MELANOMA_TRIAGE_* variables win).")] = None,  # noqa: UP007
) -> None:
    """The triage service: upload a patient's lesions, see them ranked with alerts and differential diagnoses, review the worklist.

    JSON API under /api/v1 (bearer token; schema /openapi.json), pages at /, /patients/ID and /worklist
    (sign in at /login). Every read of a patient's data is recorded; one JSON access-log line per request goes to stderr.
    """
    import uvicorn

    from triage.http.app import create_app
    from triage.settings import LOOPBACK, Settings

    settings = Settings.load(file=settings_file, bundle=bundle, host=host, port=port, database=database, store=store, tokens=token)
    if settings.host not in LOOPBACK and not settings.token_labels:
        raise OptionError(f"--host {settings.host}: a service others can reach needs --token (or MELANOMA_TRIAGE_TOKENS); it holds patient data.")
    _log_json_lines("triage")
    service_app = create_app(settings)
    console.print(f"serving {settings.bundle} on http://{settings.host}:{settings.port} (database {settings.database.split('@')[-1]}, images {settings.image_store})")
    uvicorn.run(service_app, host=settings.host, port=settings.port, log_level="warning", access_log=False)


def _log_json_lines(logger: str) -> None:
    """The service's log (its access log among it) as plain lines on stderr, each access record a JSON object."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    target = logging.getLogger(logger)
    target.addHandler(handler)
    target.setLevel(logging.INFO)


@app.command()
def migrate(database: Annotated[str, DATABASE]) -> None:
    """Take the triage service's database to this version's schema (a database of any earlier version; its rows kept)."""
    from triage.db.engine import database_engine
    from triage.db.engine import migrate as upgrade

    before, now = upgrade(database_engine(database))
    console.print(f"database {database.split('@')[-1]}: {before} -> revision {now}")


@app.command()
def recalibrate(
    bundle: BundleOption,
    out: Annotated[Path, typer.Option("--out", help="New folder for the recalibrated bundle (a new version).")],
    database: DatabaseOption = None,
    outcomes: Annotated[Optional[Path], typer.Option("--outcomes", help="predict's predictions.csv with a target column (1 melanoma, 0 not), instead of --database.")] = None,  # noqa: UP007
    sensitivity: Annotated[float, typer.Option("--sensitivity", help="Target sensitivity of each recalibrated alert, on the site's lesions.")] = 0.95,
    min_melanomas: Annotated[int, typer.Option("--min-melanomas", min=5, help="Melanomas (and benign lesions) with outcomes an operating point needs to be recalibrated.")] = 20,
    bootstrap: BootstrapOption = 1000,
    seed: SeedOption = 0,
) -> None:
    """Re-choose each operating point's calibration and alert threshold on the site's own lesions with known outcomes.

    Reads the triage service's database (the lesions scored by this bundle, with their latest outcomes)
    or a CSV; writes a new bundle version that records what it was recalibrated on. An operating point
    with too few outcomes keeps the bundle's; with none to recalibrate it refuses, saying how many more are needed.
    """
    import pandas as pd

    from ensemble.bundle import load_bundle
    from ensemble.recalibrate import recalibrate_bundle

    if (database is None) == (outcomes is None):
        raise OptionError("give exactly one of --database URL (the triage service's) or --outcomes CSV.")
    loaded = load_bundle(bundle)
    if database is not None:
        from triage.site import bundle_outcomes

        site, source = bundle_outcomes(database, bundle), f"database {database.split('@')[-1]}"
    else:
        site, source = pd.read_csv(outcomes, dtype={"patient_id": str}), str(outcomes)
    result = recalibrate_bundle(loaded, site, out, source=source, sensitivity=sensitivity, min_melanomas=min_melanomas, n_boot=bootstrap, seed=seed)
    table = Table("operating point", "alert at", "site sens. [95% CI]", "site spec. [95% CI]", title=f"Recalibrated on {result.n_lesions} lesions ({result.n_melanomas} melanomas)")
    for name, point in result.points.items():
        table.add_row(name, f">= {point.threshold:.4f}", f"{point.oof_sensitivity:.3f} [{point.oof_sensitivity_ci[0]:.3f}, {point.oof_sensitivity_ci[1]:.3f}]",
                      f"{point.oof_specificity:.3f} [{point.oof_specificity_ci[0]:.3f}, {point.oof_specificity_ci[1]:.3f}]")
    console.print(table)
    for name, why in result.kept.items():
        console.print(f"[yellow]kept the bundle's operating point {name}[/yellow]: {why}")
    console.print(f"recalibrated bundle: {out}")


@app.command()
def harvest(
    database: Annotated[str, DATABASE],
    store: Annotated[Path, typer.Option("--store", help="The triage service's image folder.")],
    out: Annotated[Path, typer.Option("--out", help="New data folder (SIIM-ISIC 2020 layout).")],
) -> None:
    """Write the lesions with known outcomes as a dataset in the SIIM-ISIC 2020 layout (train.csv + jpeg/train/), for inspect, validate, folds and train-cnns."""
    from triage.harvest import harvested

    table = harvested(database, store, out)
    console.print(f"{len(table)} lesion(s) of {table['patient_id'].nunique()} patient(s), {int(table['target'].sum())} melanoma(s): {out}")


@app.command()
def validate(
    bundle: BundleOption,
    data: DataOption,
    metadata_mode: Annotated[
        Literal[METADATA_MODE_CHOICES],
        typer.Option("--metadata-mode", help="as-given: score with the data's age/sex/site/patients; none: without them (each image its own patient)."),
    ] = "as-given",
    metadata: MetadataOption = None,
    split: SplitOption = "all",
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for validation.json and validation.md.")] = None,  # noqa: UP007
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images decoded and scored at a time (bounds memory).")] = 32,
    bootstrap: BootstrapOption = 1000,
    fmt: FormatOption = None,
    seed: SeedOption = 0,
) -> None:
    """Score a labelled set with a bundle and compare AUC, sensitivity and specificity at each operating point with what it promised."""
    from ensemble.bundle import load_bundle
    from ensemble.predict import scoring_rows
    from ensemble.validate import validate_bundle, validation_rows, write_validation

    rows, unlabelled = validation_rows(scoring_rows(data, None, metadata=metadata, fmt=fmt, split=split), metadata_mode)
    loaded = load_bundle(bundle)
    with Progress(console=console) as progress:
        task = progress.add_task("scoring images", total=len(rows) * len(loaded.cnns))
        report = validate_bundle(loaded, rows, batch_size=batch_size, advance=lambda n: progress.advance(task, n), n_boot=bootstrap, seed=seed)
    if unlabelled:
        console.print(f"[yellow]note:[/yellow] {unlabelled} row(s) without a label were not scored")
    low, high = report["mel_auc_ci"]
    console.print(
        f"{report['n_images']} images, {report['n_melanoma']} melanomas (metadata {metadata_mode}): melanoma AUC {report['mel_auc']:.3f} "
        f"[{low:.3f}, {high:.3f}] (CNNs alone {report['mel_auc_cnn_only']:.3f}; bundle OOF {report['bundle_oof_auc'] or float('nan'):.3f}), "
        f"sensitivity at the alert {report['sensitivity_at_alert']:.3f} (promised {report['promised_sensitivity']:.3f}), "
        f"specificity {report['specificity_at_alert']:.3f}, alert rate {report['alert_rate']:.3f}, ECE {report['ece']:.3f}"
    )
    for warning in report["warnings"]:
        console.print(f"[red]warning:[/red] {warning}")
    for warning in report["shift_warnings"]:
        console.print(f"[yellow]warning: this set looks unlike the training data:[/yellow] {warning}")
    if out is not None:
        write_validation(report, out)
        console.print(f"validation: {out / 'validation.md'}, {out / 'validation.json'}")


STATE_COLOURS = {"done": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}


@app.command()
def status(run: RunOption) -> None:
    """Each declared (model, fold) pair: done, running, failed, interrupted (re-run resumes it) or pending; best val AUC so far.
    Then each stage's outputs (complete, being written, interrupted or stale) and the commands writing the run now."""
    from cnn.pairs import run_status
    from rundir.completion import stage_states
    from rundir.lock import live_writers

    now = time.time()
    pairs, stages = run_status(run, now), stage_states(run)
    if not pairs and not stages:
        raise RunStateError(f"{run} has no CNN (model, fold) pairs yet: run `train-cnns` on it first.")
    if pairs:
        out = Table("model", "fold", "state", "epochs", "best val AUC", "detail", title=f"CNN pairs of {run}")
        for pair in pairs:
            out.add_row(
                pair.model, str(pair.fold), f"[{STATE_COLOURS[pair.state]}]{pair.state}[/]", f"{pair.epochs_done}/{pair.epochs or '?'}",
                "-" if pair.best_val_auc is None else f"{pair.best_val_auc:.4f}", pair.detail,
            )
        console.print(out)
        console.print(", ".join(f"{count} {state}" for state, count in Counter(p.state for p in pairs).items()))
    for stage, state in stages.items():
        console.print(f"stage {stage}: {escape(state)}")
    for writer in live_writers(run):
        console.print(f"being written by {escape(writer.describe(now))}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Run directory; the synthetic data goes to OUT/data.")] = Path("runs/demo"),
    patients: PatientsOption = 160,
    seed: SeedOption = 0,
) -> None:
    """Whole pipeline on a small synthetic cohort: synth, 3 folds, two CNNs, stack, report (< 5 min on 2 CPUs)."""
    started = time.perf_counter()
    data = out / "data"
    synth(out=data, patients=patients, image_size=32, seed=seed)
    folds(data=data, run=out, k=3, seed=seed)
    train_cnns(data=data, run=out, models="small,mobilenet_v3_small", image_size=32, epochs=4, seed=seed)
    stack(data=data, run=out, seed=seed)
    console.print(f"submission: {RunLayout(out).submission}")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    app()
