"""`sdpo-rl train --config`: a tiny local model trained from a local JSONL file, overrides, and configuration errors."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import make_dataset
from transformers import AutoModelForCausalLM

from sdpo_rl import cli
from sdpo_rl.cli.train import check_required, load_reward_function, load_train_dataset, train
from sdpo_rl.cli.train_config import ConfigError, parse_arguments


def first_token_is_even(completion_ids, **kwargs):
    """A reward function given by import path in these tests (`test_train_cli:first_token_is_even`)."""
    return [1.0 if ids and ids[0] % 2 == 0 else 0.0 for ids in completion_ids]


@pytest.fixture(scope="module")
def jsonl_dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_dataset()))
    return path


def write_config(folder, model_dir, dataset, **changes):
    """A YAML config for a two-step CPU run; `changes` replace or add keys (None removes one)."""
    config = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(dataset),
        "reward_funcs": ["tiny:ParityReward"],
        "output_dir": str(folder / "output"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 6,
        "learning_rate": "1e-2",  # YAML reads this as a string; it must still become a float
        "beta": 0.0,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "teacher_update_rate": 0.5,
        "distillation_topk": 5,
    }
    config.update(changes)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_train_command_trains_a_local_model_from_a_jsonl_file(tmp_path, model_dir, jsonl_dataset):
    config = write_config(tmp_path, model_dir, jsonl_dataset)
    assert cli.main(["train", "--config", str(config)]) == 0

    initial = parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    trained = parameters(AutoModelForCausalLM.from_pretrained(tmp_path / "output"))
    assert trained.keys() == initial.keys()
    assert max(float((trained[n] - initial[n]).abs().max()) for n in initial) > 0


def test_the_trainer_gets_the_settings_of_every_section(tmp_path, model_dir, jsonl_dataset):
    config = write_config(tmp_path, model_dir, jsonl_dataset, reward_funcs=["test_train_cli:first_token_is_even"])
    trainer = train(parse_arguments(["--config", str(config), "--max_steps", "1", "--teacher_mode", "frozen"]))
    assert trainer.args.max_steps == 1 and trainer.args.learning_rate == 0.01
    assert trainer.sdpo_config.teacher_mode == "frozen" and trainer.sdpo_config.distillation_topk == 5
    assert trainer.reward_func_names == ["first_token_is_even"]
    assert [entry["self_distillation/distillation_loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_a_lora_student_with_the_lora_ema_teacher(tmp_path, model_dir, jsonl_dataset):
    config = write_config(tmp_path, model_dir, jsonl_dataset, max_steps=1, teacher_mode="lora_ema", use_peft=True)
    overrides = ["--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]
    trainer = train(parse_arguments(["--config", str(config), *overrides]))
    peft_config = trainer.model.peft_config["default"]
    assert peft_config.r == 4 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert (tmp_path / "output" / "adapter_config.json").is_file()


def test_command_line_overrides_the_file_and_reads_null_lists_and_json(tmp_path, monkeypatch):
    monkeypatch.delenv("SDPO_TRAIN_CLI_TEST", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(
        "model_name_or_path: some/model\ndataset_name: data.jsonl\nreward_funcs: a.b:c\noutput_dir: out\n"
        "max_steps: 7\nlearning_rate: 1e-5\ndistillation_topk: 20\nuse_cpu: true\nenv:\n  SDPO_TRAIN_CLI_TEST: yes\n"
    )
    arguments = parse_arguments(
        [
            *("--config", str(config), "--max_steps", "3", "--distillation_topk", "null"),
            *("--reward_funcs", "x:y", "z:w", "--apply_chat_template_kwargs", '{"enable_thinking": false}'),
            *("--alpha=1.0", "--no_dont_reprompt_on_self_success"),
        ]
    )
    assert arguments.training.max_steps == 3
    assert arguments.training.learning_rate == 1e-5
    assert arguments.sdpo.distillation_topk is None and arguments.sdpo.alpha == 1.0
    assert arguments.sdpo.apply_chat_template_kwargs == {"enable_thinking": False}
    assert arguments.sdpo.dont_reprompt_on_self_success is False
    assert arguments.script.reward_funcs == ["x:y", "z:w"]
    assert arguments.model.model_name_or_path == "some/model"
    assert os.environ["SDPO_TRAIN_CLI_TEST"] == "True"

    from_file = parse_arguments(["--config", str(config)])
    assert from_file.script.reward_funcs == ["a.b:c"] and from_file.training.max_steps == 7
    assert from_file.sdpo.distillation_topk == 20


VALID = "output_dir: out\nuse_cpu: true\n"


@pytest.mark.parametrize(
    "content, message",
    [
        (VALID + "learning_rat: 0.1\n", r"unknown key 'learning_rat'\. Did you mean 'learning_rate'\?"),
        (VALID + "teacher_mod: ema\n", r"unknown key 'teacher_mod'\. Did you mean 'teacher_mode'\?"),
        (VALID + "completely_unrelated: 1\n", r"unknown key 'completely_unrelated'\. Valid keys"),
        (VALID + "max_steps: many\n", r"max_steps='many' is not a valid value"),
        (VALID + "teacher_update_rate: 2\n", r"SDPOConfig\.teacher_update_rate=2 is invalid"),
        (VALID + "env: [A]\n", r"env must be a mapping"),
        (VALID + "max_steps: [\n", r"is not valid YAML"),
        ("- a list\n", r"must hold a mapping of field: value, got a list"),
    ],
)
def test_bad_configuration_files_name_what_to_fix(tmp_path, content, message):
    config = tmp_path / "config.yaml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--config", str(config)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_step", "3"], r"unknown option '--max_step'\. Did you mean 'max_steps'\?"),
        (["--distilation-topk=3"], r"unknown option '--distilation-topk=3'\. Did you mean 'distillation_topk'\?"),
        (["--max_steps", "three"], r"invalid .* value: 'three'"),
        (["stray"], r"unexpected value 'stray'"),
        (["--config"], r"--config needs a file"),
        (["--config", "a.yaml", "--config=b.yaml"], r"--config is given 2 times"),
        (["--config", "missing.yaml"], r"cannot read it"),
    ],
)
def test_bad_command_lines_name_what_to_fix(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_arguments(["--output_dir", str(tmp_path), "--use_cpu", "true", *argv])


def test_missing_settings_are_reported_by_the_command(tmp_path, capsys):
    assert cli.main(["train", "--output_dir", str(tmp_path), "--use_cpu", "true", "--dataset_name", "d.jsonl"]) == 2
    error = capsys.readouterr().err
    assert "sdpo-rl train: error: model_name_or_path is required" in error


def test_help_lists_the_fields_of_every_section(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--reward_funcs", "--dataset_split", "--max_steps", "--teacher_mode", "--lora_r"):
        assert flag in text


def test_reward_functions_by_import_path():
    from tiny import ParityReward

    assert isinstance(load_reward_function("tiny:ParityReward"), ParityReward)
    assert load_reward_function("test_train_cli:first_token_is_even") is first_token_is_even
    assert load_reward_function("test_train_cli.first_token_is_even") is first_token_is_even  # TRL's dotted form
    with pytest.raises(ConfigError, match="is not an import path"):
        load_reward_function("first_token_is_even")
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        load_reward_function("no_such_module:f")
    with pytest.raises(ConfigError, match="has no 'missing'"):
        load_reward_function("tiny:missing")
    with pytest.raises(ConfigError, match="is a list, not a function or class"):
        load_reward_function("tiny:COUNTRIES")


def test_local_datasets_files_and_folders(tmp_path, jsonl_dataset):
    assert len(load_train_dataset(str(jsonl_dataset), None, "train")) == len(make_dataset())
    folder = tmp_path / "folder"
    folder.mkdir()
    make_dataset().to_parquet(folder / "train.parquet")
    make_dataset(n=4).to_parquet(folder / "test.parquet")
    assert len(load_train_dataset(str(folder), None, "test")) == 4
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"unsupported extension '\.txt'"):
        load_train_dataset(str(tmp_path / "data.txt"), None, "train")


@pytest.mark.slow
def test_train_command_under_accelerate_launch_with_two_processes(tmp_path, model_dir, jsonl_dataset):
    # Two completions per process and groups of four: one process alone would refuse this configuration.
    config = write_config(tmp_path, model_dir, jsonl_dataset, max_steps=1, per_device_train_batch_size=2)
    # --multi_gpu picks accelerate's torchrun launcher (--cpu would start one process); use_cpu: true makes the
    # processes train on the CPU over gloo.
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(free_port()), "-m", "sdpo_rl.cli", "train", "--config", str(config)),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), environment.get("PYTHONPATH", "")])
    completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    trained = parameters(AutoModelForCausalLM.from_pretrained(tmp_path / "output"))
    initial = parameters(AutoModelForCausalLM.from_pretrained(model_dir))
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)


DOCS = Path(__file__).resolve().parents[1] / "docs"
YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)
YAML_SNIPPETS = {
    f"{document}:{index}": text
    for document in ("cli.md", "distributed.md")
    for index, text in enumerate(YAML_BLOCK.findall((DOCS / document).read_text()))
}


def test_the_docs_have_yaml_snippets_to_check():
    assert sum(name.startswith("cli.md") for name in YAML_SNIPPETS) >= 2
    assert sum(name.startswith("distributed.md") for name in YAML_SNIPPETS) >= 3


@pytest.mark.parametrize("name", YAML_SNIPPETS)
def test_yaml_snippets_of_the_docs_are_valid(tmp_path, name):
    """An accelerate config loads and names only `accelerate launch` settings; an `sdpo-rl train` config parses."""
    path = tmp_path / "snippet.yaml"
    path.write_text(YAML_SNIPPETS[name])
    values = yaml.safe_load(YAML_SNIPPETS[name])
    if "distributed_type" in values:
        from accelerate.commands.config.config_args import ClusterConfig
        from accelerate.commands.launch import launch_command_parser

        ClusterConfig.from_yaml_file(str(path))  # rejects unknown top-level keys
        launch_settings = vars(launch_command_parser().parse_args(["script.py"]))
        for key in values.get("deepspeed_config", {}):
            assert key in launch_settings, key
        for key in values.get("fsdp_config", {}):
            assert (key if key.startswith("fsdp_") else "fsdp_" + key) in launch_settings, key
    else:  # bf16 needs a GPU: overridden on this CPU-only machine, everything else is checked as written
        arguments = parse_arguments(["--config", str(path), "--bf16", "false", "--use_cpu", "true"])
        check_required(arguments.script, arguments.model)
