"""Where the demo's training step spends its time and memory: CPU seconds and peak resident memory per phase.

Builds the trainer exactly as `sdpo-rl demo` does (`sdpo_rl.apps.demo.demo_grpo_config`, the demo's options after `--`),
or with `--learning METHOD` as `learning.py` does for that method (its settings and batch, on the task that
`learning_step_time.py` times), trains `--steps` steps after one warm-up step, and times each phase of a step:
generation, rewards, teacher prompts, the GRPO forward (GRPO, and the hybrid of a model without a plain linear
head), the hybrid's one forward for both terms (student, teacher and the shared head pass), the distillation forward
(student and teacher), backward, the optimizer step and the teacher update. CPU seconds (`time.process_time`, all
threads of the process) do not grow when other programs share the cores, so they compare runs on a busy machine;
with `--threads 1` they are also the wall time of an idle core. A phase's peak is the process's resident high-water
mark during it (reset at its start).

    python benchmarks/step_profile.py                                   # the demo's defaults, 1 thread
    python benchmarks/step_profile.py --steps 2 -- --grpo-weight 1      # GRPO only, options as for sdpo-rl demo
    python benchmarks/step_profile.py --learning sdpo                   # learning.py's sdpo, on its settings
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning  # noqa: E402
from harness import step_clock  # noqa: E402
from learning_step_time import FULL as LEARNING_STEP  # noqa: E402  (the task learning_step_time.py times)

PHASES = (  # (module, class, method, label); a method a version lacks is reported as absent
    ("trl", "GRPOTrainer", "_generate", "generation"),
    ("sdpo_rl.trainer", "SDPOTrainer", "_calculate_rewards", "rewards"),
    ("sdpo_rl.teacher_batch", "TeacherBatchBuilder", "build", "teacher prompts"),
    ("trl", "GRPOTrainer", "_get_per_token_logps_and_entropies", "GRPO forward"),
    ("sdpo_rl.cpu_fast_path", "CPUFastPath", "_get_per_token_logps_and_entropies", "GRPO forward"),
    ("sdpo_rl.hybrid", "HybridLoss", "_one_pass_hybrid", "hybrid forward"),
    ("sdpo_rl.distillation", "DistillationStep", "_self_distillation_loss", "distillation forward"),
    ("accelerate", "Accelerator", "backward", "backward"),
    ("accelerate.optimizer", "AcceleratedOptimizer", "step", "optimizer step"),
    ("sdpo_rl.trainer", "SDPOTrainer", "_update_teacher", "teacher update"),
)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5" resets VmHWM to the current resident size
        clear_refs.write("5")


class PhaseTimer:
    """Wraps the phase methods; outermost calls only, so a phase that calls another is not counted twice."""

    def __init__(self):
        self.cpu = collections.Counter()
        self.peak = collections.Counter()
        self.absent = []
        self._inside = False

    def install(self) -> None:
        import importlib

        for module, cls_name, method, label in PHASES:
            cls = getattr(importlib.import_module(module), cls_name)
            if not hasattr(cls, method):
                self.absent.append(label)
                continue
            setattr(cls, method, self._wrap(getattr(cls, method), label))

    def _wrap(self, function, label):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._inside:
                return function(*args, **kwargs)
            self._inside = True
            _reset_peak()
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.cpu[label] += time.process_time() - start
                self.peak[label] = max(self.peak[label], _status_mib("VmHWM"))
                self._inside = False

        return timed

    def reset(self) -> None:
        self.cpu.clear()
        self.peak.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--learning", metavar="METHOD", help="profile a method of learning.py on its settings instead of the demo"
    )
    parser.add_argument("demo_options", nargs="*", help="options of `sdpo-rl demo`, after --")
    options = parser.parse_args(argv)
    if options.learning and options.demo_options:
        parser.error("--learning profiles learning.py's settings: give no demo options with it")
    if options.learning and options.learning not in learning.METHODS:
        parser.error(
            f"--learning={options.learning!r} is not a method of learning.py; choose from {list(learning.METHODS)}"
        )

    import torch

    from sdpo_rl import cli
    from sdpo_rl.apps.demo import build_demo_trainer
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.models import load_default_model

    output_dir = "/tmp/sdpo-rl-step-profile"
    args = cli.build_parser().parse_args(
        ["demo", f"--max-steps={options.steps + 1}", f"--output-dir={output_dir}", *options.demo_options]
    )
    torch.set_num_threads(options.threads)
    timer = PhaseTimer()
    timer.install()
    task_name = LEARNING_STEP["task"] if options.learning else args.task
    task = get_task(task_name)
    model, tokenizer = load_default_model()
    if options.learning:
        size = {**learning.FULL, "steps": options.steps + 1}
        trainer = learning.make_trainer(options.learning, task, model, tokenizer, output_dir, size, 0, [])
        shown = f"learning.py's {options.learning} on {task_name}"
    else:
        trainer = build_demo_trainer(args, model, tokenizer, task, use_cuda=False)
        shown = " ".join(options.demo_options) or "the demo's defaults"
    clock = step_clock(after_step=lambda state: timer.reset() if state.global_step == 1 else None)  # warm-up
    trainer.add_callback(clock)
    trainer.train()

    timed = clock.cpu[1:]
    per_step = sum(timed) / len(timed)
    print(f"{len(timed)} steps after a warm-up, {options.threads} thread(s), {shown}")
    print("| phase | CPU s per step | peak resident MiB |\n|---|---|---|")
    for label in dict.fromkeys(phase[3] for phase in PHASES):
        if label in timer.absent:
            print(f"| {label} | absent | |")
        elif label in timer.cpu:
            print(f"| {label} | {timer.cpu[label] / len(timed):.2f} | {timer.peak[label]:.0f} |")
    print(f"| other | {per_step - sum(timer.cpu.values()) / len(timed):.2f} | |")
    print(f"| **step** | **{per_step:.2f}** | **{max(timer.peak.values()):.0f}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
