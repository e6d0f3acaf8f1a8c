"""The predictions of a run as the report and `submit` read them: every CNN, their blends and the stacks.

CNNs write `RUN/cnn/<name>/{oof,test}.parquet`; the stacks write the files named in `STACK_OUTPUTS`
under `RUN/stack/`. Blends are computed here, not stored, so they always match the CNNs on disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cnn.outputs import MELANOMA, class_column, cnn_names, diagnosis_classes, fold_mean_prior, training_priors
from ensemble.blend import mean_blend, rank_blend
from errors import OptionError, RunStateError
from metadata.schema import DIAGNOSES
from rundir.completion import require_complete
from rundir.io import read_table
from rundir.layout import STACK_OUTPUTS, RunLayout

# Blend name -> (how the CNN columns are combined, whether the result is a probability).
BLENDS: dict[str, tuple[Callable[[pd.DataFrame], pd.Series], bool]] = {
    "mean_blend": (mean_blend, True),
    "rank_blend": (rank_blend, False),
}
PROBABILITY_COLUMNS = (MELANOMA, *(class_column(code) for code in DIAGNOSES))
WRITTEN_BY: dict[str, str] = {"cnn": "train-cnns", "stack": "stack"}  # the command that writes a kind's files


@dataclass(frozen=True)
class ModelPredictions:
    """One model's predictions, indexed by image id: `prob` (melanoma) plus `prob_<CLASS>` of a diagnosis head.

    `oof` also has the `fold` each row was predicted in; `test` is empty when the run has no test rows.
    """

    name: str
    kind: str  # "cnn", "blend" or "stack"
    is_probability: bool  # False for a rank blend: no calibration metrics, no calibration plot
    oof: pd.DataFrame
    test: pd.DataFrame
    # A diagnosis-head CNN's training prior for each OOF row (its fold model's; columns: classes), if recorded.
    class_prior: pd.DataFrame | None = None

    @property
    def classes(self) -> list[str]:
        """Diagnosis classes of a multi-class model, in its column order; empty for a binary one."""
        return diagnosis_classes(self.oof)

    @property
    def prior_of_test_predictions(self) -> pd.Series | None:
        """The prior of the test predictions (class -> probability): their fold models' priors, averaged as their outputs are."""
        if self.class_prior is None:
            return None
        return fold_mean_prior(self.class_prior, self.oof["fold"])


@dataclass(frozen=True)
class RunPredictions:
    """OOF rows (indexed by image id: `patient_id`, `fold`, `target`) and every model, in report order."""

    rows: pd.DataFrame
    models: list[ModelPredictions]

    def model(self, name: str) -> ModelPredictions:
        found = {m.name: m for m in self.models}
        if name not in found:
            raise OptionError(f"no model {name!r} in this run; choose one of {sorted(found)}.")
        return found[name]

    def of_kind(self, kind: str) -> list[ModelPredictions]:
        return [m for m in self.models if m.kind == kind]


def _predictions(table: pd.DataFrame) -> pd.DataFrame:
    """A prediction table (indexed by image id) cut to `fold` (OOF tables) and its probability columns."""
    return table[[c for c in ("fold", *PROBABILITY_COLUMNS) if c in table.columns]]


def written_priors(table: pd.DataFrame, image_ids: pd.Index) -> pd.DataFrame | None:
    """The class mix a stack's fold models were fitted to, as its OOF table (indexed by image id)
    records it (`prior_<CLASS>`), per row of `image_ids`."""
    columns = [c for c in table.columns if c.startswith("prior_")]
    if not columns:
        return None
    return table[columns].rename(columns=lambda c: c.removeprefix("prior_")).reindex(image_ids)


def rows_of(frame: pd.DataFrame, image_ids: pd.Index, source: str, fix: str) -> pd.DataFrame:
    """`frame`'s rows (indexed by image id) of these images, in this order; refuses an image it lacks."""
    missing = image_ids.difference(frame.index)
    if len(missing):
        raise RunStateError(f"{source} has no row for image {missing[0]!r} (and {len(missing) - 1} more): {fix}")
    return frame.reindex(image_ids)


def _blends(cnns: list[ModelPredictions], folds: pd.Series) -> list[ModelPredictions]:
    """Each blend over every probability column all CNNs share (so diagnosis heads blend per class too)."""

    def combine(split: str, blend: Callable[[pd.DataFrame], pd.Series]) -> pd.DataFrame:
        frames = [getattr(m, split) for m in cnns]
        # per split: a run without test rows has only `prob` in its (empty) test tables
        shared = [c for c in PROBABILITY_COLUMNS if all(c in f.columns for f in frames)]
        return pd.DataFrame({c: blend(pd.concat([f[c] for f in frames], axis=1)) for c in shared}, index=frames[0].index)

    priors = [m.class_prior for m in cnns]
    # a probability blend averages its members, so what it was fitted to is their averaged prior
    shared_prior = None if any(p is None for p in priors) else sum(priors) / len(priors)
    return [
        ModelPredictions(name, "blend", is_probability, combine("oof", blend).assign(fold=folds), combine("test", blend),
                         shared_prior if is_probability else None)
        for name, (blend, is_probability) in BLENDS.items()
    ]


def load_run_predictions(run_dir: Path, check_complete: bool = True) -> RunPredictions:
    """Every CNN of the run, their blends (with two or more CNNs) and every stack that has been fitted.

    Refuses a run whose `stack` (or a CNN's assembly) was interrupted while writing (`check_complete=False`:
    for the stack itself, reading what it has just written)."""
    run_dir = Path(run_dir)
    if check_complete:
        require_complete(run_dir, "train-cnns", "stack")
    layout = RunLayout(run_dir)
    sources = {name: ("cnn", *layout.cnn_outputs(name)) for name in cnn_names(run_dir)}
    sources.update(
        {name: ("stack", *layout.stack_outputs(name)) for name in STACK_OUTPUTS}
    )
    sources = {name: source for name, source in sources.items() if source[1].exists()}
    if not sources:
        raise RunStateError(f"{run_dir}: no OOF predictions found; run `train-cnns` or `stack` first.")
    first_oof = next(iter(sources.values()))[1]
    rows = read_table(first_oof, "train-cnns").set_index("image_id")[["patient_id", "fold", "target"]]
    models = []
    for name, (kind, oof_path, test_path) in sources.items():
        written = read_table(oof_path, WRITTEN_BY[kind]).set_index("image_id")
        oof = rows_of(_predictions(written), rows.index, str(oof_path),
                      "it comes from other data or folds than the rest of the run; re-run the stage that wrote it.")
        test = _predictions(read_table(test_path, WRITTEN_BY[kind]).set_index("image_id")) if test_path.exists() else pd.DataFrame()
        prior = training_priors(run_dir, name, oof["fold"]) if kind == "cnn" else written_priors(written, oof.index)
        models.append(ModelPredictions(name, kind, True, oof, test, prior))
    cnns = [m for m in models if m.kind == "cnn"]
    blends = _blends(cnns, rows["fold"]) if len(cnns) > 1 else []
    return RunPredictions(rows=rows, models=[*cnns, *blends, *[m for m in models if m.kind == "stack"]])
