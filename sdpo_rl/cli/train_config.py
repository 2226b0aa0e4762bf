"""The configuration of `sdpo-rl train`: one YAML file plus `--field value` overrides, read into four dataclasses.

The file and the command line use the fields of `trl.GRPOConfig`, `SDPOConfig`, `trl.ModelConfig` (the model, its
dtype and TRL's PEFT/LoRA settings: `use_peft`, `lora_r`, ...) and `TrainScriptArguments` (data and rewards), plus
TRL's `env:` mapping of environment variables. Parsing follows TRL's `TrlParser` (as `trl grpo` does), with three
additions: an unknown key or flag is an error that names it and the closest valid one, a YAML string is converted
like the same text on the command line (YAML reads `1e-5` as a string), and a dict field takes JSON on the command
line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..config import SDPOConfig

CONFIG_FLAG = "--config"
ENV_KEY = "env"


class ConfigError(ValueError):
    """A bad configuration file or command line; the message says what to change."""


@dataclass
class TrainScriptArguments:
    """What `sdpo-rl train` trains on and is rewarded by (the model is `model_name_or_path` of `trl.ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A Hugging Face Hub dataset id, or a local .json/.jsonl/.parquet file or a folder of them."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "The Hub dataset's configuration (subset)."})
    dataset_split: str = field(default="train", metadata={"help": "The split to train on (a local file's is train)."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions as import paths package.module:name; a class is instantiated with no "
            "arguments, a function is used as is. Example: sdpo_rl.rewards:CodeTestsReward."
        },
    )


class TrainArguments(NamedTuple):
    script: TrainScriptArguments
    training: Any  # trl.GRPOConfig
    model: Any  # trl.ModelConfig
    sdpo: SDPOConfig


def build_parser():
    """TRL's parser over the four dataclasses, with dict fields reading JSON."""
    from trl import GRPOConfig, ModelConfig, TrlParser

    parser = TrlParser(
        (TrainScriptArguments, GRPOConfig, ModelConfig, SDPOConfig),
        prog="sdpo-rl train",
        description="Train a model with SDPO. --config CONFIG.yaml reads a YAML file of the fields below (those of "
        "TrainScriptArguments, GRPOConfig, trl.ModelConfig and SDPOConfig, and TRL's env: mapping); --field value "
        "overrides the file. See docs/cli.md.",
        allow_abbrev=False,  # a misspelt flag must be an error, not silently another field
        exit_on_error=False,
    )
    for action in parser._actions:
        if action.type is dict or typing.get_origin(action.type) is dict:
            action.type = _json_object
    return parser


def parse_arguments(argv: list[str]) -> TrainArguments:
    """Read `--config FILE` (optional) and the `--field value` overrides into the four dataclasses.

    Raises `ConfigError` naming the key, flag or value to fix. `--help` prints every field and exits.
    """
    config_path, overrides = _split_config_flag(argv)
    parser = build_parser()
    options = _options_by_field(parser)
    if config_path is not None:
        values = _read_yaml(config_path)
        _set_environment(values.pop(ENV_KEY, {}), config_path)
        for key in values:
            if key not in options:
                raise ConfigError(f"{config_path}: unknown key {key!r}.{_suggestion(key, options)}")
        parser.set_defaults_with_config(**{key: _typed(options[key], key, value) for key, value in values.items()})
    try:
        *parsed, unused = parser.parse_args_into_dataclasses(
            args=overrides, return_remaining_strings=True, look_for_args_file=False
        )
    except argparse.ArgumentError as error:
        raise ConfigError(f"command line: {error}") from error
    except ValueError as error:  # a dataclass rejected a value in __post_init__
        raise ConfigError(str(error)) from error
    if unused:
        flag = next((item for item in unused if item.startswith("-")), None)
        if flag is None:
            raise ConfigError(f"command line: unexpected value {unused[0]!r}; overrides are --field value pairs.")
        name = flag.lstrip("-").split("=", 1)[0].replace("-", "_")
        raise ConfigError(f"command line: unknown option {flag!r}.{_suggestion(name, options)}")
    return TrainArguments(*parsed)


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of `--config PATH` / `--config=PATH` and the other arguments."""
    paths, rest = [], []
    items = iter(argv)
    for item in items:
        if item == CONFIG_FLAG:
            paths.append(next(items, None))
            if paths[-1] is None or paths[-1].startswith("-"):
                raise ConfigError(f"command line: {CONFIG_FLAG} needs a file, as in {CONFIG_FLAG} config.yaml.")
        elif item.startswith(CONFIG_FLAG + "="):
            paths.append(item.split("=", 1)[1])
        else:
            rest.append(item)
    if len(paths) > 1:
        raise ConfigError(f"command line: {CONFIG_FLAG} is given {len(paths)} times; give one file.")
    return (paths[0] if paths else None), rest


def _options_by_field(parser) -> dict[str, argparse.Action]:
    """Each field's `--field` option (a boolean field also has a `--no_field` one, which is not wanted here)."""
    return {action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings}


def _read_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path) as file:
            values = yaml.safe_load(file)
    except OSError as error:
        raise ConfigError(f"{CONFIG_FLAG} {path}: cannot read it ({error.strerror}).") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of field: value, got a {type(values).__name__}.")
    return values


def _set_environment(variables: Any, path: str) -> None:
    if not isinstance(variables, dict):
        raise ConfigError(f"{path}: {ENV_KEY} must be a mapping of variable: value, got {variables!r}.")
    for name, value in variables.items():
        os.environ[str(name)] = str(value)


def _typed(option: argparse.Action, key: str, value: Any) -> Any:
    """A YAML value as the field's type: strings are converted like the same text on the command line."""
    if option.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_typed_scalar(option, key, item) for item in items]
    return _typed_scalar(option, key, value)


def _typed_scalar(option: argparse.Action, key: str, value: Any) -> Any:
    if not isinstance(value, str) or option.type in (None, str):
        return value
    try:
        return option.type(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        raise ConfigError(f"{key}={value!r} is not a valid value ({error}).") from error


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


def _suggestion(name: str, options: dict[str, argparse.Action]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys are the fields listed by `sdpo-rl train --help`."
