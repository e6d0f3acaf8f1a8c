"""Shared fixtures: one tiny synthetic cohort and one end-to-end run, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic cohort (SIIM-ISIC 2020 layout) at 32 px."""
    from metadata.synth import SynthConfig, generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, SynthConfig(patients=160, image_size=32, seed=7))
    return out


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-patient synthetic cohort at 16 px, for tests of the plumbing (never written to)."""
    from metadata.synth import SynthConfig, generate_cohort

    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, SynthConfig(patients=40, image_size=16, seed=3))
    return out


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


def _postgres_binaries() -> Path | None:
    """The folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), if installed."""
    import shutil

    found = shutil.which("initdb") or shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A throwaway PostgreSQL server on loopback (Debian's `postgresql` package), as a SQLAlchemy URL."""
    import shutil
    import socket
    import subprocess

    binaries = _postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    folder = tmp_path_factory.mktemp("postgres")
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            pytest.skip("running as root without a postgres user to run the server as")
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        folder.chmod(0o755)
        for parent in folder.parents:  # the server user must reach its folder
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o011)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(folder / "log.txt"), "start"], check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE triage")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/triage"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)


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
