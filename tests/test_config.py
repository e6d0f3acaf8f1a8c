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


@pytest.mark.parametrize("command", ["folds", "submit", "predict"])
def test_a_key_with_a_value_of_another_vocabulary_is_refused_naming_it(tmp_path: Path, command: str) -> None:
    """`format` is the data's layout for every command: an ISIC 2024 run config written with the old
    spelling reaches no command as anything else (submit's own format is `submission-format`)."""
    config = tmp_path / "run.toml"
    config.write_text('format = "isic-2024"\n')
    result = RUNNER.invoke(app, [command, "--config", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "format = 'isic-2024'" in output and "'isic2024'" in output, output


def test_a_top_level_key_that_means_different_things_to_different_commands_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('out = "somewhere"\n')
    result = RUNNER.invoke(app, ["export", "--config", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "top-level key 'out' means different things to synth, pretrain, submit, export" in output, output
    config.write_text('[export]\nout = "somewhere"\n')  # in its command's section it has one meaning
    assert resolve_config({"export": {"out": "somewhere"}}, _commands(), "run.toml")["export"] == {"out": "somewhere"}


def test_each_shared_key_means_one_thing() -> None:
    """The keys several commands take from a config's top level are declared once and shared."""
    declarations: dict[str, set[int]] = {}
    for options in _commands().values():
        for key, spec in options.items():
            declarations.setdefault(key, set()).add(id(spec.declaration))
    shared = sorted(key for key, found in declarations.items() if len(found) == 1 and sum(key in o for o in _commands().values()) > 1)
    assert {"data", "run", "seed", "format", "metadata", "bundle", "color-constancy", "wait"} <= set(shared), shared


def test_a_repeatable_option_takes_one_value_or_a_list_from_a_config() -> None:
    """`data` is one folder to most commands and several to `pretrain`: one string reaches it as a list of one."""
    resolved = resolve_config({"data": "ham10000"}, _commands(), "run.toml")
    assert resolved["pretrain"]["data"] == ["ham10000"] and resolved["folds"]["data"] == "ham10000"
    assert resolve_config({"pretrain": {"data": ["a", "b"]}}, _commands(), "run.toml")["pretrain"]["data"] == ["a", "b"]
