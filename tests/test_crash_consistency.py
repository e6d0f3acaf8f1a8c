"""kill -9 at seeded moments of `stack`, `features` and `train-cnns` (one pair): the run is left in its old state,
its new state, or refused as incomplete by its readers; never mixed. Run again after a kill, a command takes the
dead process's lock over and ends in the new state.

Each command runs once to the end on a copy of the old run (the new state, and how many changes to the file
system it makes); `POINTS` crash points are drawn among those changes with a fixed seed, and one more run copies
the run folder just before each (`tests/killpoints.py`: what a SIGKILL there leaves). `REAL_KILLS` of the points
are then crashed for real, with SIGKILL, which must leave what the copy showed; each is then run again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from killpoints import KillPoints

from errors import RunStateError

POINTS = 20
REAL_KILLS = 2
SEED = 28
State = dict[str, bytes]


@dataclass(frozen=True)
class Command:
    """A command on a run, and what a reader of the run finds after it: its outputs, or a refusal."""

    argv: Callable[[Path], list[str]]
    outputs: Callable[[Path], State]  # raises RunStateError where a reader refuses the run


def _files(run: Path, *patterns: str) -> State:
    """The files a reader reads (a killed write's dot-prefixed temp file is not one of them)."""
    return {str(p.relative_to(run)): p.read_bytes() for pattern in patterns for p in sorted(run.glob(pattern)) if p.is_file() and not p.name.startswith(".")}


def _stack_outputs(run: Path) -> State:
    """What `submit`, `report`, `export` read: the stack's files, the submission, the report (less its provenance)."""
    from ensemble.report import read_report
    from rundir.completion import require_complete

    require_complete(run, "train-cnns", "stack")
    report = read_report(run)
    described = {k: v for k, v in report.items() if k not in ("run", "provenance", "report_seconds")}
    pages = {name: (run / name).read_text().split(marker)[0].encode() for name, marker in (("report.md", "## Provenance"), ("report.html", "<h2>Provenance"))}
    return {**_files(run, "stack/*", "submission.csv", "figures/*"), **pages, "report.json": json.dumps(described, sort_keys=True).encode()}


def _feature_outputs(run: Path) -> State:
    """What `stack` reads of the features: every family's table and the recipe."""
    from fusion.image_features.stage import finished_recipe

    finished_recipe(run)
    return _files(run, "features/*.parquet", "features/recipe.json")


def _pair_outputs(run: Path) -> State:
    """What `stack` reads of a CNN: its pairs, all done (else it refuses), assembled into its OOF and test tables."""
    from cnn.pairs import require_finished_cnns
    from rundir.completion import require_complete

    require_complete(run, "train-cnns")
    require_finished_cnns(run)  # assembles a model whose last pair finished but was not assembled
    history = json.loads((run / "cnn/small/fold0/history.json").read_text())
    return _files(run, "cnn/small/*.parquet", "cnn/small/fold*/*.parquet") | {"fold0 validation AUC": json.dumps(history["val_auc"]).encode()}


def _reader_finds(command: Command, run: Path) -> State | None:
    """The run's outputs as a reader finds them, or None where it refuses them."""
    try:
        return command.outputs(run)
    except RunStateError:
        return None


def _outcome(found: State | None, old: State | None, new: State) -> str:
    assert found in (None, old, new), "the run mixes the old and the new outputs"
    return "refused" if found is None else "old" if found == old else "new"


def _crash_and_check(killpoints: KillPoints, command: Command, old_run: Path, tmp_path: Path) -> set[str]:
    """At each seeded crash point the reader finds the old state, the new one or refuses; a real SIGKILL at
    `REAL_KILLS` of them leaves the same, and the command run again ends in the new state. The outcomes seen."""
    old, runs = _reader_finds(command, old_run), {name: tmp_path / name for name in ("counted", "copied", "crashed")}
    for name in ("counted", "copied"):
        shutil.copytree(old_run, runs[name])
    finished = killpoints.run(command.argv(runs["counted"]))
    assert finished["code"] == 0, finished["output"]
    new = command.outputs(runs["counted"])
    rng = np.random.default_rng(SEED)
    points = sorted(int(k) for k in rng.choice(np.arange(1, finished["changes"] + 1), size=min(POINTS, finished["changes"]), replace=False))
    copied = killpoints.run(command.argv(runs["copied"]), snapshots=tuple(points), watch=runs["copied"], snapshot_dir=runs["crashed"])
    assert copied["code"] == 0 and command.outputs(runs["copied"]) == new, copied["output"]
    outcomes = {k: _outcome(_reader_finds(command, runs["crashed"] / f"at{k}"), old, new) for k in points}
    for point in sorted(int(k) for k in rng.choice(points, size=REAL_KILLS, replace=False)):
        run = tmp_path / f"killed_at_{point}"
        shutil.copytree(old_run, run)
        killed = killpoints.run(command.argv(run), kill_at=point)
        assert killed["killed"] and _outcome(_reader_finds(command, run), old, new) == outcomes[point], (point, killed["output"])
        left = [*run.glob(".lock/writer.json"), *run.glob("cnn/*/fold*/heartbeat.json")]  # the killed process's locks
        again = killpoints.run(command.argv(run))
        assert again["code"] == 0 and command.outputs(run) == new, again["output"]
        assert not left or "took over the lock" in again["output"], again["output"]
    return set(outcomes.values())


@pytest.fixture(scope="module")
def folded(killpoints: KillPoints, tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """A new run of the tiny cohort with k folds."""

    def make(k: int) -> Path:
        run = tmp_path_factory.mktemp("crash") / "run"
        assert killpoints.run(["folds", "--data", str(tiny_cohort), "--run", str(run), "--k", str(k), "--no-dedup"])["code"] == 0
        return run

    return make


def _ok(answer: dict) -> None:
    assert answer["code"] == 0, answer["output"]


def test_stack_killed_anywhere_leaves_the_old_stack_the_new_one_or_a_refused_run(
    killpoints: KillPoints, folded: Callable[[int], Path], tiny_cohort: Path, tmp_path: Path
) -> None:
    old_run = folded(3)
    _ok(killpoints.run(["stack", "--data", str(tiny_cohort), "--run", str(old_run), "--rounds", "20"]))
    command = Command(lambda run: ["stack", "--data", str(tiny_cohort), "--run", str(run), "--rounds", "30", "--seed", "1"], _stack_outputs)
    assert _crash_and_check(killpoints, command, old_run, tmp_path) >= {"old", "refused"}


def test_features_killed_anywhere_leave_the_old_features_the_new_ones_or_a_refused_run(
    killpoints: KillPoints, folded: Callable[[int], Path], tiny_cohort: Path, tmp_path: Path
) -> None:
    old_run = folded(2)
    common = ["--data", str(tiny_cohort), "--image-size", "32", "--jobs", "1"]
    _ok(killpoints.run(["features", "--run", str(old_run), *common, "--families", "shape"]))
    command = Command(lambda run: ["features", "--run", str(run), *common, "--families", "shape,color"], _feature_outputs)
    assert _crash_and_check(killpoints, command, old_run, tmp_path) >= {"old", "refused"}


def test_a_pair_killed_anywhere_is_unfinished_or_finished_never_half_written(
    killpoints: KillPoints, folded: Callable[[int], Path], tiny_cohort: Path, tmp_path: Path
) -> None:
    """The old run has fold 1 of `small` done and fold 0 not started: `stack` refuses it until fold 0 is done."""
    old_run = folded(2)
    train = ["train-cnns", "--data", str(tiny_cohort), "--models", "small:16", "--epochs", "1", "--augment", "none", "--tta", "none", "--deterministic"]
    _ok(killpoints.run([*train, "--run", str(old_run), "--fold", "1"]))
    with pytest.raises(RunStateError, match=r"small \(fold 0\)"):
        _pair_outputs(old_run)
    command = Command(lambda run: [*train, "--run", str(run), "--fold", "0"], _pair_outputs)
    assert _crash_and_check(killpoints, command, old_run, tmp_path) == {"refused", "new"}  # the old run is refused too
