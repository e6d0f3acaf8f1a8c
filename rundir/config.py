"""Run configuration files: one TOML (or JSON) file describes a run, and every command reads it.

    data = "data/isic2020"     # top level: an option of any command that has it
    run = "runs/isic2020"
    seed = 7

    [folds]                    # a section per command: options of that command only
    k = 5

    [train-cnns]
    models = "small:64,efficientnet_b0:128"
    epochs = 12
    deterministic = true

Keys are the option names without `--`. A flag on the command line beats the command's section,
which beats a top-level key, which beats the built-in default. The whole file is checked at every
command, so a typo in any section stops the run with the file, section and key named and the
allowed keys or values listed. Each stage writes its resolved options to RUN/config.json, which is
itself a valid config file.
"""

from __future__ import annotations

import difflib
import inspect
import json
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from errors import OptionError

CONFIG_READERS: dict[str, Callable[[str], Any]] = {".toml": tomllib.loads, ".json": json.loads}
# Option type -> the types a config value may have, and how to name them in an error.
VALUE_TYPES: dict[Any, tuple[tuple[type, ...], str]] = {
    str: ((str,), "a string"),
    Path: ((str,), "a path (a string)"),
    int: ((int,), "a whole number"),
    float: ((int, float), "a number"),
    bool: ((bool,), "true or false"),
    list[str]: ((list, str), "a string or a list of strings"),  # a repeatable option: one value or several
}


class ConfigError(OptionError):
    """A config file that cannot be used as written."""


@dataclass(frozen=True)
class OptionSpec:
    """One command option as a config key sees it."""

    parameter: str  # the command function's parameter name
    annotation: Any  # its type, without Annotated and Optional
    declaration: Any = None  # the `typer.Option` that declares it: one object per meaning, shared by the commands that share the meaning

    def check(self, value: Any, where: str) -> None:
        if get_origin(self.annotation) is Literal:
            choices = get_args(self.annotation)
            if value not in choices:
                raise ConfigError(f"{where} = {value!r}: choose one of {', '.join(map(repr, choices))}.")
            return
        if self.annotation not in VALUE_TYPES:
            raise ConfigError(f"{where}: this option takes {self.annotation}, which a config file cannot set; pass it as a flag.")
        allowed, described = VALUE_TYPES[self.annotation]
        if type(value) not in allowed or (isinstance(value, list) and not all(isinstance(item, str) for item in value)):
            raise ConfigError(f"{where} = {value!r}: expected {described}.")

    def normalised(self, value: Any) -> Any:
        """A checked value as the command takes it: one string for a repeatable option is a list of one."""
        return [value] if self.annotation == list[str] and isinstance(value, str) else value


def _did_you_mean(word: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(word, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) not in (Union, types.UnionType):
        return annotation
    (inner,) = [a for a in get_args(annotation) if a is not type(None)]
    return inner


def _option_key(parameter: str, metadata: tuple[Any, ...]) -> str:
    """The option's long name without `--` (`--image-size` -> `image-size`, `--jit/--no-jit` -> `jit`).

    In `Annotated[int, typer.Option("--image-size")]` the first name sits in the OptionInfo's `default`.
    """
    names = [n for m in metadata for n in (getattr(m, "default", None), *(getattr(m, "param_decls", None) or ()))]
    declared = [n for n in names if isinstance(n, str) and n.startswith("--")]
    return declared[0].split("/")[0][2:] if declared else parameter.replace("_", "-")


def command_options(function: Callable[..., Any]) -> dict[str, OptionSpec]:
    """Config key -> option of a command function whose parameters are `Annotated[type, typer.Option(...)]`."""
    hints = typing.get_type_hints(function, include_extras=True)
    options = {}
    for parameter in inspect.signature(function).parameters:
        hint = hints[parameter]
        metadata = hint.__metadata__ if get_origin(hint) is Annotated else ()
        base = get_args(hint)[0] if metadata else hint
        declaration = next((m for m in metadata if hasattr(m, "param_decls")), None)
        options[_option_key(parameter, metadata)] = OptionSpec(parameter, _without_none(base), declaration)
    return options


def read_config(path: Path) -> dict[str, Any]:
    """The parsed config file (TOML or JSON, by extension)."""
    path = Path(path)
    reader = CONFIG_READERS.get(path.suffix.lower())
    if reader is None:
        raise ConfigError(f"--config {path}: name a {' or '.join(CONFIG_READERS)} file.")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file.")
    try:
        config = reader(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not valid {path.suffix.lower()[1:].upper()}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected keys and [command] sections at the top, found {type(config).__name__}.")
    return config


def resolve_config(config: dict[str, Any], commands: dict[str, dict[str, OptionSpec]], source: str) -> dict[str, dict[str, Any]]:
    """Check every section, key and value of a config; return each command's defaults (parameter -> value)."""
    sections = {k: v for k, v in config.items() if isinstance(v, dict)}
    shared = {k: v for k, v in config.items() if not isinstance(v, dict)}
    unknown = sorted(set(sections) - set(commands))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]{_did_you_mean(unknown[0], list(commands))}; "
            f"sections are command names: {', '.join(commands)}."
        )
    every_key = sorted({key for options in commands.values() for key in options})
    unshared = sorted(set(shared) - set(every_key))
    if unshared:
        raise ConfigError(
            f"{source}: unknown key {unshared[0]!r}{_did_you_mean(unshared[0], every_key)}; "
            f"top-level keys are options of some command: {', '.join(every_key)}."
        )
    _refuse_ambiguous_keys(shared, commands, source)
    defaults = {}
    for name, options in commands.items():
        section = sections.get(name, {})
        foreign = sorted(set(section) - set(options))
        if foreign:
            raise ConfigError(
                f"{source}: [{name}] has no key {foreign[0]!r}{_did_you_mean(foreign[0], list(options))}; "
                f"allowed keys: {', '.join(sorted(options))}."
            )
        chosen = {key: (key, value) for key, value in shared.items() if key in options}
        chosen |= {key: (f"[{name}] {key}", value) for key, value in section.items()}
        for key, (where, value) in chosen.items():
            options[key].check(value, f"{source}: {where}")
        defaults[name] = {options[key].parameter: options[key].normalised(value) for key, (_, value) in chosen.items()}
    return defaults


def _refuse_ambiguous_keys(shared: dict[str, Any], commands: dict[str, dict[str, OptionSpec]], source: str) -> None:
    """A top-level key reaches every command that has the option: refuse one whose option means different
    things to different commands (each command declares its own `--out`, say), naming the commands."""
    for key in sorted(shared):
        declarations = {name: options[key].declaration for name, options in commands.items() if key in options}
        if len({id(d) for d in declarations.values()}) > 1:
            raise ConfigError(
                f"{source}: top-level key {key!r} means different things to {', '.join(declarations)}; "
                f"put it in the section of the command it is for, e.g. [{next(iter(declarations))}] {key} = ..."
            )


def split_config_argument(args: list[str]) -> tuple[Path | None, list[str]]:
    """Take `--config FILE` (or `--config=FILE`) out of a command's arguments."""
    end = args.index("--") if "--" in args else len(args)
    for i, arg in enumerate(args[:end]):
        if arg.startswith("--config="):
            return Path(arg.partition("=")[2]), args[:i] + args[i + 1 :]
        if arg == "--config":
            if i + 1 >= end:
                raise ConfigError("--config needs a file: --config run.toml.")
            return Path(args[i + 1]), args[:i] + args[i + 2 :]
    return None, args


def config_section(options: dict[str, OptionSpec], arguments: dict[str, Any]) -> dict[str, Any]:
    """A command's resolved arguments as config keys, as `--config` reads them back (unset options left out)."""
    values = {key: arguments.get(spec.parameter) for key, spec in options.items()}
    return {key: str(value) if isinstance(value, Path) else value for key, value in values.items() if value is not None}
