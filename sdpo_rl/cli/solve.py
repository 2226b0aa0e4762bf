"""`sdpo-rl solve`: search for a solution to one problem with SDPO at test time, or with a baseline.

    sdpo-rl solve --task short_answer --index 3 [--method sdpo|best_of_k|multi_turn] [--max-attempts 64]
    sdpo-rl solve --prompt "..." --reward my_rewards:check [--column tests='[...]'] [...]

The problem is a row of a built-in task (`sdpo_rl.apps.tasks`, its training rows then its held-out rows, numbered from
0), or a prompt given here with a reward function named by import path (as in `sdpo-rl train`) and the dataset
columns it reads. The model is the embedded SmolLM2-135M-Instruct unless `--model` names another. Prints the first
successful completion and how many attempts it took; exits with 0 when solved, 1 when not (docs/test-time.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..apps.tasks import TASKS
from .common import command_parser

METHODS = ("sdpo", "best_of_k", "multi_turn")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sdpo-rl solve` on the `sdpo-rl` command's subparsers."""
    parser = command_parser(
        subparsers,
        "solve",
        __doc__,
        help="search for a solution to one problem, learning from failed attempts with SDPO (test time)",
    )
    problem = parser.add_argument_group("the problem: --task and --index, or --prompt and --reward")
    problem.add_argument("--task", help=f"a built-in task (sdpo_rl.apps.tasks): {', '.join(TASKS)}")
    problem.add_argument("--index", type=int, help="row of the task: its training rows, then its held-out rows")
    problem.add_argument("--prompt", help="the problem, as the user message")
    problem.add_argument("--reward", help="reward function by import path, e.g. my_rewards:check")
    problem.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a dataset column the reward reads, as JSON (a plain string if not JSON); repeatable",
    )
    parser.add_argument("--method", choices=METHODS, default="sdpo", help="search method")
    parser.add_argument("--max-attempts", type=int, default=64, help="attempt budget")
    parser.add_argument("--attempts-per-round", type=int, default=8, help="attempts sampled per round")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling and training")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of the SDPO steps (default: solve's)")
    parser.add_argument("--max-completion-length", type=int, default=64, help="tokens per attempt")
    parser.add_argument("--model", default=None, help="model path or name (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def problem_from_args(args: argparse.Namespace) -> tuple[list[dict], Any, dict[str, Any]]:
    """(prompt messages, reward function, columns) of the problem the arguments name; `ValueError` if they do not."""
    if args.task is not None:
        if args.prompt is not None or args.reward is not None or args.column:
            raise ValueError("give either --task and --index, or --prompt and --reward (with --column), not both")
        from ..apps.tasks import get_task

        task = get_task(args.task)
        rows = [row for part in task.rows() for row in part]
        if args.index is None or not 0 <= args.index < len(rows):
            raise ValueError(f"--index must be between 0 and {len(rows) - 1} for --task {task.name}, got {args.index}")
        row = rows[args.index]
        return row["prompt"], task.reward_func(), {k: v for k, v in row.items() if k != "prompt"}
    if args.prompt is None or args.reward is None:
        raise ValueError("name the problem: --task NAME --index I, or --prompt TEXT --reward module:function")
    if args.index is not None:
        raise ValueError("--index selects a row of --task; with --prompt, leave it out")
    from .train import load_reward_function
    from .train_config import ConfigError

    try:
        reward = load_reward_function(args.reward)
    except ConfigError as error:
        raise ValueError(str(error).replace("reward_funcs entry", "--reward")) from None
    return [{"role": "user", "content": args.prompt}], reward, parse_columns(args.column)


def parse_columns(items: list[str]) -> dict[str, Any]:
    """`NAME=JSON` items as a dict; a value that is not JSON is kept as a string."""
    columns = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ValueError(f"--column {item!r} is not NAME=VALUE, e.g. --column tests='[\"assert f(1) == 2\"]'")
        try:
            columns[name] = json.loads(value)
        except json.JSONDecodeError:
            columns[name] = value
    return columns


def run(args: argparse.Namespace) -> int:
    from .. import solving as search

    try:
        messages, reward, columns = problem_from_args(args)
        search.check_budget(
            args.max_attempts,
            args.attempts_per_round,
            2 if args.method == "sdpo" else 1,
            names=("--max-attempts", "--attempts-per-round"),
        )
        if args.lr is not None and args.method != "sdpo":
            raise ValueError(f"--lr sets the learning rate of SDPO's steps; --method {args.method} takes none")
    except ValueError as error:
        print(f"sdpo-rl solve: error: {error}", file=sys.stderr)
        return 2
    import torch

    from ..models import load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if torch.cuda.is_available():
        model.to("cuda")
    options = dict(
        max_attempts=args.max_attempts,
        attempts_per_round=args.attempts_per_round,
        seed=args.seed,
        progress=not args.no_progress,
        columns=columns,
        max_completion_length=args.max_completion_length,
    )
    if args.lr is not None:
        options["learning_rate"] = args.lr
    method = {"sdpo": search.solve, "best_of_k": search.best_of_k, "multi_turn": search.multi_turn}[args.method]
    print(f"Problem: {messages[-1]['content']}", flush=True)
    result = method(model, tokenizer, messages, reward, **options)
    if result.solved:
        print(f"Solved by {result.method} in {result.attempts} of {result.max_attempts} attempts:\n{result.solution}")
        return 0
    print(f"Not solved by {result.method} in {result.attempts} attempts (best reward {result.best_reward:.3g}).")
    return 1
