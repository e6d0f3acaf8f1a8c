"""The `>>>` examples of every module run as tests, so they cannot rot; modules are found, not listed."""

import doctest
import importlib
from pathlib import Path

import pytest
from test_layers import LAYERS

ROOT = Path(__file__).resolve().parents[1]


def modules_with_examples() -> list[str]:
    """Every module of the packages whose source has a `>>>` example."""
    found = []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            if ">>> " in path.read_text():
                parts = path.relative_to(ROOT).with_suffix("").parts
                found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


@pytest.mark.parametrize("module", modules_with_examples())
def test_examples_run(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_the_entry_points_have_examples() -> None:
    """What users call from a notebook shows itself in a short runnable example."""
    for module in ("fusion.stack_model", "fusion.stage", "ensemble.predict", "metadata.schema", "cnn.options", "rundir.layout", "errors"):
        assert module in modules_with_examples(), module
