"""`sdpo-rl preflight`: measure the teacher's edge before training, and say whether SDPO will help.

    sdpo-rl preflight --config config.yaml [--field value ...] [--prompts 32] [--teacher-samples 4] [--json OUT]
    sdpo-rl preflight --task capitals [--prompts 32] [--teacher-samples 4] [--json OUT]

`--config` reads the same YAML file as `sdpo-rl train` (model, dataset, reward functions, GRPOConfig and SDPOConfig
fields; `--field value` overrides it); `--task` measures a built-in task (`sdpo_rl.apps.tasks`) on the embedded
SmolLM2-135M-Instruct with the learning benchmark's sampling settings (`TASK_SETTINGS`). Prints a table of the
measures and the verdict; `--json` also writes the report. See docs/preflight.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from .common import command_parser

# The sampling settings of `--task`: those of the learning benchmark (benchmarks/learning.py), which validates them.
TASK_SETTINGS = dict(num_generations=4, max_completion_length=24, temperature=1.0)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sdpo-rl preflight` on the `sdpo-rl` command's subparsers."""
    parser = command_parser(
        subparsers,
        "preflight",
        __doc__,
        help="measure before training whether the model's own teacher knows more than it does (will SDPO help?)",
    )
    source = parser.add_argument_group("what to measure: --config (as sdpo-rl train) or --task")
    source.add_argument("--config", help="the YAML file of sdpo-rl train; --field value pairs after it override it")
    source.add_argument("--task", help="a built-in task (sdpo_rl.apps.tasks) on the embedded model, e.g. capitals")
    parser.add_argument("--prompts", type=int, default=32, help="training prompts to sample")
    parser.add_argument("--teacher-samples", type=int, default=4, help="teacher completions per failed completion")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sample and of sampling")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the report to OUT")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, takes_overrides=True)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run `sdpo-rl preflight`; `args.overrides` are the `--field value` pairs after `--config`."""
    try:
        measured = _inputs(args, getattr(args, "overrides", []))
    except ValueError as error:
        print(f"sdpo-rl preflight: error: {error}", file=sys.stderr)
        return 2
    import torch

    from ..preflight import preflight

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        report = preflight(
            *measured,
            prompts=args.prompts,
            teacher_samples=args.teacher_samples,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except ValueError as error:
        print(f"sdpo-rl preflight: error: {error}", file=sys.stderr)
        return 2
    print(format_report(report.to_dict()))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"Report written to {args.json}")
    return 0


def _inputs(args: argparse.Namespace, overrides: list[str]) -> tuple:
    """`(model, tokenizer, dataset, reward functions, GRPOConfig, SDPOConfig)` that the arguments name."""
    if (args.config is None) == (args.task is None):
        raise ValueError("name what to measure: --config CONFIG.yaml (as sdpo-rl train) or --task NAME, not both")
    if args.task is not None:
        if overrides:
            raise ValueError(f"--field value overrides apply to --config only, got {' '.join(overrides)}")
        return task_inputs(args.task)
    from .train import check_required, load_reward_function, load_train_dataset
    from .train_config import ConfigError, parse_arguments

    try:
        arguments = parse_arguments(["--config", args.config, *overrides])
        script, model = arguments.script, arguments.model
        check_required(script, model)
        dataset = load_train_dataset(script.dataset_name, script.dataset_config, script.dataset_split)
        rewards = [load_reward_function(path) for path in script.reward_funcs]
    except ConfigError as error:
        raise ValueError(str(error)) from None
    return model.model_name_or_path, None, dataset, rewards, arguments.training, arguments.sdpo


def task_inputs(name: str) -> tuple:
    """What `--task NAME` measures: the embedded model on the task's training rows, with `TASK_SETTINGS`."""
    from trl import GRPOConfig

    from ..apps.tasks import get_task
    from ..config import SDPOConfig
    from ..models import load_model

    task = get_task(name)
    model, tokenizer = load_model()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="sdpo-preflight-"),
        per_device_train_batch_size=16,
        beta=0.0,
        activation_checkpointing=False,
        use_cpu=True,
        report_to="none",
        **TASK_SETTINGS,
    )
    return model, tokenizer, task.train_dataset(), [task.reward_func()], args, SDPOConfig()


def format_report(report: dict) -> str:
    """The report as a two-column table, then the verdict and its reason."""

    def number(value) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    def edge(entry: dict) -> str:
        if entry["edge"] is None:
            return "- (no such teacher prompt)"
        e = entry["edge"]
        return (
            f"{e['value']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}]  teacher {entry['teacher_pass_rate']:.3f} vs "
            f"student {entry['student_pass_rate']:.3f}, {entry['failures']} failures on {entry['prompts']} prompts"
        )

    rows = [
        ("prompts x completions", f"{report['prompts']} x {report['num_generations']}"),
        ("student pass rate", number(report["student_pass_rate"])),
        ("student mean reward", number(report["student_mean_reward"])),
        (
            "groups: none / some / all succeed",
            " / ".join(
                number(report[k])
                for k in ("groups_without_success", "groups_with_some_success", "groups_all_successful")
            ),
        ),
        ("GRPO signal (non-zero advantage)", number(report["grpo_signal_fraction"])),
        (
            "signal: demo / feedback / both / none",
            " / ".join(
                number(report[k])
                for k in ("demonstration_only", "feedback_only", "demonstration_and_feedback", "no_signal")
            ),
        ),
        ("failed completions with a signal", number(report["failed_with_signal"])),
        ("teacher edge (all)", edge(report["edge"])),
        ("  with a demonstration", edge(report["edge_demonstration"])),
        ("  feedback only", edge(report["edge_feedback_only"])),
        ("log-prob gain of the success (nats/token)", number(report["log_prob_gain"])),
        ("divergence on the first 3 tokens", number(report["frame_share"])),
        ("step cost vs GRPO (estimate)", number(report["step_cost_vs_grpo"])),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    settings = ", ".join(f"{k}={v!r}" for k, v in report["recommended_config"].items()) or "as given"
    lines += ["", f"Verdict: {report['verdict']} (SDPOConfig: {settings})", f"Why: {report['reason']}"]
    return "\n".join(lines)
