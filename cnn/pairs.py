"""The (model, fold) pairs of a run: which are declared, where their files live, what state each is in.

Importable without TensorFlow, so `status` and `stack` read a run at once. Files of one pair:

    RUN/cnn/plan.json                       declared models (with sizes), folds and epochs
    RUN/cnn/<model>/fold<k>/heartbeat.json  the claim of the process training the pair (`rundir.lock`: created
                                            atomically, its heartbeat refreshed, taken over when its process died)
    RUN/cnn/<model>/fold<k>/checkpoint/     last epoch (weights + optimizer + RNG state) and state.json
    RUN/cnn/<model>/fold<k>/failed.json     the error of the last attempt, if it raised
    RUN/cnn/<model>/fold<k>/done.json       written last: the pair's outputs are complete

Every file is written atomically (temp file + rename), so a killed process leaves either the previous
version or the new one, plus dot-prefixed `.tmp` files that nothing reads and the next attempt removes.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cnn.outputs import WRITTEN_BY, fold_mean_test_table
from errors import RunStateError
from rundir.io import read_json, read_table, write_json, write_table
from rundir.layout import CHECKPOINT_DIR, CHECKPOINT_STATE, DONE_FILE, FAILED_FILE, HEARTBEAT_FILE, HISTORY_FILE, OOF_FILE, RunLayout
from rundir.lock import Holder, acquire, holding


def pair_dir(run_dir: Path, model: str, fold: int) -> Path:
    return RunLayout(run_dir).fold_dir(model, fold)


def write_plan(run_dir: Path, models: dict[str, int], folds: list[int], epochs: int) -> None:
    """Declare the pairs of a run, so `stack` and `status` know what is still missing."""
    write_json({"models": models, "folds": folds, "epochs": epochs}, RunLayout(run_dir).plan)


def read_plan(run_dir: Path) -> dict | None:
    return read_json(RunLayout(run_dir).plan)


def declared_pairs(run_dir: Path) -> list[tuple[str, int]]:
    plan = read_plan(run_dir) or {"models": {}, "folds": []}
    return [(model, fold) for model in plan["models"] for fold in plan["folds"]]


def is_done(run_dir: Path, model: str, fold: int) -> bool:
    return (pair_dir(run_dir, model, fold) / DONE_FILE).exists()


def unfinished_pairs(run_dir: Path) -> list[tuple[str, int]]:
    """Declared pairs without a done marker."""
    return [(model, fold) for model, fold in declared_pairs(run_dir) if not is_done(run_dir, model, fold)]


def describe_pairs(pairs: list[tuple[str, int]]) -> str:
    """`small (folds 1, 2), mobilenet_v3_small (fold 0)`."""
    by_model: dict[str, list[int]] = {}
    for model, fold in pairs:
        by_model.setdefault(model, []).append(fold)
    return ", ".join(
        f"{model} (fold{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))})" for model, folds in by_model.items()
    )


# --- claims: which process trains a pair right now ---------------------------------------------


@contextmanager
def claimed(fold_dir: Path, note: Callable[[str], None]) -> Iterator[Holder | None]:
    """Claim a pair for this process while the block runs: its `heartbeat.json` is created atomically (so two
    jobs never train one pair) and refreshed until the block ends. Yields None when claimed, else the
    live holder that trains it (a dead holder's claim is taken over, with a note)."""
    path = fold_dir / HEARTBEAT_FILE
    holder = Holder.this_process("train-cnns")
    in_the_way = acquire(path, holder, note)
    if in_the_way is not None:
        yield in_the_way
        return
    with holding(path, holder):
        yield None


def start_attempt(fold_dir: Path) -> None:
    """Forget a previous attempt's failure and remove the temp files a killed attempt left behind."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    (fold_dir / FAILED_FILE).unlink(missing_ok=True)
    for leftover in fold_dir.rglob(".*.tmp*"):
        leftover.unlink(missing_ok=True)


def record_failure(fold_dir: Path, error: BaseException, trace: str) -> None:
    write_json(
        {"error": f"{type(error).__name__}: {error}", "traceback": trace, "host": socket.gethostname(), "time": time.time()},
        fold_dir / FAILED_FILE,
    )


# --- status ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairEvidence:
    """What the files of one pair say."""

    done: bool
    heartbeat: Holder | None
    failure: dict | None
    checkpoint: dict | None  # checkpoint/state.json
    history: dict | None  # history.json of a finished pair

    @classmethod
    def read(cls, fold_dir: Path) -> PairEvidence:
        return cls(
            done=(fold_dir / DONE_FILE).exists(),
            heartbeat=Holder.read(fold_dir / HEARTBEAT_FILE),
            failure=read_json(fold_dir / FAILED_FILE),
            checkpoint=read_json(fold_dir / CHECKPOINT_DIR / CHECKPOINT_STATE),
            history=read_json(fold_dir / HISTORY_FILE),
        )


# First matching rule wins; no rule matching means "pending" (nothing trained yet).
STATE_RULES: tuple[tuple[str, Callable[[PairEvidence, float], bool]], ...] = (
    ("done", lambda e, now: e.done),
    ("running", lambda e, now: e.heartbeat is not None and e.heartbeat.dead_because(now) is None),
    ("failed", lambda e, now: e.failure is not None),
    ("interrupted", lambda e, now: e.checkpoint is not None),  # killed mid-fold: re-running resumes it
)


@dataclass(frozen=True)
class PairStatus:
    """One row of `status`: a pair's state, progress and best validation AUC so far."""

    model: str
    fold: int
    state: str  # done | running | failed | interrupted | pending
    epochs_done: int
    epochs: int | None
    best_val_auc: float | None
    detail: str


def _best(val_aucs: list[float]) -> float | None:
    finite = [a for a in val_aucs if not math.isnan(a)]
    return max(finite) if finite else None


def _detail(state: str, evidence: PairEvidence, now: float) -> str:
    beat, failure, checkpoint = evidence.heartbeat, evidence.failure, evidence.checkpoint
    details: dict[str, Callable[[], str]] = {
        "done": lambda: f"{evidence.history['seconds']:.0f} s" if evidence.history else "",
        "running": lambda: f"{beat.host} pid {beat.pid}, heartbeat {now - beat.updated:.0f} s ago",
        "failed": lambda: failure["error"].splitlines()[0] if failure["error"] else "",
        "interrupted": lambda: f"resumes at epoch {checkpoint['epochs_done'] + 1}",
        "pending": lambda: "",
    }
    return details[state]()


def pair_status(run_dir: Path, model: str, fold: int, now: float, *, planned_epochs: int | None) -> PairStatus:
    evidence = PairEvidence.read(pair_dir(run_dir, model, fold))
    state = next((name for name, holds in STATE_RULES if holds(evidence, now)), "pending")
    progress = evidence.history if evidence.done and evidence.history else evidence.checkpoint
    val_aucs = (progress or {}).get("val_auc", [])
    epochs = progress["config"]["epochs"] if progress else planned_epochs
    return PairStatus(model, fold, state, len(val_aucs), epochs, _best(val_aucs), _detail(state, evidence, now))


def run_status(run_dir: Path, now: float) -> list[PairStatus]:
    """Every declared pair, plus any pair with files from an earlier declaration, in plan order."""
    plan = read_plan(run_dir) or {"models": {}, "folds": [], "epochs": None}
    found = [
        (fold_dir.parent.name, int(fold_dir.name.removeprefix("fold")))
        for fold_dir in sorted(RunLayout(run_dir).cnn.glob("*/fold*"))
        if fold_dir.is_dir() and fold_dir.name.removeprefix("fold").isdigit()
    ]
    pairs = list(dict.fromkeys(declared_pairs(run_dir) + found))
    return [pair_status(run_dir, model, fold, now, planned_epochs=plan["epochs"]) for model, fold in pairs]


# --- assembling a model's folds ------------------------------------------------------------------


def assemble_model_outputs(run_dir: Path, model: str, folds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate a model's per-fold OOF tables and average its fold models' test probabilities (`cnn.outputs`)."""
    layout = RunLayout(run_dir)
    outputs = {f: layout.fold_outputs(model, f) for f in folds}
    oof = pd.concat([read_table(oof_file, WRITTEN_BY) for oof_file, _ in outputs.values()])
    tests = {f: read_table(test_file, WRITTEN_BY) for f, (_, test_file) in outputs.items()}
    test = fold_mean_test_table(next(iter(tests.values()))[["image_id", "patient_id"]], tests)
    oof_file, test_file = layout.cnn_outputs(model)
    write_table(oof.reset_index(drop=True), oof_file)
    write_table(test, test_file)
    return oof, test


def require_finished_cnns(run_dir: Path) -> None:
    """Stop unless every declared pair is done; assemble a model whose last fold finished but was not assembled.

    Pairs may run as separate jobs, so the job that finishes a model's last fold assembles it; a job
    killed between its done marker and the assembly leaves that to here.
    """
    missing = unfinished_pairs(run_dir)
    if missing:
        raise RunStateError(
            f"{len(missing)} of {len(declared_pairs(run_dir))} declared CNN (model, fold) pairs are not done: "
            f"{describe_pairs(missing)}. Train them with `python cli.py train-cnns --run {run_dir} ...` "
            f"(one pair per job: `--model M --fold K`); `python cli.py status --run {run_dir}` shows each pair."
        )
    plan = read_plan(run_dir)
    for model in (plan or {"models": {}})["models"]:
        model_dir = RunLayout(run_dir).model_dir(model)
        if not (model_dir / OOF_FILE).exists():
            assemble_model_outputs(run_dir, model, plan["folds"])
