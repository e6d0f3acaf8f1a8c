"""An exported model bundle: everything needed to score new patients, without the training data.

Its files are named by `rundir.layout.BundleLayout`:

    BUNDLE/manifest.json              format, library versions, SHA-256 of every other file
    BUNDLE/config.json                CNN members (image size, TTA views, classes, colour constancy,
                                      training priors), category vocabularies, the scoring reference
    BUNDLE/cnn/<model>/fold<k>.keras  inference-only Keras models (native format, no Lambda layers)
    BUNDLE/stack/                     the fitted stack model (`fusion.stack_model`: fold boosters, CNN
                                      scales, features, calibration and operating point per pattern)

Nothing in a bundle is pickled: the Keras models load with `safe_mode=True` (checked at export),
the boosters and JSON are text. A bundle whose files do not match the manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras

from cnn.outputs import read_cnn_outputs
from cnn.targets import TargetSpec
from errors import RunStateError
from evaluation.operating_point import OperatingPoint
from fusion.stack_model import StackModel
from metadata.schema import SEXES, SITES
from rundir.completion import require_complete
from rundir.io import read_json, read_table, write_json
from rundir.layout import MASKED_OOF_FILE, SCORING_REFERENCE_FILE, BundleLayout, RunLayout
from rundir.manifest import package_versions

BUNDLE_FORMAT = "melanoma-pipeline-bundle"
BUNDLE_FORMAT_VERSION = 3  # 2: an operating point and a calibration per missingness pattern; 3: the stack model's own files
VERSIONED_PACKAGES = ("melanoma-pipeline", "tensorflow", "keras", "lightgbm", "numpy", "pandas")
VOCABULARIES: dict[str, list[str]] = {"sex": list(SEXES), "site": list(SITES)}


class BundleError(RunStateError):
    """A run that cannot be exported, or a bundle that cannot be trusted; the message says what to do."""




@dataclass(frozen=True)
class CnnMember:
    """One CNN of the ensemble: its fold models and how they see an image."""

    name: str
    image_size: int
    tta: tuple[str, ...]
    target: TargetSpec
    models: dict[int, keras.Model]
    color_constancy: str = "none"  # as in training (cnn.pipeline.COLOR_CONSTANCY)
    priors: dict[int, list[float]] | None = None  # fold -> the class prior its diagnosis head was fitted to


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified bundle: the CNN members, the fitted stack model, the scoring reference."""

    path: Path
    manifest: dict
    cnns: list[CnnMember]
    stack: StackModel  # with an operating point per pattern source
    reference: dict  # what the run's OOF rows and training images looked like (fusion.shift)

    @property
    def operating_points(self) -> dict[str, OperatingPoint]:
        return self.stack.operating_points


@dataclass(frozen=True)
class ExportSummary:
    """What `export` wrote: the CNNs, the folds, the operating point and source of each pattern."""

    cnns: list[str]
    folds: list[int]
    operating_points: dict[str, OperatingPoint]
    pattern_sources: dict[str, str]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (model files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_differences(manifest: dict) -> list[str]:
    """Packages whose installed version differs from the exporting one (results may differ slightly)."""
    now = package_versions(VERSIONED_PACKAGES)
    return [
        f"{package} {then} at export, {now.get(package)} here"
        for package, then in manifest["versions"].items()
        if now.get(package) != then
    ]


def _required_json(path: Path, what: str) -> dict:
    found = read_json(path)
    if found is None:
        raise BundleError(f"{path} is missing: {what}.")
    return found


def _load_keras(path: Path) -> keras.Model:
    """Load a Keras model in safe mode (no Lambda layers, no pickled code), for inference only."""
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:  # Keras raises ValueError, TypeError or its own errors here
        raise BundleError(
            f"{path} does not load as a safe Keras model ({error}); it must hold only registered Keras layers: "
            "retrain it with this version of `train-cnns`."
        ) from error


def _export_cnn(run_dir: Path, name: str, folds: list[int], building: BundleLayout) -> dict:
    """Copy one CNN's fold models (re-saved without optimizer state) and describe them for the config."""
    layout = RunLayout(run_dir)
    oof_folds = sorted(int(f) for f in read_cnn_outputs(run_dir, name)[0]["fold"].unique())
    if oof_folds != folds:
        raise BundleError(
            f"{layout.model_dir(name)}/oof.parquet covers folds {oof_folds} but the stack has folds {folds}; "
            "re-run `train-cnns` and `stack` on the same folds."
        )
    history = _required_json(layout.history(name, folds[0]), "re-run `train-cnns`")  # one recipe for all folds
    for fold in folds:
        model_file = layout.model_file(name, fold)
        if not model_file.exists():
            raise BundleError(f"{model_file} is missing: re-run `train-cnns` on {run_dir}.")
        target = building.cnn_model(name, fold)
        target.parent.mkdir(parents=True, exist_ok=True)
        _load_keras(model_file).save(target)
    return {
        "name": name,
        "folds": folds,
        "image_size": int(history["config"]["image_size"]),
        "tta": list(history["config"]["tta"]),
        "color_constancy": history["config"].get("color_constancy", "none"),
        "classes": list(history.get("classes", ["MEL"])),  # runs from before diagnosis heads had melanoma heads only
        "training_priors": _training_priors(layout, name, folds),
        "extra_data": history.get("extra_data", {}),  # other datasets' images it trained on (folds --extra-data)
    }


def _training_priors(layout: RunLayout, name: str, folds: list[int]) -> dict[str, list[float]] | None:
    """Each fold model's training class prior (diagnosis heads; None for a melanoma head or an older run)."""
    priors = {str(f): read_json(layout.history(name, f)).get("training_prior") for f in folds}
    return None if any(p is None for p in priors.values()) else priors


def _exported_stack(run_dir: Path, sensitivity: float, n_boot: int, seed: int) -> StackModel:
    """The run's fitted stack model with the operating point of each pattern source chosen on its masked OOF rows."""
    layout = RunLayout(run_dir)
    stack = StackModel.load(layout.stack)
    if not stack.cnn_names:
        raise BundleError(
            f"the stack of {run_dir} uses no CNN (a metadata-only baseline); a bundle scores images: "
            "run `train-cnns` and then `stack` on this run first."
        )
    return stack.with_operating_points(read_table(layout.stack / MASKED_OOF_FILE, "stack"), sensitivity=sensitivity, n_boot=n_boot, seed=seed)


def export_bundle(run_dir: Path, out: Path, *, sensitivity: float = 0.95, n_boot: int = 1000, seed: int = 0) -> ExportSummary:
    """Write the bundle of a finished run (CNNs + stack model with its operating points) to `out`.

    The bundle is assembled in a temporary folder and renamed into place, so a failed export leaves
    nothing behind that could be mistaken for a bundle.
    """
    run_dir, out = Path(run_dir), Path(out)
    require_complete(run_dir, "train-cnns", "stack")
    stack = _exported_stack(run_dir, sensitivity, n_boot, seed)

    def build(building: BundleLayout) -> None:
        config = {
            "cnns": [_export_cnn(run_dir, name, stack.folds, building) for name in stack.cnn_names],
            "vocabularies": VOCABULARIES,
            "scoring_reference": _required_json(RunLayout(run_dir).stack / SCORING_REFERENCE_FILE, "re-run `python cli.py stack`"),
        }
        stack.save(building.stack_model.root)
        write_json(config, building.config)
        _write_manifest(building, source_run=str(run_dir.resolve()), stack_oof_auc=(read_json(RunLayout(run_dir).stack_recipe) or {}).get("oof_auc"))

    _assembled(out, build)
    return ExportSummary(stack.cnn_names, stack.folds, stack.operating_points, stack.pattern_sources)


def _write_manifest(building: BundleLayout, **provenance: object) -> None:
    """BUNDLE/manifest.json, last: where the bundle comes from and the SHA-256 of every other file."""
    files = {p.relative_to(building.root).as_posix(): file_sha256(p) for p in sorted(building.root.rglob("*")) if p.is_file()}
    write_json(
        {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **provenance,
            "versions": package_versions(VERSIONED_PACKAGES),
            "files": files,
        },
        building.manifest,
    )


def _assembled(out: Path, build: Callable[[BundleLayout], None]) -> None:
    """Build a bundle in a temporary folder beside `out` and rename it into place: a failure leaves nothing that looks like a bundle."""
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty; choose a new --out or delete it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = BundleLayout(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(building)
        if out.exists():
            out.rmdir()
        building.root.rename(out)
    finally:
        shutil.rmtree(building.root, ignore_errors=True)


def write_bundle_version(bundle: Bundle, stack: StackModel, out: Path, *, recalibration: dict) -> None:
    """A new version of a bundle with another stack model (the CNNs and config copied as they are),
    whose manifest names the bundle it came from and what changed."""
    source = BundleLayout(bundle.path)

    def build(building: BundleLayout) -> None:
        for name in bundle.manifest["files"]:
            if not name.startswith(source.stack_model.root.name + "/"):
                (building.root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.root / name, building.root / name)
        stack.save(building.stack_model.root)
        _write_manifest(building, source_run=bundle.manifest.get("source_run"), stack_oof_auc=bundle.manifest.get("stack_oof_auc"),
                        derived_from={"bundle_sha256": file_sha256(source.manifest), "created": bundle.manifest["created"]}, recalibration=recalibration)

    _assembled(Path(out), build)


def verify_bundle(path: Path) -> dict:
    """The manifest of a bundle whose every listed file exists with its recorded checksum; else BundleError."""
    layout = BundleLayout(path)
    manifest = _required_json(layout.manifest, "not a bundle folder; create one with `python cli.py export`")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{layout.manifest}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this code reads {BUNDLE_FORMAT!r} version {BUNDLE_FORMAT_VERSION}: re-export the run."
        )
    for name, expected in manifest["files"].items():
        file = layout.root / name
        if not file.is_file():
            raise BundleError(f"{file} is listed in {layout.manifest.name} but missing; the bundle is incomplete: re-export it.")
        if file_sha256(file) != expected:
            raise BundleError(
                f"{file}: checksum differs from {layout.manifest.name} (the file was changed or corrupted); "
                "refusing to score with it: re-export the bundle with `python cli.py export`."
            )
    return manifest


def _member(layout: BundleLayout, entry: dict) -> CnnMember:
    return CnnMember(
        name=entry["name"],
        image_size=int(entry["image_size"]),
        tta=tuple(entry["tta"]),
        target=TargetSpec(tuple(entry["classes"])),
        models={int(f): _load_keras(layout.cnn_model(entry["name"], f)) for f in entry["folds"]},
        color_constancy=entry.get("color_constancy", "none"),
        priors=None if entry.get("training_priors") is None else {int(f): p for f, p in entry["training_priors"].items()},
    )


def load_bundle(path: Path) -> Bundle:
    """Verify a bundle's checksums, then load its CNN fold models and its stack model."""
    layout = BundleLayout(path)
    manifest = verify_bundle(layout.root)
    config = json.loads(layout.config.read_text())
    if config["vocabularies"] != VOCABULARIES:
        raise BundleError(
            f"{layout.config}: the stack was trained with category vocabularies {config['vocabularies']}, "
            f"this code has {VOCABULARIES}; score with the pipeline version that exported it ({manifest['versions']})."
        )
    return Bundle(
        path=layout.root,
        manifest=manifest,
        cnns=[_member(layout, entry) for entry in config["cnns"]],
        stack=StackModel.load(layout.stack_model.root),
        reference=config["scoring_reference"],
    )
