"""The `>>>` examples of the modules users call from notebooks run as tests, so they cannot rot."""

import doctest
import importlib

import pytest

MODULES = [
    "metadata.folds", "metadata.images", "evaluation.metrics", "rundir.layout", "metadata.run_folds", "cnn.backbones", "cnn.pipeline", "cnn.train",
    "fusion.cross_fit", "fusion.diagnosis_stack", "fusion.image_features.families", "fusion.image_features.stage", "fusion.missingness", "fusion.patient_context", "fusion.shift", "ensemble.submission",
    "ensemble.serve.app", "ensemble.serve.store",
]


@pytest.mark.parametrize("module", MODULES)
def test_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
