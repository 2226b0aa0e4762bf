"""Seconds per training step of `learning.py`'s methods, for two versions of this library on the same machine.

Each method trains a few steps with exactly `learning.py`'s settings (its `METHODS`, `SHARED`, a batch of 16
completions, no evaluation) under each version, the two versions of one method side by side in two fresh processes
with one thread each, so that they share the machine alike. A version is a checkout of this repository (a `git
worktree` of an older commit, say); its `sdpo_rl` is imported through `PYTHONPATH`. The first step is a warm-up;
the report gives the median wall and CPU seconds of the others, and each method's ratio of the two versions. The
machine's speed drifts between passes, so the full run makes five passes over the methods (`--repeats`) and the
results JSON holds every pass and each method's median ratio over them.

    git worktree add /tmp/before 70aae25
    python benchmarks/learning_step_time.py --before /tmp/before --after .      # results/learning_step_time.json
    python benchmarks/learning_step_time.py --before /tmp/before --after . --quick   # a smoke run: 2 steps, 2 methods
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import provenance, save_results, step_clock  # noqa: E402
from learning import FULL as LEARNING  # noqa: E402
from learning import make_trainer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "learning_step_time.json"
FULL = dict(steps=4, methods=("grpo", "sdpo", "hybrid", "hybrid_0.8"), task="capitals", repeats=5)
QUICK = dict(steps=2, methods=("grpo", "hybrid_0.8"), task="capitals", repeats=1)


def time_steps(method: str, task_name: str, steps: int) -> dict:
    """Train `steps` steps of `method` with the `sdpo_rl` on sys.path; each step's wall and CPU seconds."""
    import torch

    torch.set_num_threads(1)
    import sdpo_rl
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.models import load_default_model

    task = get_task(task_name)
    model, tokenizer = load_default_model()
    clock = step_clock()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = make_trainer(method, task, model, tokenizer, output_dir, {**LEARNING, "steps": steps}, 0, [clock])
        trainer.train()
    return {"library": str(Path(sdpo_rl.__file__).parent), "wall": clock.wall, "cpu": clock.cpu}


def run_pair(method: str, versions: dict[str, Path], size: dict) -> dict:
    """Both versions of one method at once, each in its own process with its checkout first on PYTHONPATH."""
    processes = {}
    for label, checkout in versions.items():
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        command = [sys.executable, __file__, "--worker", method, size["task"], str(size["steps"])]
        processes[label] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = {"method": method, "task": size["task"], "steps": size["steps"]}
    for label, process in processes.items():
        out, err = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"{label} {method} failed:\n{err[-3000:]}")
        timing = json.loads(out.strip().splitlines()[-1])
        record[label] = {
            **timing,
            "median_wall": statistics.median(timing["wall"][1:]),
            "median_cpu": statistics.median(timing["cpu"][1:]),
        }
    return record


def summarise(records: list[dict]) -> str:
    """A Markdown table: each method's median seconds per step under both versions, and their ratios."""
    lines = [
        "| method | before: wall s | before: CPU s | after: wall s | after: CPU s | after / before (wall) | (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        before, after = r["before"], r["after"]
        lines.append(
            f"| {r['method']} | {before['median_wall']:.1f} | {before['median_cpu']:.1f} | {after['median_wall']:.1f}"
            f" | {after['median_cpu']:.1f} | {after['median_wall'] / before['median_wall']:.2f}x"
            f" | {after['median_cpu'] / before['median_cpu']:.2f}x |"
        )
    return "\n".join(lines)


def median_ratios(repeats: list[dict]) -> dict[str, float]:
    """Each method's median over the passes of its after / before ratio of median wall seconds per step."""
    ratios: dict[str, list[float]] = {}
    for repeat in repeats:
        for r in repeat["runs"]:
            ratios.setdefault(r["method"], []).append(r["after"]["median_wall"] / r["before"]["median_wall"])
    return {method: statistics.median(values) for method, values in ratios.items()}


def repeats_table(report: dict) -> str:
    """A Markdown table: per method, each pass's median wall seconds per step before → after (ratio), and the median
    ratio over the passes."""
    repeats = report["repeats"]
    lines = [
        "| method | " + " | ".join(f"pass {i}" for i in range(1, len(repeats) + 1)) + " | median ratio |",
        "|---|" + "---|" * (len(repeats) + 1),
    ]
    for method, ratio in report["median_ratio"].items():
        cells = []
        for repeat in repeats:
            r = next(r for r in repeat["runs"] if r["method"] == method)
            before, after = r["before"]["median_wall"], r["after"]["median_wall"]
            cells.append(f"{before:.1f} → {after:.1f} ({after / before:.2f}x)")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | **{ratio:.2f}x** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="checkout of the earlier version")
    parser.add_argument("--after", type=Path, help="checkout of the later version")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps of 2 methods")
    parser.add_argument("--repeats", type=int, help="passes over the methods (default 5, 1 with --quick)")
    parser.add_argument("--results", type=Path, help=f"results JSON (default: {RESULTS}, *_quick.json with --quick)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "TASK", "STEPS"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker:
        method, task, steps = options.worker
        print(json.dumps(time_steps(method, task, int(steps))))
        return 0
    for name in ("before", "after"):
        checkout = getattr(options, name)
        if checkout is None or not (checkout / "sdpo_rl" / "__init__.py").is_file():
            parser.error(f"--{name}={checkout} must be a checkout of this repository (with sdpo_rl/__init__.py)")
    size = QUICK if options.quick else FULL
    if options.repeats is not None and options.repeats < 1:
        parser.error(f"--repeats={options.repeats} must be at least 1")
    versions = {"before": options.before, "after": options.after}
    repeats = []
    for _ in range(options.repeats or size["repeats"]):
        records = []
        for method in size["methods"]:
            records.append(run_pair(method, versions, size))
            print(summarise(records).splitlines()[-1], flush=True)
        repeats.append({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": records})
        print(summarise(records))
    commits = {
        label: subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for label, path in versions.items()
    }
    report = provenance(__file__, sys.argv[1:] if argv is None else argv)
    report.update(commits=commits, repeats=repeats, median_ratio=median_ratios(repeats))
    default = RESULTS.with_name("learning_step_time_quick.json") if options.quick else RESULTS
    save_results(options.results or default, report)
    print(repeats_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
