"""`sdpo-rl train`: train with SDPO from one YAML file, the way `trl grpo` trains with GRPO.

    sdpo-rl train --config config.yaml [--field value ...]
    accelerate launch [launcher options] -m sdpo_rl.cli train --config config.yaml [--field value ...]

`sdpo_rl.cli.train_config` reads the configuration; this module loads the dataset and the reward functions it names,
builds `SDPOTrainer` (which loads the model from `model_name_or_path`, with a LoRA adapter when `use_peft` is set),
trains, and saves the student to `output_dir`. Every process of an `accelerate launch` runs the same code; the dataset
is prepared by the main process first, then read from the cache by the others. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from ..process_group import end_training
from .common import command_parser
from .train_config import ConfigError, TrainArguments, TrainScriptArguments, parse_arguments

DATASET_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sdpo-rl train` on the `sdpo-rl` command's subparsers."""
    parser = command_parser(
        subparsers,
        "train",
        __doc__,
        help="train a model with SDPO from a YAML file (GRPOConfig, SDPOConfig and model/data/reward fields)",
        add_help=False,  # `sdpo-rl train --help` is answered by the configuration parser, with every field
        prefix_chars="\0",  # hand every argument, flags included, to the configuration parser untouched
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        arguments = parse_arguments(args.arguments)
        check_required(arguments.script, arguments.model)
        train(arguments)
    except ConfigError as error:
        print(f"sdpo-rl train: error: {error}", file=sys.stderr)
        return 2
    return 0


def check_required(script: TrainScriptArguments, model) -> None:
    """The three settings without a default: what to train, on what, rewarded by what."""
    for name, value, example in (
        ("model_name_or_path", model.model_name_or_path, "Qwen/Qwen3-0.6B"),
        ("dataset_name", script.dataset_name, "data/train.jsonl"),
        ("reward_funcs", script.reward_funcs, "[my_rewards:exact_match]"),
    ):
        if not value:
            raise ConfigError(f"{name} is required: set it in the YAML file ({name}: {example}) or with --{name}.")


def train(arguments: TrainArguments):
    """Build the trainer from `arguments`, train, save the student to `output_dir`, end the run, return the trainer.

    Ending the run (`sdpo_rl.process_group.end_training`) destroys the process group of a multi-process launch.
    """
    from trl import get_peft_config, get_quantization_config

    from ..trainer import SDPOTrainer

    script, training, model = arguments.script, arguments.training, arguments.model
    # As `trl grpo`: the model is loaded by the trainer, with these settings of trl.ModelConfig.
    training.model_init_kwargs = {
        "revision": model.model_revision,
        "trust_remote_code": training.trust_remote_code,
        "attn_implementation": model.attn_implementation,
        "dtype": model.dtype,
        **(training.model_init_kwargs or {}),
    }
    with training.main_process_first(desc="loading the dataset"):
        dataset = load_train_dataset(script.dataset_name, script.dataset_config, script.dataset_split)
    trainer = SDPOTrainer(
        model=model.model_name_or_path,
        reward_funcs=[load_reward_function(path) for path in script.reward_funcs],
        args=training,
        train_dataset=dataset,
        peft_config=get_peft_config(model),
        quantization_config=get_quantization_config(model),
        sdpo_config=arguments.sdpo,
    )
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    trainer.save_model(training.output_dir)
    if training.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name)
    end_training(trainer)  # frees the process group now: its threads must not outlive the interpreter
    return trainer


def load_train_dataset(name: str, config: str | None, split: str):
    """A Hub dataset, or a local .json/.jsonl/.parquet file, or a folder of such files (its splits from file names)."""
    from datasets import load_dataset

    path = Path(name)
    if path.is_file():
        builder = DATASET_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ConfigError(
                f"dataset_name={name!r} is a file with an unsupported extension {path.suffix!r}: use one of "
                f"{', '.join(sorted(DATASET_BUILDERS))}, a folder of such files, or a Hub dataset id."
            )
        return load_dataset(builder, data_files=str(path), split=split)
    return load_dataset(name, config, split=split)


def load_reward_function(import_path: str) -> Any:
    """The reward function at `package.module:name` (TRL's dotted `package.module.name` works too).

    A class is instantiated with no arguments; a function (or other callable) is returned as is. The working
    directory is importable, as with `trl grpo`, so a `my_rewards.py` next to the config can be named `my_rewards:f`.
    """
    module_name, _, attribute = import_path.rpartition(":") if ":" in import_path else import_path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(
            f"reward_funcs entry {import_path!r} is not an import path: write package.module:name, as in "
            "sdpo_rl.rewards:CodeTestsReward."
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"reward_funcs entry {import_path!r}: cannot import {module_name!r} ({error}). Install its package, or "
            "run from the folder that holds it."
        ) from error
    if not hasattr(module, attribute):
        raise ConfigError(f"reward_funcs entry {import_path!r}: module {module_name!r} has no {attribute!r}.")
    reward = getattr(module, attribute)
    if inspect.isclass(reward):
        return reward()
    if not callable(reward):
        raise ConfigError(f"reward_funcs entry {import_path!r} is a {type(reward).__name__}, not a function or class.")
    return reward
