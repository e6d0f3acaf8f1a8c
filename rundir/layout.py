"""Every path under a run directory, in one module: each stage asks `RunLayout`, none spells a path.

    RUN/
      folds.parquet                 folds
      skipped_images.csv            images left out of the run (folds / any stage with --on-bad-image skip)
      extra_data.{parquet,json}     folds --extra-data: other datasets' rows every fold trains on, and their counts
      manifest.json, config.json    data fingerprint, versions, each stage's options and seconds
      log.txt                       every stage's log
      tfrecords/                    tfrecords: shards and their index.parquet
      cnn/plan.json                 train-cnns: the declared (model, fold) pairs
      cnn/<model>/{oof,test}.parquet
      cnn/<model>/fold<k>/          model.keras, history.json, oof.parquet, test.parquet (finished pair);
                                    done.json, failed.json, heartbeat.json, checkpoint/, cache/ (pair state)
      features/<family>.parquet     features: dermoscopy features by image_id; recipe.json (written last);
                                    partial/ (chunks of an unfinished call, resumed by the next)
      stack/                        stack: the fitted stack model (StackModelLayout), STACK_OUTPUTS, features,
                                    masked OOF, scoring reference, the stage's recipe
      submission.csv                stack: the primary stack's submission in the data's format
      report.{json,html,md}, figures/   report
      .incomplete/<stage>.json      a stage writing its outputs (left behind if it was interrupted)
      .complete/<stage>.json        a stage's last finished outputs: when, an id, the ids of the stages it read
      .lock/                        the command writing the run (rundir.lock): writer.json, or shared-<token>.json
                                    per train-cnns job

An exported bundle has its own layout (`BundleLayout`); the fitted stack model's files
(`StackModelLayout`) are the same in both. A pretrained backbone (`pretrain --out`) is `BackboneLayout`.

>>> layout = RunLayout("runs/demo")
>>> layout.folds.as_posix(), layout.fold_dir("small", 2).as_posix()
('runs/demo/folds.parquet', 'runs/demo/cnn/small/fold2')
>>> BundleLayout("bundle").stack_model.booster(1).as_posix()
'bundle/stack/model_fold1.txt'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FOLDS_FILE = "folds.parquet"
SKIPPED_FILE = "skipped_images.csv"
EXTRA_DATA_FILE, EXTRA_DATA_SUMMARY = "extra_data.parquet", "extra_data.json"  # folds --extra-data: other datasets' training rows
MANIFEST_FILE = "manifest.json"
RESOLVED_CONFIG_FILE = "config.json"
LOG_FILE = "log.txt"
SHARD_DIR = "tfrecords"
FIGURES_DIR = "figures"  # RUN/figures/<name>.png: the report's figures as files, for report.md
OOF_FILE, TEST_FILE = "oof.parquet", "test.parquet"  # per CNN and per (CNN, fold)
HISTORY_FILE = "history.json"  # per (CNN, fold)
MODEL_FILE = "model.keras"  # per (CNN, fold): the best epoch
# A (CNN, fold) pair's state (cnn.pairs): finished, failed, alive; its last epoch checkpoint; its decoded-image cache.
DONE_FILE, FAILED_FILE, HEARTBEAT_FILE = "done.json", "failed.json", "heartbeat.json"
CHECKPOINT_DIR, CHECKPOINT_STATE, CACHE_DIR = "checkpoint", "state.json", "cache"
INDEX_FILE = "index.parquet"  # RUN/tfrecords: image_id -> shard, position

# Stack name -> (OOF file, test file) under RUN/stack, in report order (the linear baseline first).
STACK_OUTPUTS: dict[str, tuple[str, str]] = {
    "logreg_stack": ("logreg_oof.parquet", "logreg_test.parquet"),
    "lightgbm_stack": (OOF_FILE, TEST_FILE),
    "diagnosis_stack": ("diagnosis_oof.parquet", "diagnosis_test.parquet"),  # multi-class data only (fusion.diagnosis_stack)
}
FEATURES_DIR = "features"  # RUN/features: one table per dermoscopy feature family (fusion.image_features)
FEATURE_RECIPE_FILE = "recipe.json"  # RUN/features: families, image size, colour constancy, columns
FAMILY_GAIN_FILE = "family_gain.parquet"  # RUN/stack: OOF scores of the stack without each feature family
STACK_FEATURES_FILE = "oof_features.parquet"  # RUN/stack: the stackers' training features by image_id
MASKED_OOF_FILE = "masked_oof.parquet"  # RUN/stack: OOF scores per image and missingness pattern (fusion.missingness)
SCORING_REFERENCE_FILE = "scoring_reference.json"  # RUN/stack: what predict compares a batch with (fusion.shift)
STACK_RECIPE_FILE = "features.json"  # RUN/stack: the stage's recipe (CNNs, rounds, seed, OOF AUC, masked copies)
STACK_MODEL_FILE = "stack_model.json"  # RUN/stack and BUNDLE/stack: the fitted stack model (fusion.stack_model)
BUNDLE_MANIFEST_FILE, BUNDLE_CONFIG_FILE = "manifest.json", "config.json"  # BUNDLE/
PRIMARY_STACK = "lightgbm_stack"  # the stack that writes RUN/submission.csv


@dataclass(frozen=True)
class Folder:
    """A folder whose files a layout names (`root` may be given as a string)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class RunLayout(Folder):
    """The paths of one run directory."""

    @property
    def folds(self) -> Path:
        return self.root / FOLDS_FILE

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED_FILE

    @property
    def extra_data(self) -> Path:
        return self.root / EXTRA_DATA_FILE

    @property
    def extra_data_summary(self) -> Path:
        return self.root / EXTRA_DATA_SUMMARY

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def shards(self) -> Path:
        return self.root / SHARD_DIR

    @property
    def cnn(self) -> Path:
        return self.root / "cnn"

    @property
    def plan(self) -> Path:
        return self.cnn / "plan.json"

    def model_dir(self, model: str) -> Path:
        return self.cnn / model

    def fold_dir(self, model: str, fold: int) -> Path:
        return self.model_dir(model) / f"fold{int(fold)}"

    def history(self, model: str, fold: int) -> Path:
        return self.fold_dir(model, fold) / HISTORY_FILE

    def histories(self, model: str) -> list[Path]:
        """The `history.json` of every fold of a CNN that has one, in fold order."""
        return sorted(self.model_dir(model).glob(f"fold*/{HISTORY_FILE}"))

    def model_file(self, model: str, fold: int) -> Path:
        return self.fold_dir(model, fold) / MODEL_FILE

    def fold_outputs(self, model: str, fold: int) -> tuple[Path, Path]:
        """One (CNN, fold) pair's (OOF, test) tables."""
        return self.fold_dir(model, fold) / OOF_FILE, self.fold_dir(model, fold) / TEST_FILE

    def cnn_outputs(self, model: str) -> tuple[Path, Path]:
        """A CNN's assembled (OOF, test) tables."""
        return self.model_dir(model) / OOF_FILE, self.model_dir(model) / TEST_FILE

    @property
    def features(self) -> Path:
        return self.root / FEATURES_DIR

    def feature_table(self, family: str) -> Path:
        return self.features / f"{family}.parquet"

    @property
    def feature_recipe(self) -> Path:
        return self.features / FEATURE_RECIPE_FILE

    @property
    def feature_chunks(self) -> Path:
        return self.features / "partial"

    @property
    def stack(self) -> Path:
        return self.root / "stack"

    def stack_outputs(self, name: str) -> tuple[Path, Path]:
        """A stack's (OOF, test) tables."""
        oof, test = STACK_OUTPUTS[name]
        return self.stack / oof, self.stack / test

    @property
    def stack_recipe(self) -> Path:
        return self.stack / STACK_RECIPE_FILE

    @property
    def stack_model(self) -> StackModelLayout:
        return StackModelLayout(self.stack)

    @property
    def submission(self) -> Path:
        return self.root / "submission.csv"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / FIGURES_DIR

    @property
    def incomplete_dir(self) -> Path:
        return self.root / ".incomplete"

    def incomplete(self, stage: str) -> Path:
        """The marker of `stage` while it writes (rundir.completion)."""
        return self.incomplete_dir / f"{stage}.json"

    @property
    def complete_dir(self) -> Path:
        return self.root / ".complete"

    def complete(self, stage: str) -> Path:
        """The record of `stage`'s last finished outputs (rundir.completion)."""
        return self.complete_dir / f"{stage}.json"

    @property
    def lock_dir(self) -> Path:
        return self.root / ".lock"

    @property
    def writer_lock(self) -> Path:
        """The lock file of the one command writing the run (rundir.lock)."""
        return self.lock_dir / "writer.json"

    def shared_lock(self, token: str) -> Path:
        """The lock file of one job among those sharing the run (`train-cnns`)."""
        return self.lock_dir / f"shared-{token}.json"

    @property
    def shared_locks(self) -> list[Path]:
        return sorted(self.lock_dir.glob("shared-*.json"))

    def submission_file(self, submission_format: str) -> Path:
        """Where `submit` writes a format's CSV unless told otherwise."""
        return self.root / f"submission_{submission_format}.csv"


@dataclass(frozen=True)
class StackModelLayout(Folder):
    """The files of a fitted stack model (fusion.stack_model): one LightGBM text model per fold and its JSON state."""

    def booster(self, fold: int) -> Path:
        return self.root / f"model_fold{int(fold)}.txt"

    @property
    def boosters(self) -> list[Path]:
        return sorted(self.root.glob("model_fold*.txt"))

    @property
    def state(self) -> Path:
        return self.root / STACK_MODEL_FILE


@dataclass(frozen=True)
class BundleLayout(Folder):
    """The paths of an exported bundle (ensemble.bundle):

        BUNDLE/manifest.json              format, library versions, SHA-256 of every other file
        BUNDLE/config.json                the CNN members, category vocabularies, the scoring reference
        BUNDLE/cnn/<model>/fold<k>.keras  inference-only Keras models
        BUNDLE/stack/                     the fitted stack model (StackModelLayout), operating points included
    """

    @property
    def manifest(self) -> Path:
        return self.root / BUNDLE_MANIFEST_FILE

    @property
    def config(self) -> Path:
        return self.root / BUNDLE_CONFIG_FILE

    def cnn_model(self, model: str, fold: int) -> Path:
        return self.root / "cnn" / model / f"fold{int(fold)}.keras"

    @property
    def stack_model(self) -> StackModelLayout:
        return StackModelLayout(self.root / "stack")


@dataclass(frozen=True)
class BackboneLayout(Folder):
    """The files of a self-supervised backbone (`pretrain --out BACKBONE`, read by `train-cnns --weights BACKBONE`).

        BACKBONE/backbone.weights.h5   the backbone's weights (the feature extractor without a head)
        BACKBONE/backbone.json         architecture, image size, recipe, the images it was pretrained on; written last
        BACKBONE/checkpoint/           the last epoch's weights, optimizer and RNG states (an unfinished call resumes)
        BACKBONE/cache/                decoded images of a `--cache disk` call
    """

    @property
    def weights(self) -> Path:
        return self.root / "backbone.weights.h5"

    @property
    def record(self) -> Path:
        return self.root / "backbone.json"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def cache(self) -> Path:
        return self.root / "cache"
