"""The CNN outputs of a run as stacker inputs: each fold model's log-odds on one scale.

Each fold's OOF probabilities come from a different model with its own calibration; pooled raw,
they rank worse than any fold alone. `CnnScales` standardises every fold model's log-odds by its
own OOF statistics, computed once when the stack is fitted and kept with it (the run's stack files
and the bundle), so the stack's test rows and a new patient's lesions are standardised alike and
nothing depends on the batch being scored.

>>> oof = pd.DataFrame({"fold": [0, 0, 1, 1], "prob": [0.2, 0.8, 0.1, 0.5]})
>>> scales = CnnScales.fit({"small": oof})
>>> scales.oof_scores({"small": oof})["cnn_small"].round(3).tolist()
[-0.707, 0.707, -0.707, 0.707]
>>> scales.scores({"small": pd.DataFrame({"prob_fold0": [0.8], "prob_fold1": [0.5]})})["cnn_small"].round(3).tolist()
[0.707]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cnn.outputs import (
    MELANOMA,
    aligned,
    class_column,
    cnn_names,
    diagnosis_classes,
    fold_column,
    fold_mean_prior,
    read_cnn_outputs,
    stack_column,
    training_priors,
)
from rundir.layout import RunLayout


def logit(probs: np.ndarray | pd.Series) -> np.ndarray:
    """Log-odds, clipped away from 0 and 1 so saturated probabilities stay finite."""
    p = np.clip(np.asarray(probs, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fold_model_scales(oof: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD of each fold model's OOF log-odds (`fold` -> `mean`, `std`; an SD of 0 becomes 1)."""
    stats = pd.DataFrame({"fold": oof["fold"].to_numpy(), "logit": logit(oof[MELANOMA])}).groupby("fold")["logit"]
    scales = pd.DataFrame({"mean": stats.mean(), "std": stats.std()})
    return scales.assign(std=scales["std"].where(scales["std"] > 0, 1.0))


@dataclass(frozen=True)
class CnnScales:
    """Per CNN (in the stack's column order), each fold model's OOF log-odds mean and SD."""

    by_cnn: dict[str, pd.DataFrame]  # CNN name -> fold -> mean, std

    @classmethod
    def fit(cls, oof: dict[str, pd.DataFrame]) -> CnnScales:
        """From each CNN's OOF table (`fold`, `prob`)."""
        return cls({name: fold_model_scales(table) for name, table in oof.items()})

    @property
    def names(self) -> list[str]:
        return list(self.by_cnn)

    @property
    def columns(self) -> list[str]:
        """The stack's CNN columns, `cnn_<name>`."""
        return [stack_column(name) for name in self.by_cnn]

    def oof_scores(self, oof: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Each OOF row's log-odds standardised by the scales of the fold model that scored it."""
        columns = {}
        for name, scales in self.by_cnn.items():
            folds = oof[name]["fold"].to_numpy()
            columns[stack_column(name)] = (logit(oof[name][MELANOMA]) - scales["mean"].reindex(folds).to_numpy()) / scales["std"].reindex(folds).to_numpy()
        return pd.DataFrame(columns, index=self._index(oof))

    def scores(self, outputs: dict[str, pd.DataFrame]) -> pd.DataFrame:
        """Rows scored by every fold model (`prob_fold<k>`): the mean over fold models of each one's standardised log-odds."""
        columns = {}
        for name, scales in self.by_cnn.items():
            per_model = [(logit(outputs[name][fold_column(fold)]) - row["mean"]) / row["std"] for fold, row in scales.iterrows()]
            columns[stack_column(name)] = np.mean(per_model, axis=0) if per_model else np.empty(0)
        return pd.DataFrame(columns, index=self._index(outputs))

    def _index(self, tables: dict[str, pd.DataFrame]) -> pd.Index | None:
        return tables[self.names[0]].index if self.by_cnn else None

    def to_json(self) -> dict[str, dict[str, dict[str, float]]]:
        return {name: {str(f): {"mean": float(r["mean"]), "std": float(r["std"])} for f, r in scales.iterrows()} for name, scales in self.by_cnn.items()}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, dict[str, float]]]) -> CnnScales:
        return cls({name: pd.DataFrame.from_dict(folds, orient="index").set_axis([int(f) for f in folds]) for name, folds in data.items()})


def cnn_class_score_table(run_dir: Path, split: str, image_ids: pd.Series) -> pd.DataFrame:
    """`cnn_<name>_<CLASS>` per CNN with a diagnosis head: the log of each class probability over the
    class prior its fold model was fitted to (test rows: the fold models' mean probability over their
    mean prior), so the stack sees evidence, not the training mix; aligned with `image_ids`."""
    columns = []
    for name in cnn_names(run_dir):
        oof, test = read_cnn_outputs(run_dir, name)
        classes = diagnosis_classes(oof)
        if not classes:
            continue
        prior = _split_prior(training_priors(run_dir, name, oof["fold"]), classes, oof["fold"], split)
        frame = oof if split == "train" else test
        # reindexed: a run without test rows has only `prob` in its empty test table (rows it lacks are refused below)
        probs = frame.reindex(columns=[class_column(c) for c in classes]).to_numpy(dtype=float)
        evidence = pd.DataFrame(np.log(np.clip(probs, 1e-6, 1.0) / prior), columns=[f"{stack_column(name)}_{c}" for c in classes])
        source = RunLayout(run_dir).cnn_outputs(name)[0 if split == "train" else 1]
        columns.append(aligned(evidence.assign(image_id=frame["image_id"].to_numpy()), image_ids, source, split).drop(columns="image_id"))
    return pd.concat(columns, axis=1) if columns else pd.DataFrame(index=image_ids.index)


def _split_prior(priors: pd.DataFrame | None, classes: list[str], folds: pd.Series, split: str) -> np.ndarray | float:
    """The class mix behind a split's probabilities: each OOF row's fold model's, or for test rows
    `fold_mean_prior`; 1 when the run did not record it."""
    if priors is None:
        return 1.0
    return priors[classes].to_numpy() if split == "train" else fold_mean_prior(priors[classes], folds).to_numpy()
