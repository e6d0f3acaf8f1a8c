"""The `>>>` examples of the modules users call from notebooks run as tests, so they cannot rot."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["fusion.missingness", "fusion.shift", "cnn.pipeline"])
def test_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
