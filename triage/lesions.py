"""Per-lesion work done once: what the bundle's CNNs and feature extractor say about an image is computed
the first time that image content is uploaded under that bundle, and kept (`lesion_inputs` table).

A patient's scoring then reads its lesions' kept inputs and runs only the cheap part for the whole
patient (patient context, stack, calibration, ranks: `ensemble.predict.judge_lesions`), so adding a
lesion to a patient of 250 costs one image's CNN passes, not 251. The kept numbers are the ones a
fresh scoring would compute (JSON keeps a float exactly); a missing feature (NaN) is kept as null.
Concurrent uploads' new images share one CNN pass (`CombinedPasses`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cnn.outputs import fold_column
from ensemble.bundle import Bundle
from ensemble.predict import LesionInputs
from errors import DataError


def _number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def inputs_records(inputs: LesionInputs) -> list[dict[str, object]]:
    """One JSON-ready record per image of `inputs` (cnn_outputs, image_features, diagnosis, image_statistics)."""
    n_images = len(inputs.diagnosis)
    cnn = {name: frame.to_dict("list") for name, frame in inputs.cnn_outputs.items()}
    features = None if inputs.image_features is None else inputs.image_features.to_dict("records")
    statistics = None if inputs.image_statistics is None else inputs.image_statistics.to_dict("records")
    diagnosis = inputs.diagnosis.to_dict("records")
    return [
        {
            "cnn_outputs": {name: {column.removeprefix("prob_fold"): float(values[i]) for column, values in columns.items()} for name, columns in cnn.items()},
            "image_features": None if features is None else {k: _number(v) for k, v in features[i].items()},
            "diagnosis": {k: (v if isinstance(v, str) else float(v)) for k, v in diagnosis[i].items()},
            "image_statistics": None if statistics is None else {k: float(v) for k, v in statistics[i].items()},
        }
        for i in range(n_images)
    ]


def assembled_inputs(bundle: Bundle, records: list[dict[str, object]]) -> LesionInputs:
    """The `LesionInputs` of lesions from their kept records, in the records' order and the bundle's column order."""
    folds = bundle.stack.folds
    cnn_outputs = {
        member.name: pd.DataFrame({fold_column(f): [float(r["cnn_outputs"][member.name][str(f)]) for r in records] for f in folds})
        for member in bundle.cnns
    }
    recipe = bundle.stack.feature_recipe
    features = None
    if recipe is not None:
        columns = recipe.columns()
        features = pd.DataFrame([[np.nan if r["image_features"][c] is None else r["image_features"][c] for c in columns] for r in records], columns=columns, dtype=float)
    diagnosis = pd.DataFrame([r["diagnosis"] for r in records], index=pd.RangeIndex(len(records)))
    if not diagnosis.columns.empty:
        diagnosis = diagnosis[list(records[0]["diagnosis"])]  # the order the bundle wrote them in
    return LesionInputs(cnn_outputs, features, diagnosis)


@dataclass
class _Waiting:
    """One upload's images waiting for a CNN pass, and what the pass gave it."""

    sources: list[str]
    records: list[dict[str, object]] | None = None
    error: Exception | None = None


class CombinedPasses:
    """The new images of concurrent uploads through the CNNs in one pass (dynamic batching, as model servers do).

    The models are shared, so one pass runs at a time; and a pass over 8 images costs about twice a pass
    over one. An upload waits for the models; whichever gets them scores every image waiting by then.
    A combined pass that meets an image the CNN pipeline cannot decode (`DataError`) is redone upload by
    upload, so a bad image fails its own upload only.

    >>> passes = CombinedPasses(lambda sources: [{"source": s} for s in sources], threading.Lock())
    >>> passes(["a.jpg", "b.jpg"])
    [{'source': 'a.jpg'}, {'source': 'b.jpg'}]
    """

    def __init__(self, score: Callable[[list[str]], list[dict[str, object]]], models: threading.Lock) -> None:
        self._score, self._models = score, models
        self._waiting: list[_Waiting] = []
        self._queue = threading.Lock()

    def __call__(self, sources: list[str]) -> list[dict[str, object]]:
        """The records of `sources`, in order (each image's, as `inputs_records` gives them)."""
        mine = _Waiting(sources)
        with self._queue:
            self._waiting.append(mine)
        with self._models:
            if mine.records is None and mine.error is None:
                with self._queue:
                    batch, self._waiting = self._waiting, []
                self._pass(batch)
        if mine.error is not None:
            raise mine.error
        return mine.records

    def _pass(self, batch: list[_Waiting]) -> None:
        try:
            records = self._score([source for waiting in batch for source in waiting.sources])
        except DataError as error:
            if len(batch) == 1:
                batch[0].error = error
                return
            for waiting in batch:
                self._pass([waiting])
            return
        except Exception as error:  # a bug: every upload of the pass reports it
            for waiting in batch:
                waiting.error = error
            return
        start = 0
        for waiting in batch:
            waiting.records, start = records[start : start + len(waiting.sources)], start + len(waiting.sources)
