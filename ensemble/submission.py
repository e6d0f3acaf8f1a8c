"""Competition submission CSVs, built from a run's test predictions, validated, and written atomically.

A submission is checked before it is written: the official columns in the official order, every
test id exactly once and no other, every probability finite and in [0, 1]. It is written to a temp
file and renamed, so a crash never leaves half a submission where the last one was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cnn.outputs import class_column, class_of, diagnosis_classes
from ensemble.run_files import RunPredictions, load_run_predictions
from ensemble.submission_formats import SubmissionFormat, layout_submission_format
from errors import DataError, OptionError, RunStateError
from evaluation.metrics import prior_adjusted_probabilities
from rundir.io import atomic_write
from rundir.layout import PRIMARY_STACK, RunLayout


def build_submission(
    fmt: SubmissionFormat, model: str, test: pd.DataFrame, class_prior: pd.Series | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """The submission rows of one model's test predictions (indexed by image id), and notes on what was filled in.

    A class the format has but the model never learnt (ISIC 2019's UNK has no training images) gets
    probability 0 and a note; a class the model predicts but the format has no column for is an error.
    With the `class_prior` the model was fitted to, a multi-class submission's probabilities are
    prior-adjusted (see `prior_adjusted_probabilities`): ISIC 2018/2019 score the argmax by balanced
    accuracy, and a model trained on the natural class mix otherwise argmaxes the common classes.
    """
    predicted = {class_column(c) for c in diagnosis_classes(test)}
    if fmt.multiclass and not predicted:
        raise OptionError(
            f"{model} predicts melanoma only; {fmt.title} needs a probability per diagnosis: "
            "train a diagnosis head (`train-cnns --target diagnosis`) and submit it or the mean_blend."
        )
    unmapped = sorted(predicted - set(fmt.columns.values())) if fmt.multiclass else []
    if unmapped:
        raise OptionError(f"{model} predicts {unmapped}, which {fmt.title} has no column for; choose a format with those classes.")
    filled = [column for column, source in fmt.columns.items() if source not in test.columns]
    notes = [f"{model} has no {column} output: the column is 0 for every image." for column in filled]
    if fmt.multiclass and class_prior is not None:
        sources = sorted(predicted)
        adjusted = prior_adjusted_probabilities(test[sources].to_numpy(dtype=float), class_prior[[class_of(s) for s in sources]])
        test = test.assign(**dict(zip(sources, adjusted.T)))
        notes.append(f"{model}'s probabilities are divided by its training class prior and renormalised, so each image's "
                     "highest column is the balanced-accuracy decision (--raw-probabilities submits them as predicted).")
    columns = {
        column: test[source].to_numpy(dtype=float) if source in test.columns else np.zeros(len(test))
        for column, source in fmt.columns.items()
    }
    frame = pd.DataFrame({fmt.id_column: test.index.to_numpy(dtype=object), **columns})
    return frame, notes


def validate_submission(frame: pd.DataFrame, fmt: SubmissionFormat, expected_ids: pd.Series | pd.Index) -> None:
    """Refuse a submission the challenge would reject or mis-score, naming the first offending id.

    >>> from ensemble.submission_formats import SUBMISSION_FORMATS
    >>> frame = pd.DataFrame({"isic_id": ["a", "b"], "target": [0.2, 1.3]})
    >>> validate_submission(frame, SUBMISSION_FORMATS["isic2024"], ["a", "b"])
    Traceback (most recent call last):
    errors.DataError: submission: id 'b' has target=1.3, not a probability in [0, 1] (1 such value(s)); submit a model whose outputs are probabilities.
    """
    if list(frame.columns) != fmt.header:
        raise DataError(f"submission columns {list(frame.columns)}; {fmt.title} needs exactly {fmt.header}, in that order.")
    ids = frame[fmt.id_column]
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(f"submission: id {duplicated.iloc[0]!r} appears more than once.")
    expected, got = set(expected_ids), set(ids)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise RunStateError(
            f"submission: {len(missing)} test id(s) missing (e.g. {missing[:3]}), {len(extra)} extra (e.g. {extra[:3]}); "
            "the predictions are not for this test set: re-run the stages on the same data."
        )
    values = frame[list(fmt.columns)].to_numpy(dtype=float)
    bad_rows, bad_columns = np.nonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if len(bad_rows):
        row, column = bad_rows[0], list(fmt.columns)[bad_columns[0]]
        raise DataError(
            f"submission: id {ids.iloc[row]!r} has {column}={float(values[row, bad_columns[0]])}, not a probability in [0, 1] "
            f"({len(bad_rows)} such value(s)); submit a model whose outputs are probabilities."
        )


def write_submission(frame: pd.DataFrame, fmt: SubmissionFormat, expected_ids: pd.Series | pd.Index, path: Path) -> pd.DataFrame:
    """Validate, then write atomically (temp file + rename)."""
    validate_submission(frame, fmt, expected_ids)
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
    return frame


def ids_of_test_split(table: pd.DataFrame) -> pd.Index:
    """Image ids of a run table's test split."""
    return pd.Index(table.loc[table["split"] == "test", "image_id"])


def expected_test_ids(predictions: RunPredictions, table: pd.DataFrame | None = None) -> pd.Index:
    """The test ids a submission must cover: the data's test split when the run's data `table` is
    given, else the ids every model of the run predicted (refusing models that disagree)."""
    if table is not None:
        return ids_of_test_split(table)
    reference = predictions.models[0]
    for model in predictions.models[1:]:
        if set(model.test.index) != set(reference.test.index):
            raise RunStateError(
                f"{model.name} and {reference.name} predicted different test images: one of them is stale; "
                "re-run its stage, or pass --data to check against the data's test split."
            )
    if reference.test.empty:
        raise RunStateError("the run has no test predictions: its data has no test split.")
    return reference.test.index


def submitted_model(fmt: SubmissionFormat, predictions: RunPredictions, model: str | None) -> str:
    """The model a submission is built from: `model`, or the format's first default the run has."""
    if model:
        return model
    names = {m.name for m in predictions.models}
    return next((name for name in fmt.default_models if name in names), fmt.default_models[-1])


def run_submission(
    predictions: RunPredictions, fmt: SubmissionFormat, model: str | None, expected_ids: pd.Index, *, path: Path,
    adjust_prior: bool = True,
) -> tuple[pd.DataFrame, list[str]]:
    """Build, validate and write the submission of one model of the run (the format's default when None).

    A multi-class model's probabilities are prior-adjusted when `adjust_prior` and its training prior
    is recorded (older runs have none: their probabilities go as predicted).
    """
    name = submitted_model(fmt, predictions, model)
    try:
        chosen = predictions.model(name)
    except OptionError as error:
        raise OptionError(f"{error} Pass --model.") from error
    frame, notes = build_submission(fmt, name, chosen.test, chosen.prior_of_test_predictions if adjust_prior else None)
    return write_submission(frame, fmt, expected_ids, path), notes


def write_stack_submission(run_dir: Path, table: pd.DataFrame, layout: str) -> SubmissionFormat | None:
    """The primary stack's submission in the data layout's own format at RUN/submission.csv (what
    `stack` writes, through `submit`'s code); None when the data has no test rows."""
    expected = ids_of_test_split(table)
    if not len(expected):
        return None
    chosen = layout_submission_format(layout)
    run_submission(load_run_predictions(run_dir, check_complete=False), chosen, PRIMARY_STACK, expected, path=RunLayout(run_dir).submission)
    return chosen
