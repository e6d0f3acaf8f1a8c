"""An exported model bundle: everything needed to score new patients, without the training data.

    BUNDLE/manifest.json              format, library versions, SHA-256 of every other file
    BUNDLE/config.json                CNNs (image size, TTA views, classes, fold-model scales),
                                      stack features (and the dermoscopy features' recipe), category vocabularies, the calibration and
                                      operating point of each missingness pattern, the scoring
                                      reference for shift warnings
    BUNDLE/cnn/<model>/fold<k>.keras  inference-only Keras models (native format, no Lambda layers)
    BUNDLE/stack/model_fold<k>.txt    LightGBM text models

Nothing in a bundle is pickled: the Keras models load with `safe_mode=True` (checked at export),
the boosters and JSON are text. A bundle whose files do not match the manifest is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import lightgbm as lgb
import pandas as pd

from cnn.targets import TargetSpec
from errors import RunStateError
from evaluation.operating_point import OperatingPoint, choose_operating_point
from fusion.cnn_scores import fold_model_scales
from fusion.image_features.stage import FeatureRecipe
from fusion.missingness import PatternCalibration
from fusion.stacker import LightGBMStacker
from metadata.schema import SEXES, SITES
from rundir.completion import require_complete
from rundir.io import read_json, read_table, write_json
from rundir.layout import MASKED_OOF_FILE, SCORING_REFERENCE_FILE, RunLayout
from rundir.manifest import package_versions

BUNDLE_FORMAT = "melanoma-pipeline-bundle"
BUNDLE_FORMAT_VERSION = 2  # 2: an operating point and a calibration per missingness pattern
MANIFEST = "manifest.json"
CONFIG = "config.json"
VERSIONED_PACKAGES = ("melanoma-pipeline", "tensorflow", "keras", "lightgbm", "numpy", "pandas")
VOCABULARIES: dict[str, list[str]] = {"sex": list(SEXES), "site": list(SITES)}


class BundleError(RunStateError):
    """A run that cannot be exported, or a bundle that cannot be trusted; the message says what to do."""


@dataclass(frozen=True)
class CnnMember:
    """One CNN of the ensemble: its fold models and how their outputs become a stacker feature."""

    name: str
    image_size: int
    tta: tuple[str, ...]
    target: TargetSpec
    scales: pd.DataFrame  # fold -> mean, std of that fold model's OOF log-odds (see ensemble.blend)
    models: dict[int, keras.Model]
    color_constancy: str = "none"  # as in training (cnn.pipeline.COLOR_CONSTANCY)
    priors: dict[int, list[float]] | None = None  # fold -> the class prior its diagnosis head was fitted to


@dataclass(frozen=True)
class Bundle:
    """A loaded, checksum-verified bundle."""

    path: Path
    manifest: dict
    cnns: list[CnnMember]
    stackers: list[LightGBMStacker]  # one per fold; new patients get their mean, as the run's test set did
    features: list[str]
    operating_points: dict[str, OperatingPoint]  # by pattern source (see fusion.missingness)
    calibration: PatternCalibration  # pattern -> source, and the source's calibration
    reference: dict  # what the run's OOF rows and training images looked like (fusion.shift)
    image_features: FeatureRecipe | None = None  # the dermoscopy features the stack takes, computed as `features` did


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


def _export_cnn(run_dir: Path, name: str, folds: list[int], out: Path) -> dict:
    """Copy one CNN's fold models (re-saved without optimizer state) and describe them for the config."""
    layout = RunLayout(run_dir)
    model_dir = layout.model_dir(name)
    scales = fold_model_scales(read_table(layout.cnn_outputs(name)[0], "train-cnns"))
    if sorted(int(f) for f in scales.index) != folds:
        raise BundleError(
            f"{model_dir}/oof.parquet covers folds {sorted(scales.index)} but the stack has folds {folds}; "
            "re-run `train-cnns` and `stack` on the same folds."
        )
    history = _required_json(layout.history(name, folds[0]), "re-run `train-cnns`")  # one recipe for all folds
    for fold in folds:
        model_file = layout.model_file(name, fold)
        if not model_file.exists():
            raise BundleError(f"{model_file} is missing: re-run `train-cnns` on {run_dir}.")
        target = out / "cnn" / name / f"fold{fold}.keras"
        target.parent.mkdir(parents=True, exist_ok=True)
        _load_keras(model_file).save(target)
    return {
        "name": name,
        "image_size": int(history["config"]["image_size"]),
        "tta": list(history["config"]["tta"]),
        "color_constancy": history["config"].get("color_constancy", "none"),
        "classes": list(history.get("classes", ["MEL"])),  # runs from before diagnosis heads had melanoma heads only
        "scales": {str(f): {"mean": float(r["mean"]), "std": float(r["std"])} for f, r in scales.iterrows()},
        "training_priors": _training_priors(layout, name, folds),
    }


def _training_priors(layout: RunLayout, name: str, folds: list[int]) -> dict[str, list[float]] | None:
    """Each fold model's training class prior (diagnosis heads; None for a melanoma head or an older run)."""
    priors = {str(f): read_json(layout.history(name, f)).get("training_prior") for f in folds}
    return None if any(p is None for p in priors.values()) else priors


def pattern_operating_points(
    masked_oof: pd.DataFrame, calibration: PatternCalibration, sensitivity: float, n_boot: int = 1000, seed: int = 0
) -> dict[str, OperatingPoint]:
    """The alert threshold of each pattern source, on the OOF probabilities of its rows (inputs masked).

    A lesion of a pattern is judged by its source's point, so the promise it gets was measured on
    lesions that lacked what it lacks.
    """
    points = {}
    for source in sorted(set(calibration.sources.values())):
        rows = masked_oof[masked_oof["pattern"] == source]
        if not (rows["target"] == 1).any():
            raise BundleError(f"no out-of-fold melanoma of pattern {source!r}; a sensitivity cannot be targeted for it.")
        points[source] = choose_operating_point(rows["target"], rows["prob"], rows["patient_id"], sensitivity, n_boot=n_boot, seed=seed)
    return points


def _bundle_config(
    run_dir: Path, stack_info: dict, folds: list[int], calibration: PatternCalibration, points: dict[str, OperatingPoint], building: Path
) -> dict:
    """BUNDLE/config.json (the CNNs' fold models are written into `building` on the way)."""
    return {
        "cnns": [_export_cnn(run_dir, name, folds, building) for name in stack_info["cnns"]],
        "stack": {
            "folds": folds, "features": stack_info["features"], "num_boost_round": stack_info["num_boost_round"],
            "image_features": stack_info.get("image_features"),  # the features stage's recipe, None without one
        },
        "vocabularies": VOCABULARIES,
        "calibration": calibration.to_json(),
        "operating_points": {source: point.to_json() for source, point in points.items()},
        "scoring_reference": _required_json(RunLayout(run_dir).stack / SCORING_REFERENCE_FILE, "re-run `python cli.py stack`"),
    }


def export_bundle(run_dir: Path, out: Path, sensitivity: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write the bundle of a finished run (CNNs + stack) to `out`; return its config.

    The bundle is assembled in a temporary folder and renamed into place, so a failed export leaves
    nothing behind that could be mistaken for a bundle.
    """
    run_dir, out = Path(run_dir), Path(out)
    require_complete(run_dir, "train-cnns", "stack")
    stack_dir = RunLayout(run_dir).stack
    stack_info = _required_json(RunLayout(run_dir).stack_recipe, f"run `python cli.py stack --data DIR --run {run_dir}` first")
    if not stack_info["cnns"]:
        raise BundleError(
            f"the stack of {run_dir} uses no CNN (a metadata-only baseline); a bundle scores images: "
            "run `train-cnns` and then `stack` on this run first."
        )
    boosters = {int(p.stem.removeprefix("model_fold")): p for p in stack_dir.glob("model_fold*.txt")}
    if not boosters:
        raise BundleError(f"{stack_dir} has no model_fold<k>.txt: re-run `python cli.py stack` on {run_dir}.")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty; choose a new --out or delete it.")
    if "calibration" not in stack_info:
        raise BundleError(f"{stack_dir} was fitted before per-pattern calibration: re-run `python cli.py stack` on {run_dir}.")
    calibration = PatternCalibration.from_json(stack_info["calibration"])
    points = pattern_operating_points(read_table(stack_dir / MASKED_OOF_FILE, "stack"), calibration, sensitivity, n_boot, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = _bundle_config(run_dir, stack_info, sorted(boosters), calibration, points, building)
        (building / "stack").mkdir()
        for path in boosters.values():
            shutil.copyfile(path, building / "stack" / path.name)
        write_json(config, building / CONFIG)
        files = {p.relative_to(building).as_posix(): file_sha256(p) for p in sorted(building.rglob("*")) if p.is_file()}
        write_json(
            {
                "format": BUNDLE_FORMAT,
                "format_version": BUNDLE_FORMAT_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "source_run": str(run_dir.resolve()),
                "stack_oof_auc": stack_info.get("oof_auc"),
                "versions": package_versions(VERSIONED_PACKAGES),
                "files": files,
            },
            building / MANIFEST,
        )
        if out.exists():
            out.rmdir()
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return config


def verify_bundle(path: Path) -> dict:
    """The manifest of a bundle whose every listed file exists with its recorded checksum; else BundleError."""
    path = Path(path)
    manifest = _required_json(path / MANIFEST, "not a bundle folder; create one with `python cli.py export`")
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path / MANIFEST}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; "
            f"this code reads {BUNDLE_FORMAT!r} version {BUNDLE_FORMAT_VERSION}: re-export the run."
        )
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file} is listed in {MANIFEST} but missing; the bundle is incomplete: re-export it.")
        if file_sha256(file) != expected:
            raise BundleError(
                f"{file}: checksum differs from {MANIFEST} (the file was changed or corrupted); "
                "refusing to score with it: re-export the bundle with `python cli.py export`."
            )
    return manifest


def load_bundle(path: Path) -> Bundle:
    """Verify a bundle's checksums, then load its CNN fold models and stack boosters."""
    path = Path(path)
    manifest = verify_bundle(path)
    config = json.loads((path / CONFIG).read_text())
    if config["vocabularies"] != VOCABULARIES:
        raise BundleError(
            f"{path / CONFIG}: the stack was trained with category vocabularies {config['vocabularies']}, "
            f"this code has {VOCABULARIES}; score with the pipeline version that exported it ({manifest['versions']})."
        )
    cnns = [
        CnnMember(
            name=c["name"],
            image_size=int(c["image_size"]),
            tta=tuple(c["tta"]),
            target=TargetSpec(tuple(c["classes"])),
            scales=pd.DataFrame.from_dict(c["scales"], orient="index").set_axis([int(f) for f in c["scales"]]),
            models={int(f): _load_keras(path / "cnn" / c["name"] / f"fold{f}.keras") for f in c["scales"]},
            color_constancy=c.get("color_constancy", "none"),
            priors=None if c.get("training_priors") is None else {int(f): p for f, p in c["training_priors"].items()},
        )
        for c in config["cnns"]
    ]
    recipe = config["stack"].get("image_features")
    stackers = [
        LightGBMStacker(booster=lgb.Booster(model_file=str(path / "stack" / f"model_fold{f}.txt")))
        for f in config["stack"]["folds"]
    ]
    return Bundle(
        path=path,
        manifest=manifest,
        cnns=cnns,
        stackers=stackers,
        features=list(config["stack"]["features"]),
        operating_points={source: OperatingPoint.from_json(p) for source, p in config["operating_points"].items()},
        calibration=PatternCalibration.from_json(config["calibration"]),
        reference=config["scoring_reference"],
        image_features=None if recipe is None else FeatureRecipe.from_json(recipe),
    )
