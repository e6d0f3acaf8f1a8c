"""Run config files: options from the file, flags over the file, errors that name the key and the fix."""

from __future__ import annotations

import json
from inspect import unwrap
from pathlib import Path
from typing import Literal, get_origin

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from cli import app
from rundir.config import VALUE_TYPES, command_options, resolve_config, split_config_argument

RUNNER = CliRunner(env={"COLUMNS": "300"})  # wide, so messages are not wrapped


def _commands() -> dict:
    group = typer.main.get_command(app)
    return {name: command_options(unwrap(command.callback)) for name, command in group.commands.items()}


def _invoke(*args: str) -> str:
    result = RUNNER.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_config_supplies_options_flags_override_and_the_resolved_config_repeats_the_stage(tiny_cohort: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(f'data = "{tiny_cohort}"\nrun = "{run}"\nseed = 4\n\n[folds]\nk = 2\ndedup = false\n')
    _invoke("folds", "--config", str(config))
    assert pd.read_parquet(run / "folds.parquet")["fold"].nunique() == 2
    _invoke("folds", "--config", str(config), "--k", "3")
    three = pd.read_parquet(run / "folds.parquet")
    assert three["fold"].nunique() == 3
    resolved = json.loads((run / "config.json").read_text())["folds"]
    assert (resolved["k"], resolved["seed"], resolved["dedup"], resolved["data"]) == (3, 4, False, str(tiny_cohort))
    (run / "folds.parquet").unlink()
    _invoke("folds", "--config", str(run / "config.json"))
    pd.testing.assert_frame_equal(pd.read_parquet(run / "folds.parquet"), three)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[fold]\nk = 2\n", ["unknown section [fold]", "did you mean 'folds'", "train-cnns"]),
        ("[folds]\nkk = 2\n", ["[folds] has no key 'kk'", "allowed keys:", "group-by", "on-bad-image"]),
        ("epoch = 3\n", ["unknown key 'epoch'", "did you mean 'epochs'"]),
        ('[folds]\ngroup-by = "ward"\n', ["[folds] group-by = 'ward'", "choose one of 'patient', 'source'"]),
        ('[train-cnns]\nstrategy = "gpu"\n', ["[train-cnns] strategy = 'gpu'", "'mirrored', 'multiworker', 'tpu'"]),
        ('[folds]\nk = "five"\n', ["[folds] k = 'five'", "a whole number"]),
        ('seed = 1.5\n', ["seed = 1.5", "a whole number"]),
        ("[folds\n", ["not valid TOML"]),
    ],
)
def test_config_errors_name_the_file_key_and_allowed_values(tmp_path: Path, text: str, expected: list[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = RUNNER.invoke(app, ["folds", "--config", str(config)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    for fragment in [str(config), *expected]:
        assert fragment in output


@pytest.mark.parametrize(("name", "expected"), [("absent.toml", "no such file"), ("run.yaml", "name a .toml or .json file")])
def test_unusable_config_paths_are_refused(tmp_path: Path, name: str, expected: str) -> None:
    (tmp_path / "run.yaml").write_text("k: 2\n")
    result = RUNNER.invoke(app, ["folds", "--config", str(tmp_path / name)])
    assert result.exit_code == 2 and expected in " ".join(result.output.split())


def test_top_level_keys_reach_every_command_with_that_option_and_sections_win() -> None:
    defaults = resolve_config({"seed": 3, "run": "runs/x", "folds": {"seed": 9}}, _commands(), "run.toml")
    assert defaults["folds"] == {"seed": 9, "run": "runs/x"}
    assert defaults["train-cnns"]["seed"] == 3 and defaults["stack"]["run"] == "runs/x"
    assert "seed" not in defaults["status"] and defaults["status"] == {"run": "runs/x"}
    assert "image_size" in {spec.parameter for spec in _commands()["train-cnns"].values()}  # keys -> parameter names


def test_every_option_of_every_command_can_come_from_a_config() -> None:
    """A new option of a type config files cannot express would only fail when someone sets it."""
    for name, options in _commands().items():
        for key, spec in options.items():
            assert get_origin(spec.annotation) is Literal or spec.annotation in VALUE_TYPES, (name, key, spec.annotation)


@pytest.mark.parametrize(
    ("args", "path", "rest"),
    [
        (["--k", "3", "--config", "a.toml", "--seed", "1"], "a.toml", ["--k", "3", "--seed", "1"]),
        (["--config=b.json"], "b.json", []),
        (["--k", "3"], None, ["--k", "3"]),
        (["--", "--config", "c.toml"], None, ["--", "--config", "c.toml"]),  # after `--` it is not an option
    ],
)
def test_config_argument_is_taken_out_of_the_command_line(args: list[str], path: str | None, rest: list[str]) -> None:
    found, remaining = split_config_argument(args)
    assert (str(found) if found else None, remaining) == (path, rest)
