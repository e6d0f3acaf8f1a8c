"""Per-lesion work done once: what the bundle's CNNs and feature extractor say about an image is computed
the first time that image content is uploaded under that bundle, and kept (`lesion_inputs` table).

A patient's scoring then reads its lesions' kept inputs and runs only the cheap part for the whole
patient (patient context, stack, calibration, ranks: `ensemble.predict.judge_lesions`), so adding a
lesion to a patient of 250 costs one image's CNN passes, not 251. The kept numbers are the ones a
fresh scoring would compute (JSON keeps a float exactly); a missing feature (NaN) is kept as null.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from cnn.outputs import fold_column
from ensemble.bundle import Bundle
from ensemble.predict import LesionInputs


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
