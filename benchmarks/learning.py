"""Does it learn, and does it collapse? SDPO vs GRPO vs the hybrid on SmolLM2-135M-Instruct, on CPU, several seeds.

Every (method, task, seed) run trains the embedded SmolLM2-135M-Instruct from the same GRPOConfig and evaluates
held-out accuracy (several samples per prompt, fixed sampling settings and seed) every `--eval-every` steps,
step 0 included. Each finished run is appended to the results JSON at once, and a rerun skips the runs already
there, so the full benchmark can be completed over several interrupted invocations.

    python benchmarks/learning.py                 # the full benchmark (see benchmarks/README.md for its size)
    python benchmarks/learning.py --quick         # a smoke run (CI): one step, tiny evaluation, separate output
    python benchmarks/learning.py --plot-only     # redraw the plot from the results JSON

Runs execute in `--jobs` worker processes with one thread each (two processes of two threads on two cores are
several times slower than two of one).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load_results, provenance, run_in_workers, save_plot, save_results  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = {
    # name: SDPOConfig keyword arguments (the GRPOConfig is the same for every method)
    "grpo": {"enabled": False},
    "sdpo": {},
    "hybrid": {"grpo_weight": 0.5},
    "hybrid_0.8": {"grpo_weight": 0.8},
    "srpo": {"sample_routing": True, "teacher_entropy_weighting": 1.0},
    "srpo_plain": {"sample_routing": True},
    "sc_sdpo": {"pass_rate_weighting": True},
    "contrast": {"hindsight_contrast": 1.0},
}
# The methods of the 30-step benchmark (`hybrid` was measured in the 10-step one and is not rerun by default).
DEFAULT_METHODS = ("grpo", "sdpo", "hybrid_0.8", "srpo", "srpo_plain", "sc_sdpo", "contrast")
# The default tasks, answer-checked (`--tasks` takes any of sdpo_rl.apps.tasks.TASKS; the committed runs on `*_form`
# tasks were measured when those were called `short_answer` and `one_word`).
TASKS = ("capitals", "short_answer", "one_word")
FULL = dict(steps=30, eval_every=5, seeds=(0, 1, 2), heldout_rows=None, samples_per_prompt=4, batch=16)
QUICK = dict(steps=1, eval_every=1, seeds=(0,), heldout_rows=4, samples_per_prompt=1, batch=8)
SHARED = dict(learning_rate=2e-5, num_generations=4, max_completion_length=24, temperature=1.0)
EVAL = dict(temperature=0.7, max_new_tokens=24)


def make_trainer(method, task, model, tokenizer, output_dir: str, size: dict, seed: int, callbacks: list):
    """The benchmark's `SDPOTrainer` for `method` on `task`: `SHARED` settings, `size`'s batch and steps, one process
    on the CPU, no gradient checkpointing, nothing saved."""
    from trl import GRPOConfig

    from sdpo_rl import SDPOConfig, SDPOTrainer

    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=size["batch"],
        max_steps=size["steps"],
        beta=0.0,
        seed=seed,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **SHARED,
    )
    return SDPOTrainer(
        model=model,
        args=args,
        sdpo_config=SDPOConfig(**METHODS[method]),
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
        callbacks=callbacks,
    )


def run_one(method: str, task_name: str, seed: int, size: dict, output_dir: str) -> dict:
    """Train one (method, task, seed) and return its record for the results JSON."""
    import torch

    torch.set_num_threads(1)
    from transformers import TrainerCallback

    from sdpo_rl import metrics as m
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.evaluation import heldout_accuracy
    from sdpo_rl.models import load_default_model

    task = get_task(task_name)
    heldout = task.heldout_dataset()
    if size["heldout_rows"]:
        heldout = heldout.select(range(size["heldout_rows"]))
    model, tokenizer = load_default_model()
    curve = {"eval_steps": [], "heldout_accuracy": [], "mean_completion_length": []}

    def evaluate(step: int) -> None:
        result = heldout_accuracy(
            model, tokenizer, heldout, task, samples_per_prompt=size["samples_per_prompt"], seed=1234, **EVAL
        )
        curve["eval_steps"].append(step)
        curve["heldout_accuracy"].append(result["accuracy"])
        curve["mean_completion_length"].append(result["mean_completion_length"])
        print(f"[{method}/{task_name}/seed {seed}] step {step}: held-out accuracy {result['accuracy']:.3f}", flush=True)

    class EvaluateEvery(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % size["eval_every"] == 0:
                evaluate(state.global_step)

    evaluate(0)
    trainer = make_trainer(method, task, model, tokenizer, output_dir, size, seed, [EvaluateEvery()])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    history = [entry for entry in trainer.state.log_history if m.REWARD in entry]
    logged = (
        m.REWARD,
        m.ENTROPY,
        m.COMPLETION_LENGTH,
        m.DISTILLATION_LOSS,
        m.GRPO_LOSS,
        m.REPROMPT_SAMPLE_FRACTION,
        m.SUCCESS_SAMPLE_FRACTION,
        m.FEEDBACK_USED_FRACTION,
        m.STUDENT_ENTROPY,
        m.TEACHER_ENTROPY,
        m.ROUTED_SDPO_FRACTION,
    )
    return {
        "method": method,
        "task": task_name,
        "seed": seed,
        **curve,
        "wall_seconds": wall,
        "seconds_per_step": statistics.median(entry[m.STEP_TIME] for entry in history if m.STEP_TIME in entry),
        "train_metrics": {name: [entry.get(name) for entry in history] for name in logged},
        "config": {
            "grpo": {**SHARED, "per_device_train_batch_size": size["batch"], "max_steps": size["steps"]},
            "sdpo": METHODS[method],
            "eval": {**EVAL, "samples_per_prompt": size["samples_per_prompt"]},
        },
    }


def _by_task_and_method(results: dict) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        groups.setdefault((run["task"], run["method"]), []).append(run)
    return dict(sorted(groups.items()))


def _mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.mean(r["heldout_accuracy"][i] for r in runs) for i in range(len(runs[0]["eval_steps"]))]


def method_rows(results: dict) -> list[dict]:
    """Per (task, method), the issue's report: start and final held-out accuracy over seeds, the worst seed's change,
    the first evaluation step at which the mean curve reaches GRPO's mean final accuracy, length and s/step."""
    groups = _by_task_and_method(results)
    rows = []
    for (task, method), runs in groups.items():
        final = [r["heldout_accuracy"][-1] for r in runs]
        grpo = groups.get((task, "grpo"))
        grpo_final = statistics.mean(r["heldout_accuracy"][-1] for r in grpo) if grpo else None
        reached = None
        if grpo_final is not None:
            curve = zip(runs[0]["eval_steps"], _mean_curve(runs), strict=True)
            reached = next((step for step, accuracy in curve if accuracy >= grpo_final - 1e-9), None)
        rows.append(
            dict(
                task=task,
                method=method,
                seeds=len(runs),
                start=statistics.mean(r["heldout_accuracy"][0] for r in runs),
                final=statistics.mean(final),
                final_std=statistics.stdev(final) if len(final) > 1 else 0.0,
                worst_change=min(r["heldout_accuracy"][-1] - r["heldout_accuracy"][0] for r in runs),
                grpo_final=grpo_final,
                reaches_grpo_final_at=reached,
                final_length=statistics.mean(r["mean_completion_length"][-1] for r in runs),
                seconds_per_step=statistics.median(r["seconds_per_step"] for r in runs),
            )
        )
    return rows


def summarise(results: dict) -> str:
    """A Markdown table of `method_rows`."""
    lines = [
        "| task | method | seeds | step-0 accuracy | final accuracy | final − step 0, worst seed "
        "| reaches GRPO's final at step | final length | median s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in method_rows(results):
        reached = "-" if row["reaches_grpo_final_at"] is None else row["reaches_grpo_final_at"]
        lines.append(
            f"| {row['task']} | {row['method']} | {row['seeds']} | {100 * row['start']:.1f}% "
            f"| {100 * row['final']:.1f} ± {100 * row['final_std']:.1f}% | {100 * row['worst_change']:+.1f} pts "
            f"| {reached} | {row['final_length']:.1f} | {row['seconds_per_step']:.1f} |"
        )
    return "\n".join(lines)


# The training metrics the diagnosis table compares, by the name shown for each.
DIAGNOSED = {
    "reward": "reward",
    "length": "completions/mean_length",
    "student entropy": "self_distillation/student_entropy",
    "teacher entropy": "self_distillation/teacher_entropy",
    "distillation loss": "self_distillation/distillation_loss",
    "routed to SDPO": "self_distillation/routed_sdpo_fraction",
}


def diagnosis(results: dict, window: int = 5) -> str:
    """A Markdown table: each training metric's mean over the first and the last `window` steps (all seeds), per
    task and method, as "first → last" ("-" where the method does not log it)."""
    lines = ["| task | method | " + " | ".join(DIAGNOSED) + " |", "|---|---|" + "---|" * len(DIAGNOSED)]
    for (task, method), runs in _by_task_and_method(results).items():
        cells = []
        for key in DIAGNOSED.values():
            series = [[v for v in r["train_metrics"].get(key, []) if v is not None] for r in runs]
            first = [v for values in series for v in values[:window]]
            last = [v for values in series for v in values[-window:]]
            cells.append(f"{statistics.mean(first):.3g} → {statistics.mean(last):.3g}" if first and last else "-")
        lines.append(f"| {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_verdicts(results: dict) -> dict[str, dict]:
    """Per SDPO-family method, the issue's goal: mean final accuracy above GRPO's on at least 2 of the tasks run,
    no seed ending below its step-0 accuracy, and GRPO's final accuracy reached in fewer steps on at least one task.
    A method is judged only on the tasks where both it and GRPO ran."""
    rows = method_rows(results)
    grpo_steps = {r["task"]: r["reaches_grpo_final_at"] for r in rows if r["method"] == "grpo"}
    verdicts = {}
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "grpo"):
        mine = [r for r in rows if r["method"] == method and r["grpo_final"] is not None]
        above = [r["task"] for r in mine if r["final"] > r["grpo_final"]]
        never_below = all(r["worst_change"] >= 0 for r in mine)
        faster = [
            r["task"]
            for r in mine
            if r["reaches_grpo_final_at"] is not None and r["reaches_grpo_final_at"] < grpo_steps[r["task"]]
        ]
        verdicts[method] = dict(
            tasks=[r["task"] for r in mine],
            above_grpo=above,
            never_below_start=never_below,
            faster_than_grpo=faster,
            met=len(above) >= 2 and never_below and bool(faster),
        )
    return verdicts


def plot(results: dict, path: Path) -> None:
    """Held-out accuracy and answer length against steps: mean over seeds, shaded min-max spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results["runs"]})
    figure, axes = plt.subplots(2, len(tasks), figsize=(6 * len(tasks), 7), squeeze=False)
    for column, task in enumerate(tasks):
        for color, method in enumerate(METHODS):  # one colour per method in every panel
            runs = [r for r in results["runs"] if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            steps = runs[0]["eval_steps"]
            for row, key in enumerate(("heldout_accuracy", "mean_completion_length")):
                values = [[r[key][i] for r in runs] for i in range(len(steps))]
                mean = [statistics.mean(v) for v in values]
                axis = axes[row][column]
                (line,) = axis.plot(steps, mean, marker="o", color=f"C{color}", label=f"{method} ({len(runs)} seeds)")
                axis.fill_between(
                    steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color()
                )
                axis.set_xlabel("optimizer step")
                axis.set_ylabel("held-out accuracy" if row == 0 else "mean completion length (tokens)")
                axis.set_title(f"{task}")
                axis.grid(alpha=0.3)
        axes[0][column].legend()
    figure.suptitle("SmolLM2-135M-Instruct on CPU: mean over seeds, shaded min-max")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one step, tiny evaluation")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    from sdpo_rl.apps.tasks import TASKS as ALL_TASKS

    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(ALL_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    parser.add_argument("--results", type=Path, help="results JSON (default: benchmarks/results/...)")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot and print the table")
    options = parser.parse_args(argv)

    size = QUICK if options.quick else FULL
    name = "learning_curves_quick" if options.quick else "learning_curves"
    results_path = options.results or RESULTS_DIR / f"{name}.json"
    results = load_results(results_path, runs=[])
    seeds = options.seeds if options.seeds is not None else list(size["seeds"])
    done = {(r["method"], r["task"], r["seed"]) for r in results["runs"]}
    todo = [(m, t, s) for t in options.tasks for s in seeds for m in options.methods if (m, t, s) not in done]

    def record(run: tuple, result: dict) -> None:
        nonlocal results
        results = load_results(results_path, runs=[])
        results["runs"].append(result)
        results.update(provenance(__file__, sys.argv[1:] if argv is None else argv))  # of the latest run
        save_results(results_path, results)
        print(f"finished {run[:3]} in {result['wall_seconds']:.0f} s", flush=True)

    failed = []
    if not options.plot_only and todo:
        print(f"{len(todo)} runs to do ({len(done)} already in {results_path})", flush=True)
        work_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "sdpo-rl-learning"
        jobs = [(run_one, (m, t, s, size, str(work_dir / f"{m}-{t}-{s}"))) for m, t, s in todo]
        failed = run_in_workers(jobs, options.jobs, record)

    if not results["runs"]:
        print("no results yet", file=sys.stderr)
        return 1
    print(summarise(results))
    print(diagnosis(results))
    for method, verdict in goal_verdicts(results).items():
        print(
            f"goal, {method}: above GRPO on {verdict['above_grpo'] or 'no task'} of {verdict['tasks']}; never below "
            f"step 0: {verdict['never_below_start']}; faster on {verdict['faster_than_grpo'] or 'no task'}; "
            f"{'MET' if verdict['met'] else 'not met'}"
        )
    save_plot(plot, results, results_path.with_suffix(".png"))
    if failed:
        print(f"{len(failed)} runs failed: {[run[:3] for run in failed]}; rerun to retry them", file=sys.stderr)
    finite = all(not math.isnan(a) for r in results["runs"] for a in r["heldout_accuracy"])
    return 0 if finite and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
