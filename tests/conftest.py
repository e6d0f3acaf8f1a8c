"""Shared fixtures: one tiny synthetic cohort and one end-to-end run, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def synthetic_cohort(tmp_path_factory: pytest.TempPathFactory, name: str, *, patients: int, image_size: int, seed: int) -> Path:
    """A synthetic cohort (SIIM-ISIC 2020 layout) in a new folder."""
    from metadata.synth import SynthConfig, generate_cohort

    out = tmp_path_factory.mktemp(name)
    generate_cohort(out, SynthConfig(patients=patients, image_size=image_size, seed=seed))
    return out


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort at 32 px."""
    return synthetic_cohort(tmp_path_factory, "cohort", patients=160, image_size=32, seed=7)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-patient synthetic cohort at 16 px, for tests of the plumbing (never written to)."""
    return synthetic_cohort(tmp_path_factory, "tiny_cohort", patients=40, image_size=16, seed=3)


@pytest.fixture(scope="session")
def pipeline_run(cohort_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folds -> train-cnns (two backbones, 3 folds) -> stack, through the real CLI."""
    from typer.testing import CliRunner

    from cli import app

    run = tmp_path_factory.mktemp("run")
    runner = CliRunner()
    steps = [
        ["folds", "--data", str(cohort_dir), "--run", str(run), "--k", "3", "--seed", "7"],
        [
            "train-cnns", "--data", str(cohort_dir), "--run", str(run), "--models", "small,mobilenet_v3_small",
            "--image-size", "32", "--epochs", "3", "--seed", "7", "--deterministic",
        ],
        ["stack", "--data", str(cohort_dir), "--run", str(run), "--seed", "7"],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{args[0]} failed:\n{result.output}\n{result.exception!r}"
    return run


@pytest.fixture(scope="session")
def bundle_dir(pipeline_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline run exported through the CLI (`export`), at the default 95% sensitivity."""
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    result = CliRunner().invoke(app, ["export", "--run", str(pipeline_run), "--out", str(out)])
    assert result.exit_code == 0, f"export failed:\n{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A throwaway PostgreSQL server on loopback (`tests/pgserver.py`), as a SQLAlchemy URL."""
    from pgserver import NoPostgres, throwaway_postgres

    try:
        with throwaway_postgres(tmp_path_factory.mktemp("postgres")) as url:
            yield url
    except NoPostgres as why:
        pytest.skip(str(why))


SYSTEM_CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser():  # noqa: ANN201
    """Debian's Chromium driven by Playwright (whose own browser download is not reachable here)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')")
    if not SYSTEM_CHROMIUM.exists():
        pytest.skip(f"no {SYSTEM_CHROMIUM} (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=str(SYSTEM_CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def killpoints():  # noqa: ANN201
    """The fork server that runs commands and kills them at chosen writes (tests/killpoints.py), one per test module."""
    from killpoints import KillPoints

    server = KillPoints()
    yield server
    server.close()
