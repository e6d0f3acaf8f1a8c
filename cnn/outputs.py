"""The CNN stage's output files and columns: the contract every later stage reads, without TensorFlow.

    RUN/cnn/<model>/oof.parquet    image_id, patient_id, fold, target, prob, prob_<CLASS> (diagnosis head)
    RUN/cnn/<model>/test.parquet   image_id, patient_id, prob (mean over folds), prob_fold<k>, prob_<CLASS>
    RUN/cnn/<model>/fold<k>/history.json   the recipe; for a diagnosis head its classes and training prior

`prob` is the melanoma probability, `prob_fold<k>` the melanoma probability of fold k's model (what
the stack standardises per fold model) and `prob_<CLASS>` a diagnosis head's class probability. The
stack takes each CNN as the column `cnn_<name>` (its standardised log-odds).

>>> fold_column(2), class_column("MEL"), stack_column("small")
('prob_fold2', 'prob_MEL', 'cnn_small')
>>> diagnosis_classes(pd.DataFrame(columns=["image_id", "prob", "prob_fold0", "prob_MEL", "prob_NV"]))
['MEL', 'NV']
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from errors import RunStateError
from rundir.completion import require_complete
from rundir.io import read_table
from rundir.layout import OOF_FILE, RunLayout

MELANOMA = "prob"  # the melanoma probability of any prediction table (CNN, blend, stack)
CLASS_PREFIX = "prob_"
FOLD_PREFIX = "prob_fold"
STACK_PREFIX = "cnn_"
WRITTEN_BY = "train-cnns"  # the command that writes these files


def fold_column(fold: int) -> str:
    """Fold `fold`'s model's melanoma probability in a CNN's test table."""
    return f"{FOLD_PREFIX}{int(fold)}"


def class_column(code: str) -> str:
    """A diagnosis class's probability (`MEL` -> `prob_MEL`), in CNN, blend and stack tables alike."""
    return f"{CLASS_PREFIX}{code}"


def stack_column(name: str) -> str:
    """The stack's input column of CNN `name` (its fold-model-standardised log-odds)."""
    return f"{STACK_PREFIX}{name}"


def is_class_column(column: str) -> bool:
    return column.startswith(CLASS_PREFIX) and not column.startswith(FOLD_PREFIX)


def class_of(column: str) -> str:
    """The class of a `prob_<CLASS>` column."""
    return column.removeprefix(CLASS_PREFIX)


def diagnosis_classes(table: pd.DataFrame) -> list[str]:
    """The classes of a table's `prob_<CLASS>` columns, in column order (none for a melanoma head)."""
    return [class_of(c) for c in table.columns if is_class_column(c)]


def fold_columns(table: pd.DataFrame) -> dict[int, str]:
    """Fold -> its `prob_fold<k>` column, in fold order."""
    found = {int(c.removeprefix(FOLD_PREFIX)): c for c in table.columns if c.startswith(FOLD_PREFIX)}
    return dict(sorted(found.items()))


def probability_columns(outputs: np.ndarray, classes: tuple[str, ...], melanoma: np.ndarray) -> dict[str, np.ndarray]:
    """A CNN's output columns for one split: `prob` and, for a diagnosis head (more than one class), `prob_<CLASS>`."""
    columns = {MELANOMA: melanoma}
    if len(classes) > 1:
        columns.update({class_column(c): outputs[:, i] for i, c in enumerate(classes)})
    return columns


def fold_mean_test_table(keys: pd.DataFrame, tests: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """A CNN's test table from its fold models' (fold -> table): `prob_fold<k>` each, and `prob` and
    every `prob_<CLASS>` averaged over the fold models."""
    first = next(iter(tests.values()))
    test = keys.copy()
    for fold, frame in tests.items():
        test[fold_column(fold)] = frame[MELANOMA].to_numpy()
    test[MELANOMA] = test[[fold_column(f) for f in tests]].mean(axis=1)
    for column in (class_column(c) for c in diagnosis_classes(first)):
        test[column] = np.mean([frame[column].to_numpy() for frame in tests.values()], axis=0)
    return test


def cnn_names(run_dir: Path) -> list[str]:
    """CNNs of a run that have an assembled OOF table, in name order; refuses a run whose assembly of a CNN was interrupted."""
    require_complete(run_dir, WRITTEN_BY)
    return sorted(p.parent.name for p in RunLayout(run_dir).cnn.glob(f"*/{OOF_FILE}"))


def read_cnn_outputs(run_dir: Path, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A CNN's assembled (OOF, test) tables."""
    oof_file, test_file = RunLayout(run_dir).cnn_outputs(name)
    return read_table(oof_file, WRITTEN_BY), read_table(test_file, WRITTEN_BY)


def aligned(table: pd.DataFrame, image_ids: pd.Series, source: Path | str, split: str) -> pd.DataFrame:
    """`table`'s rows (it has `image_id`) in the order of `image_ids`, indexed like them; refuses an image without a prediction."""
    missing = ~image_ids.isin(table["image_id"])
    if missing.any():
        raise RunStateError(
            f"{source}: no {split} prediction for image {image_ids[missing].iloc[0]!r}; "
            "the CNN outputs are from other data or folds: re-run `train-cnns`."
        )
    rows = table.set_index("image_id").reindex(pd.Index(image_ids.to_numpy(), name="image_id"))
    return rows.reset_index().set_axis(image_ids.index)


def run_cnn_outputs(run_dir: Path, split: str, image_ids: pd.Series) -> dict[str, pd.DataFrame]:
    """Every CNN's table of `split` ("train": the OOF table, "test"), rows aligned with `image_ids`."""
    layout = RunLayout(run_dir)
    outputs = {}
    for name in cnn_names(run_dir):
        oof, test = read_cnn_outputs(run_dir, name)
        oof_file, test_file = layout.cnn_outputs(name)
        outputs[name] = aligned(oof, image_ids, oof_file, split) if split == "train" else aligned(test, image_ids, test_file, split)
    return outputs


def training_priors(run_dir: Path, name: str, folds: pd.Series) -> pd.DataFrame | None:
    """Each OOF row's training prior (the class mix its fold model was fitted to, from that fold's
    `history.json`), columns in class order; None for a melanoma head or a run that did not record it."""
    layout = RunLayout(run_dir)
    histories = {int(f): layout.history(name, int(f)) for f in folds.unique()}
    if not all(path.exists() for path in histories.values()):
        return None
    records = {fold: json.loads(path.read_text()) for fold, path in histories.items()}
    if any(record.get("training_prior") is None for record in records.values()):
        return None
    classes = next(iter(records.values()))["classes"]
    by_fold = pd.DataFrame({fold: record["training_prior"] for fold, record in records.items()}, index=classes).T
    return by_fold.reindex(folds.to_numpy()).set_axis(folds.index)


def fold_mean_prior(priors: pd.DataFrame, folds: pd.Series | np.ndarray) -> pd.Series:
    """The class mix behind test predictions (class -> probability): the fold models' own mixes
    (`priors`, one row per OOF row, predicted in `folds`), averaged as their outputs are."""
    return priors.groupby(np.asarray(folds)).first().mean()
