"""Render docs/results.md's tables from benchmarks/results/*.json, so that no measured number is typed by hand.

docs/results.md marks each rendered block with `<!-- results:NAME -->` ... `<!-- /results -->`; NAME is a key of
`RENDERERS` and the block is replaced by what that renderer makes of the results JSON (each block starts with where
its numbers come from: command, date, commit, machine). Everything outside the markers is left as it is.

    python benchmarks/render_results.py           # rewrite docs/results.md after a benchmark replaced its JSON
    python benchmarks/render_results.py --check   # exit 1 if docs/results.md is not what the JSON files render
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import discovery  # noqa: E402
import learning  # noqa: E402
import learning_step_time  # noqa: E402
import loss_memory  # noqa: E402
import preflight  # noqa: E402
import step_time  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
BLOCK = re.compile(r"^(<!-- results:(?P<name>[\w.]+) -->\n)(?P<body>.*?)^(<!-- /results -->)", re.S | re.M)


def _load(results: Path, name: str) -> dict:
    return json.loads((results / f"{name}.json").read_text())


def _machine(machine: dict) -> str:
    threads = f", {machine['torch_threads']} torch thread(s)" if "torch_threads" in machine else ""
    return f"{machine['cpu']}, {machine['cores']} cores{threads}, torch {machine['torch']}"


def measured(report: dict) -> str:
    """Where the numbers below come from, from the report's own fields."""
    return (
        f"Measured {report['date']} at commit `{report.get('commit') or '?'}` ({_machine(report['machine'])}): "
        f"`{report['command']}` (`benchmarks/results/{report['_file']}`)."
    )


def _with_file(report: dict, name: str) -> dict:
    return {**report, "_file": f"{name}.json"}


def learning_table(results: Path, name: str) -> str:
    report = _with_file(_load(results, name), name)
    return f"{measured(report)}\n\n{learning.summarise(report)}"


def learning_per_seed(results: Path) -> str:
    """Final held-out accuracy of every seed, for the methods run with more than one."""
    report = _load(results, "learning_curves")
    lines = ["| task | method | final accuracy per seed |", "|---|---|---|"]
    for (task, method), runs in learning._by_task_and_method(report).items():
        if len(runs) > 1:
            runs = sorted(runs, key=lambda r: r["seed"])
            finals = " / ".join(f"{100 * r['heldout_accuracy'][-1]:.1f}%" for r in runs)
            lines.append(f"| {task} | {method} | {finals} (seeds {', '.join(str(r['seed']) for r in runs)}) |")
    return "\n".join(lines)


def learning_diagnosis(results: Path) -> str:
    return learning.diagnosis(_load(results, "learning_curves"))


def base_pass_rate(results: Path) -> str:
    """One table per run of the base-pass-rate script, newest first, each with its source and note."""
    blocks = []
    for run in reversed(_load(results, "base_pass_rate")["runs"]):
        report = _with_file(run, "base_pass_rate")
        lines = ["| task | prompts | temperature | pass rate | prompts with a pass |", "|---|---|---|---|---|"]
        for row in report["table"]:
            lines.append(
                f"| {row['task']} | {row['prompts']} {row['split']} | {row['temperature']} "
                f"| {100 * row['pass_rate']:.1f}% | {100 * row['prompts_with_a_pass']:.1f}% "
                f"({row['samples_per_prompt']} samples) |"
            )
        note = f" {report['note'][0].upper()}{report['note'][1:]}." if "note" in report else ""
        blocks.append(f"{measured(report)}{note}\n\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def diagnosis(results: Path) -> str:
    lines = [
        "| task | completions with a teacher signal | successful peer: teacher − student log-prob (nats) "
        "| JSD at positions 0 / 1 / last | student / teacher entropy (nats) | tokens the teacher promotes most at "
        "position 0 |",
        "|---|---|---|---|---|---|",
    ]
    sources = []
    for task in ("capitals", "one_word"):
        report = _with_file(_load(results, f"diagnosis_{task}"), f"diagnosis_{task}")
        sources.append(measured(report))
        margin = report["teacher_minus_student_logp_of_correct_completion"]
        jsd = list(report["divergence_by_position"].values())
        tokens = ", ".join(f"`{token}` {count}" for token, count in report["tokens_teacher_promotes_at_position_0"][:5])
        lines.append(
            f"| {task} | {report['completions_measured']} | {margin['mean']:.1f} (higher under the teacher in "
            f"{margin['fraction_positive']:.0%} of {margin['count']}) | {jsd[0]:.2f} / {jsd[1]:.2f} / {jsd[-1]:.2f} "
            f"| {report['student_entropy_mean']:.2f} / {report['teacher_entropy_mean']:.2f} | {tokens} |"
        )
    return "\n".join(sources) + "\n\n" + "\n".join(lines)


def loss(results: Path, name: str = "loss_memory") -> str:
    report = _with_file(_load(results, name), name)
    targets = "; ".join(
        f"{t['implementation']} {t['ratio']} {t['value']} (target ≤ {t['target']}: {'met' if t['met'] else 'not met'})"
        for t in report["targets"]
    )
    return f"{measured(report)}\n\n{loss_memory.markdown(report['table'])}\n\nIssue #15's targets: {targets}."


def steps(results: Path) -> str:
    report = _with_file(_load(results, "step_time"), "step_time")
    targets = "; ".join(
        f"{t['vocab_size']:,} {t['reward']}: {t['ratio']} {t['value']} (target {'<' if t['strict'] else '≤'} "
        f"{t['limit']}: {'met' if t['met'] else 'not met'})"
        for t in report["targets"]
    )
    return f"{measured(report)}\n\n{step_time.markdown(report['table'])}\n\nTargets: {targets}."


def learning_steps(results: Path) -> str:
    report = _with_file(_load(results, "learning_step_time"), "learning_step_time")
    before, after = report["commits"]["before"], report["commits"]["after"]
    return (
        f"{measured(report)}\n\nSeconds per step, `{before}` → `{after}` (ratio), in each pass:\n\n"
        f"{learning_step_time.repeats_table(report)}"
    )


def step_profile(results: Path, name: str) -> str:
    report = _load(results, "step_profile")
    (profile,) = [p for p in report["profiles"] if p["name"] == name]
    columns = profile["columns"]
    phases = list(dict.fromkeys(phase["phase"] for column in columns for phase in column["phases"]))
    lines = [
        "| phase | " + " | ".join(f"{c['label']}: CPU s | peak MiB" for c in columns) + " |",
        "|---|" + "---|---|" * len(columns),
    ]
    for phase in phases:
        cells = []
        for column in columns:
            row = next((p for p in column["phases"] if p["phase"] == phase), None)
            peak = "" if row is None or row["peak_mib"] is None else f"{row['peak_mib']:,.0f}"
            cells += ["" if row is None else f"{row['cpu_s']:.2f}", peak]
        bold = phase == "step"
        lines.append("| " + " | ".join(f"**{c}**" if bold and c else c for c in [phase, *cells]) + " |")
    source = (
        f"Measured {profile['date']} at commit `{profile['commit']}` ({_machine(report['machine'])}; "
        f'{profile["note"]}): `{profile["command"]}` (`benchmarks/results/step_profile.json`, "{name}").'
    )
    return f"{source}\n\n" + "\n".join(lines)


def demo(results: Path) -> str:
    report = _load(results, "demo")
    lines = [
        "| run | training | learning rate | seed | held-out accuracy | wall | training | CPU s | peak memory | threads "
        "| commit, date | machine load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        minutes, seconds = divmod(run["wall_s"], 60)
        lines.append(
            f"| {run['name']} | {run['training']} | {run['learning_rate']:g} | {run['seed']} "
            f"| {run['accuracy_before']}% → **{run['accuracy_after']}%** | {minutes} min {seconds:02d} s "
            f"| {run['training_s']} s ({run['s_per_step']} s/step) | {run['cpu_s']:.0f} | **{run['peak_gb']} GB** "
            f"| {run['threads']} | `{run['commit']}`, {run['date']} | {run['load']} |"
        )
    lora = [r["accuracy_after"] for r in report["runs"] if r["name"].startswith("comparison: LoRA, lr 0.0003")]
    full = [r["accuracy_after"] for r in report["runs"] if r["name"].startswith("comparison: every weight")]
    means = f"Mean final accuracy over seeds: LoRA at 3e-4 {statistics.mean(lora):.1f}%, every weight at 2e-5 " + (
        f"{statistics.mean(full):.1f}%."
    )
    source = f"{report['settings']}; {_machine(report['machine'])}; `benchmarks/results/demo.json`."
    return f"{source}\n\n" + "\n".join(lines) + f"\n\n{means}"


def discovery_table(results: Path) -> str:
    report = _with_file(_load(results, "discovery"), "discovery")
    budget = discovery.FULL["budget"]
    runs = discovery.benchmark_runs(report, sorted(discovery.PROBLEMS), budget)
    table = discovery.summarise(runs, budget, report["pass_at_1"], discovery.FULL["attempts_per_round"])
    measured_problems = [report["pass_at_1"][p] for p in sorted(discovery.PROBLEMS)]
    first = sum(m["successes"] for m in measured_problems) / sum(m["samples"] for m in measured_problems)
    retry = sum(m["retry_successes"] for m in measured_problems) / sum(
        m["retries_with_feedback"] for m in measured_problems
    )
    feedback = (
        f"Pass@1 over these problems: {first:.1%}; after reading a failure's feedback in context: {retry:.1%} "
        "(`--pass-at-1`)."
    )
    return f"{measured(report)}\n\n{table}\n\n{feedback}"


def preflight_table(results: Path) -> str:
    report = _with_file(_load(results, "preflight"), "preflight")
    return f"{measured(report)}\n\n{preflight.summarise(report)}"


RENDERERS: dict[str, Callable[[Path], str]] = {
    "learning_curves_10steps": lambda results: learning_table(results, "learning_curves_10steps"),
    "learning_curves": lambda results: learning_table(results, "learning_curves"),
    "learning_curves.seeds": learning_per_seed,
    "learning_curves.diagnosis": learning_diagnosis,
    "base_pass_rate": base_pass_rate,
    "diagnosis": diagnosis,
    "loss_memory": loss,
    "loss_memory_amd": lambda results: loss(results, "loss_memory_amd"),
    "step_time": steps,
    "learning_step_time": learning_steps,
    "step_profile.demo": lambda results: step_profile(results, "demo"),
    "step_profile.demo_bf16": lambda results: step_profile(results, "demo_bf16"),
    "step_profile.learning_prompt_sharing": lambda results: step_profile(results, "learning_prompt_sharing"),
    "step_profile.learning_generation_sharing": lambda results: step_profile(results, "learning_generation_sharing"),
    "demo": demo,
    "discovery": discovery_table,
    "preflight": preflight_table,
}


def render(text: str, results: Path = RESULTS) -> str:
    """`text` with every marked block replaced by its renderer's output; an unknown name is an error."""

    def block(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"<!-- results:{name} --> names no renderer; known: {', '.join(RENDERERS)}")
        return f"{match[1]}{RENDERERS[name](results).rstrip()}\n{match[4]}"

    return BLOCK.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the page is out of date")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"results folder (default: {RESULTS})")
    parser.add_argument("--doc", type=Path, default=DOC, help=f"page to render (default: {DOC})")
    options = parser.parse_args(argv)
    text = options.doc.read_text()
    rendered = render(text, options.results)
    if options.check:
        if rendered != text:
            print(f"{options.doc} is out of date: run python benchmarks/render_results.py", file=sys.stderr)
            return 1
        return 0
    options.doc.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
