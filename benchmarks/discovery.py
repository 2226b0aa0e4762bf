"""Test-time self-distillation: attempts to the first success, SDPO vs best-of-k vs multi-turn, on hard problems.

Every (method, problem, seed) run searches one problem with the embedded SmolLM2-135M-Instruct on CPU, within a
budget of attempts (`sdpo_rl.solve`), and records the number of the first successful attempt (null when unsolved).
The problems are easy questions under a strict form constraint that the model rarely meets (measured pass@1 at most
5%, `--pass-at-1`); the verifier's feedback says what was wrong with the form, never the answer. Each finished run
is appended to the results JSON at once, and a rerun skips the runs already there.

    python benchmarks/discovery.py                  # the full benchmark: every problem x 3 seeds x 3 methods
    python benchmarks/discovery.py --pass-at-1      # measure every candidate's pass@1 (stored in the JSON)
    python benchmarks/discovery.py --quick          # a smoke run (CI): one problem, a small budget, separate output
    python benchmarks/discovery.py --plot-only      # redraw the discovery@k plot from the results JSON

Runs execute in `--jobs` worker processes with one thread each.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load_results, provenance, run_in_workers, save_plot, save_results  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("sdpo", "best_of_k", "multi_turn")
FULL = dict(budget=128, attempts_per_round=8, max_completion_length=24, seeds=(0, 1, 2))
QUICK = dict(budget=8, attempts_per_round=4, max_completion_length=8, seeds=(0,))
PASS_AT_1 = dict(samples=64, seed=12345)  # a seed no run uses
SDPO = dict(learning_rate=1e-5)


# ---- problems ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constraint:
    """A form constraint: the instruction added to the question, and the feedback on an answer ("" = accepted)."""

    instruction: str
    check: str  # name of the check in CHECKS


def _words(text: str) -> list[str]:
    from sdpo_rl.apps.tasks import _WORD

    return _WORD.findall(text)


def _exactly(count: int):
    def feedback(text: str) -> str:
        found = len(_words(text))
        if found == count:
            return ""
        return f"Not accepted: the answer has {found} words, but it must have exactly {count}."

    return feedback


def _one_lowercase_word(text: str) -> str:
    words = _words(text)
    problems = []
    if len(words) != 1:
        problems.append(f"it has {len(words)} words instead of one")
    if any(c.isupper() for c in text):
        problems.append("it contains uppercase letters")
    if any(not (c.isalpha() or c.isspace() or c in ".!") for c in text.strip()):
        problems.append("it contains characters other than letters")
    return "Not accepted: " + "; ".join(problems) + "." if problems else ""


CHECKS = {"exactly_5": _exactly(5), "exactly_3": _exactly(3), "one_lowercase_word": _one_lowercase_word}
CONSTRAINTS = {
    "exactly_5": Constraint("Answer in exactly five words.", "exactly_5"),
    "exactly_3": Constraint("Answer in exactly three words.", "exactly_3"),
    "one_lowercase_word": Constraint(
        "Answer with a single word, written in lowercase letters only.", "one_lowercase_word"
    ),
}
QUESTIONS = [
    "What color is the sky?",
    "What do bees make?",
    "Which animal says moo?",
    "What is frozen water called?",
    "Where do fish live?",
    "What is the largest planet?",
    "What do you call a baby cat?",
    "What do chickens lay?",
    "What is the opposite of hot?",
    "How many legs does a spider have?",
    "What do cows drink?",
    "Which season comes after winter?",
    "What do we call a young dog?",
    "What shape is a ball?",
    "Which star is closest to Earth?",
    "What do plants need to grow?",
]
# Every (question, constraint) pair; `--pass-at-1` measures them, and the benchmark searches PROBLEMS.
CANDIDATES = {
    f"q{question}-{constraint}": (question, constraint)
    for question in range(len(QUESTIONS))
    for constraint in CONSTRAINTS
}
# The candidates whose measured pass@1 is at most 5% (at most 3 successes in 64 samples at temperature 1.0, with
# `--pass-at-1`'s seed, which no search run uses; results/discovery.json's "pass_at_1").
PROBLEMS = (
    "q0-exactly_3",
    "q0-one_lowercase_word",
    "q10-one_lowercase_word",
    "q12-exactly_3",
    "q12-exactly_5",
    "q13-exactly_3",
    "q13-exactly_5",
    "q14-exactly_3",
    "q14-exactly_5",
    "q15-exactly_5",
    "q15-one_lowercase_word",
    "q2-exactly_5",
    "q5-one_lowercase_word",
    "q7-exactly_5",
)


def problem_prompt(name: str) -> str:
    question, constraint = CANDIDATES[name]
    return f"{QUESTIONS[question]} {CONSTRAINTS[constraint].instruction}"


class FormReward:
    """Reward 1 for an answer that meets the problem's constraint, else 0 with feedback on its form."""

    def __init__(self, problem: str):
        self.feedback = CHECKS[CONSTRAINTS[CANDIDATES[problem][1]].check]
        self.__name__ = "form_reward"

    def __call__(self, completions, **kwargs):
        from sdpo_rl import Scored

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [Scored(0.0, message) if message else Scored(1.0) for message in map(self.feedback, texts)]


# ---- runs ----------------------------------------------------------------------------------------------------------


def run_one(method: str, problem: str, seed: int, size: dict) -> dict:
    """Search one problem with one method and seed; the record for the results JSON."""
    import torch

    torch.set_num_threads(1)
    from sdpo_rl import solving as search
    from sdpo_rl.models import load_default_model

    model, tokenizer = load_default_model()
    options = dict(
        max_attempts=size["budget"],
        attempts_per_round=size["attempts_per_round"],
        max_completion_length=size["max_completion_length"],
        seed=seed,
        progress=False,
    )
    if method == "sdpo":
        options.update(SDPO)
    function = {"sdpo": search.solve, "best_of_k": search.best_of_k, "multi_turn": search.multi_turn}[method]
    start = time.perf_counter()
    result = function(model, tokenizer, problem_prompt(problem), FormReward(problem), **options)
    return {
        "method": method,
        "problem": problem,
        "seed": seed,
        "budget": size["budget"],
        "attempts_to_solve": result.attempts if result.solved else None,
        "solution": result.solution,
        "steps": result.steps,
        "wall_seconds": time.perf_counter() - start,
        "losses": [r.loss for r in result.rounds],
        "config": {**{k: v for k, v in size.items() if k != "seeds"}, **(SDPO if method == "sdpo" else {})},
    }


def measure_pass_at_1(problem: str, samples: int, seed: int, max_completion_length: int) -> dict:
    """The base model's success rate on a problem (`samples` completions at temperature 1), and its success rate
    when it reads the teacher's prompt for one of those failures (the problem, the failure's feedback, "Correctly
    solve the original question."): how much the model makes of the feedback in context, without any training."""
    import torch

    torch.set_num_threads(1)
    from sdpo_rl import SDPOConfig
    from sdpo_rl.evaluation import sample_completions
    from sdpo_rl.models import load_default_model
    from sdpo_rl.reprompt import TeacherSignal, build_reprompt_text

    model, tokenizer = load_default_model()
    feedback, config, prompt = FormReward(problem).feedback, SDPOConfig(), problem_prompt(problem)

    def sample(prompts: list[str], per_prompt: int) -> list[str]:
        groups = sample_completions(
            model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], samples_per_prompt=per_prompt,
            temperature=1.0, max_new_tokens=max_completion_length, seed=seed,
        )  # fmt: skip
        return [text for group in groups for text, _ in group]

    texts = sample([prompt], samples)
    messages = [feedback(text) for text in texts if feedback(text)]
    settings = config.template_settings()
    reprompts = [build_reprompt_text(prompt, TeacherSignal(None, m, None), settings) for m in messages]
    retried = sample(reprompts, 1) if reprompts else []
    successes, retried_successes = samples - len(messages), sum(feedback(text) == "" for text in retried)
    return {
        "problem": problem,
        "samples": samples,
        "successes": successes,
        "pass_at_1": successes / samples,
        "retries_with_feedback": len(retried),
        "retry_successes": retried_successes,
        "pass_at_1_with_feedback": retried_successes / len(retried) if retried else None,
    }


# ---- results -------------------------------------------------------------------------------------------------------


def discovery(runs: list[dict], budget: int) -> list[float]:
    """discovery@k for k = 1..budget: the fraction of runs solved within k attempts."""
    solved = [r["attempts_to_solve"] for r in runs]
    return [sum(a is not None and a <= k for a in solved) / len(runs) for k in range(1, budget + 1)]


def benchmark_runs(results: dict, problems: list[str], budget: int) -> dict[str, list[dict]]:
    """The runs of each method on these problems at this budget (other runs in the file, e.g. a pilot's, are not
    counted)."""
    return {
        method: [
            r for r in results["runs"] if r["method"] == method and r["problem"] in problems and r["budget"] == budget
        ]
        for method in METHODS
    }


def attempts_to_reach(curve: list[float], target: float) -> int | None:
    """The least k whose discovery@k is at least `target` (None if the curve never gets there)."""
    return next((k for k, value in enumerate(curve, start=1) if value >= target - 1e-12), None)


def goal_margin_interval(
    sdpo: list[dict], best_of_k: list[dict], budget: int, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A 95% percentile bootstrap interval of sdpo's discovery@(budget/2) minus best_of_k's discovery@budget,
    resampling problems (each with all its seeds), since runs on one problem are not independent."""
    import random

    by_problem = {}
    for method, method_runs in (("sdpo", sdpo), ("best_of_k", best_of_k)):
        for run in method_runs:
            by_problem.setdefault(run["problem"], {"sdpo": [], "best_of_k": []})[method].append(run)
    problems = sorted(by_problem)
    generator = random.Random(seed)
    margins = []
    for _ in range(resamples):
        drawn = [by_problem[generator.choice(problems)] for _ in problems]
        ours = [r for runs in drawn for r in runs["sdpo"]]
        theirs = [r for runs in drawn for r in runs["best_of_k"]]
        if ours and theirs:
            margins.append(discovery(ours, budget)[budget // 2 - 1] - discovery(theirs, budget)[-1])
    margins.sort()
    return margins[int(0.025 * (len(margins) - 1))], margins[int(0.975 * (len(margins) - 1))]


def _after_first_round(runs: dict[str, list[dict]], budget: int, first_round: int, checkpoints: list[int]) -> list:
    """Table lines: per method, the runs not solved in the first round, and the fraction of them solved within k."""
    lines = [
        "",
        f"Runs not solved within the first round ({first_round} attempts of the unchanged model):",
        "",
        f"| method | runs left | {' | '.join(f'solved within {k}' for k in checkpoints)} |",
        "|---|---|" + "---|" * len(checkpoints),
    ]
    for method, method_runs in runs.items():
        left = [r for r in method_runs if r["attempts_to_solve"] is None or r["attempts_to_solve"] > first_round]
        if left:
            curve = discovery(left, budget)
            lines.append(f"| {method} | {len(left)} | " + " | ".join(f"{curve[k - 1]:.2f}" for k in checkpoints) + " |")
    return lines


def summarise(runs: dict[str, list[dict]], budget: int, pass_at_1: dict, first_round: int) -> str:
    """Markdown: discovery@k per method, the attempts each method needs for best-of-k's discovery@budget (the goal:
    SDPO within half the budget), discovery of the runs the first round left unsolved (the first `first_round`
    attempts sample the unchanged model in every method; only later rounds can differ), and the attempts to solve per
    problem and seed."""
    checkpoints = sorted({k for k in (8, 16, 32, 64, 128) if k <= budget} | {budget})
    lines = [
        f"| method | runs | solved | {' | '.join(f'discovery@{k}' for k in checkpoints)} | wall s / run |",
        "|---|---|---|" + "---|" * len(checkpoints) + "---|",
    ]
    curves = {}
    for method, method_runs in runs.items():
        if not method_runs:
            continue
        curves[method] = curve = discovery(method_runs, budget)
        solved = sum(r["attempts_to_solve"] is not None for r in method_runs)
        wall = sum(r["wall_seconds"] for r in method_runs) / len(method_runs)
        at = " | ".join(f"{curve[k - 1]:.2f}" for k in checkpoints)
        lines.append(f"| {method} | {len(method_runs)} | {solved} | {at} | {wall:.0f} |")
    if "best_of_k" in curves:
        target = curves["best_of_k"][-1]
        lines.append("")
        lines.append(f"best_of_k's discovery@{budget} = {target:.2f}; attempts each method needs to reach it:")
        for method, curve in curves.items():
            needed = attempts_to_reach(curve, target)
            verdict = f"{needed}" if needed is not None else f"not within {budget}"
            lines.append(f"- {method}: {verdict}" + (f" (goal: at most {budget // 2})" if method == "sdpo" else ""))
        if "sdpo" in curves:
            low, high = goal_margin_interval(runs["sdpo"], runs["best_of_k"], budget)
            margin = curves["sdpo"][budget // 2 - 1] - target
            lines.append(
                f"- sdpo's discovery@{budget // 2} minus best_of_k's discovery@{budget}: {margin:+.2f} (95% bootstrap "
                f"interval over problems {low:+.2f} to {high:+.2f}; the goal holds where this is at least 0)"
            )
    lines += _after_first_round(runs, budget, first_round, [k for k in checkpoints if k > first_round])
    problems = sorted({r["problem"] for method_runs in runs.values() for r in method_runs})
    lines += ["", "| problem | pass@1 | " + " | ".join(curves) + " |", "|---|---|" + "---|" * len(curves)]
    for problem in problems:
        cells = []
        for method in curves:
            attempts = sorted(
                ((r["seed"], r["attempts_to_solve"]) for r in runs[method] if r["problem"] == problem),
            )
            cells.append(" ".join("-" if a is None else str(a) for _, a in attempts))
        measured = pass_at_1.get(problem)
        rate = f"{measured['successes']}/{measured['samples']}" if measured else "?"
        lines.append(f"| {problem} | {rate} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path, *, budget: int) -> None:
    """discovery@k per method (fraction of problem x seed runs solved within k attempts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method, method_runs in runs.items():
        if method_runs:
            problems = len({r["problem"] for r in method_runs})
            axis.step(
                range(1, budget + 1),
                discovery(method_runs, budget),
                where="post",
                label=f"{method} ({problems} problems, {len(method_runs)} runs)",
            )
    axis.set_xscale("log", base=2)
    axis.set_xlabel("attempts k")
    axis.set_ylabel("discovery@k (fraction of runs solved)")
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title("SmolLM2-135M-Instruct, one hard problem at a time (CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one problem, a budget of 8, one seed")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--problems", nargs="+", choices=sorted(CANDIDATES), help="default: PROBLEMS (every candidate with --pass-at-1)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    parser.add_argument("--results", type=Path, help="results JSON (default: benchmarks/results/discovery.json)")
    parser.add_argument("--pass-at-1", action="store_true", help="measure each problem's pass@1 instead of searching")
    parser.add_argument("--plot-only", action="store_true", help="only redraw the plot and print the table")
    options = parser.parse_args(argv)

    size = QUICK if options.quick else FULL
    default = sorted(CANDIDATES) if options.pass_at_1 else sorted(PROBLEMS)
    problems = options.problems or (default[:1] if options.quick else default)
    results_path = options.results or RESULTS_DIR / ("discovery_quick.json" if options.quick else "discovery.json")
    results = load_results(results_path, runs=[], pass_at_1={})
    seeds = options.seeds if options.seeds is not None else list(size["seeds"])
    if options.pass_at_1:
        todo = [p for p in problems if p not in results["pass_at_1"]]
        jobs = [
            (measure_pass_at_1, (p, PASS_AT_1["samples"], PASS_AT_1["seed"], size["max_completion_length"]))
            for p in todo
        ]
    elif options.plot_only:
        jobs = []
    else:
        done = {(r["method"], r["problem"], r["seed"], r["budget"]) for r in results["runs"]}
        todo = [
            (m, p, s) for s in seeds for p in problems for m in options.methods if (m, p, s, size["budget"]) not in done
        ]
        jobs = [(run_one, (m, p, s, size)) for m, p, s in todo]

    def record(arguments: tuple, result: dict) -> None:
        nonlocal results
        results = load_results(results_path, runs=[], pass_at_1={})
        if options.pass_at_1:
            results["pass_at_1"][result["problem"]] = result
        else:
            results["runs"].append(result)
        results.update(provenance(__file__, sys.argv[1:] if argv is None else argv))  # of the latest job
        save_results(results_path, results)
        shown = {k: result[k] for k in ("attempts_to_solve", "pass_at_1", "wall_seconds") if k in result}
        print(f"finished {arguments[:3]}: {shown}", flush=True)

    failed = []
    if jobs:
        print(f"{len(jobs)} jobs to do ({results_path})", flush=True)
        failed = run_in_workers(jobs, options.jobs, record)

    for name, record in sorted(results["pass_at_1"].items()):
        print(
            f"pass@1 {name}: {record['successes']}/{record['samples']}; after reading a failure's feedback: "
            f"{record['retry_successes']}/{record['retries_with_feedback']}"
        )
    if failed:
        print(f"{len(failed)} jobs failed: {[job[:3] for job in failed]}; rerun to retry them", file=sys.stderr)
    runs = benchmark_runs(results, problems, size["budget"])
    if not any(runs.values()):
        return 0 if options.pass_at_1 and not failed else 1
    print(summarise(runs, size["budget"], results["pass_at_1"], size["attempts_per_round"]))
    save_plot(functools.partial(plot, budget=size["budget"]), runs, results_path.with_suffix(".png"))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
