"""An interrupted stage leaves the old run or the new one, or a run that readers refuse as incomplete; never a mix."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

import rundir.io as run_io
from cli import app

runner = CliRunner()
ORIGINAL_ATOMIC_WRITE = run_io.atomic_write


@contextmanager
def interrupted_at_write(k: int | None = None, *, name: str | None = None) -> Iterator[list[Path]]:
    """Every atomic write of the project (whatever module imported it) raises Ctrl-C at its k-th call, or at
    the first write of a file called `name`."""
    written: list[Path] = []

    def write(path: Path, writer):  # noqa: ANN001, ANN202
        if len(written) + 1 == k or Path(path).name == name:
            raise KeyboardInterrupt
        written.append(Path(path))
        return ORIGINAL_ATOMIC_WRITE(path, writer)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "atomic_write", None) is ORIGINAL_ATOMIC_WRITE]
    for module in patched:
        module.atomic_write = write
    try:
        yield written
    finally:
        for module in patched:
            module.atomic_write = ORIGINAL_ATOMIC_WRITE


def _stack_outputs(run: Path) -> dict[str, bytes]:
    """The files a stack call writes that later commands read: RUN/stack/* and the submission."""
    files = sorted((run / "stack").glob("*")) + [run / "submission.csv"]
    return {f.name: f.read_bytes() for f in files if f.exists()}


@pytest.fixture(scope="module")
def stacked_run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished metadata-only run (folds + a stack with zero CNNs), and its outputs after a second call."""
    run = tmp_path_factory.mktemp("stacked") / "run"
    assert runner.invoke(app, ["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", "3", "--no-dedup"]).exit_code == 0
    result = runner.invoke(app, ["stack", "--data", str(tiny_cohort), "--run", str(run), "--rounds", "20"])
    assert result.exit_code == 0, result.output
    return run


def test_stack_interrupted_at_every_write_leaves_the_old_run_the_new_one_or_a_refused_one(
    stacked_run: Path, tiny_cohort: Path, tmp_path: Path
) -> None:
    old = _stack_outputs(stacked_run)
    fresh = tmp_path / "fresh"
    shutil.copytree(stacked_run, fresh)
    new_call = ["stack", "--data", str(tiny_cohort), "--rounds", "30", "--seed", "1"]
    assert runner.invoke(app, [*new_call, "--run", str(fresh)]).exit_code == 0
    new = _stack_outputs(fresh)
    assert new != old  # the two calls are told apart
    k, outcomes = 0, set()
    while True:
        k += 1
        run = tmp_path / f"k{k}"
        shutil.copytree(stacked_run, run)
        with interrupted_at_write(k) as written:
            result = runner.invoke(app, [*new_call, "--run", str(run)])
        if result.exit_code == 0:  # k is past the last write: nothing was interrupted
            assert _stack_outputs(run) == new
            break
        assert result.exit_code == 130 and "interrupted" in result.output, result.output
        assert "Traceback" not in result.output
        readers = {
            "submit": ["submit", "--run", str(run), "--submission-format", "isic2020"],
            "report": ["report", "--run", str(run), "--bootstrap", "20"],
        }
        refused = {name: runner.invoke(app, command) for name, command in readers.items()}
        if all(r.exit_code == 2 and "was interrupted" in r.output for r in refused.values()):
            outcomes.add("refused")
            continue
        assert all(r.exit_code == 0 for r in refused.values()), {n: r.output for n, r in refused.items()}
        outputs = _stack_outputs(run)
        assert outputs in (old, new), f"write {k} ({written[-1] if written else 'none'}) left a mixed run"
        outcomes.add("old" if outputs == old else "new")
    assert k > 10 and {"old", "refused"} <= outcomes  # the stack writes many files; both outcomes occurred


def test_an_interrupted_assembly_of_a_cnn_is_refused_until_train_cnns_runs_again(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--data", str(tiny_cohort), "--run", str(run)]
    assert runner.invoke(app, ["folds", *common, "--k", "2", "--no-dedup"]).exit_code == 0
    train = ["train-cnns", *common, "--models", "small:16", "--epochs", "1"]
    assert runner.invoke(app, train).exit_code == 0
    (run / "cnn" / "small" / "oof.parquet").unlink()  # as if the last fold had just finished: assembly to come
    from cnn.train import assemble_finished_models

    with interrupted_at_write(3), pytest.raises(KeyboardInterrupt):  # the marker and the OOF table written, not the test table
        assemble_finished_models(run, {"small": 16}, [0, 1])
    result = runner.invoke(app, ["stack", *common])
    assert result.exit_code == 2 and "`train-cnns.small` was interrupted" in " ".join(result.output.split()), result.output
    assert runner.invoke(app, train).exit_code == 0  # finished pairs are skipped; the assembly is redone
    assert runner.invoke(app, ["stack", *common]).exit_code == 0


def test_stack_interrupted_while_writing_its_report_is_refused_until_stack_runs_again(stacked_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    """The report is one of the stack's outputs: a new stack beside the old report is not a finished stack."""
    run = tmp_path / "run"
    shutil.copytree(stacked_run, run)
    new_call = ["stack", "--data", str(tiny_cohort), "--run", str(run), "--rounds", "30", "--seed", "1"]
    with interrupted_at_write(name="report.json"):
        assert runner.invoke(app, new_call).exit_code == 130
    for reader in (["submit", "--run", str(run), "--submission-format", "isic2020"], ["report", "--run", str(run), "--bootstrap", "20"]):
        result = runner.invoke(app, reader)
        assert result.exit_code == 2 and "`stack` was interrupted" in " ".join(result.output.split()), result.output
    assert runner.invoke(app, new_call).exit_code == 0
    assert runner.invoke(app, ["submit", "--run", str(run), "--submission-format", "isic2020"]).exit_code == 0


def test_a_report_older_than_its_stack_is_stale(stacked_run: Path, tiny_cohort: Path, tmp_path: Path) -> None:
    from ensemble.report import read_report
    from fusion.stage import run_stack
    from metadata.dataset import run_data
    from rundir.completion import IncompleteRunError

    run = tmp_path / "run"
    shutil.copytree(stacked_run, run)
    assert read_report(run)["entries"]
    run_stack(run_data(tiny_cohort, run).table, run, num_boost_round=10)  # the stack alone, through the library
    with pytest.raises(IncompleteRunError, match="`report` is stale: it describes the outputs `stack` had when it finished .* `stack` ran again"):
        read_report(run)
    status = runner.invoke(app, ["status", "--run", str(run)])
    assert status.exit_code == 0 and "stage report: `report` is stale" in " ".join(status.output.split()), status.output
    assert runner.invoke(app, ["report", "--run", str(run), "--bootstrap", "20"]).exit_code == 0
    assert read_report(run)["entries"]
