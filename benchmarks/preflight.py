"""Does preflight predict? Its measures at step 0 on every learning-benchmark task, against the measured gains.

For each task, `sdpo_rl.preflight` runs on the embedded SmolLM2-135M-Instruct with the learning benchmark's sampling
settings (`sdpo-rl preflight --task`); the learning benchmark's runs (benchmarks/learning.py, its results JSON) give
each method's mean held-out accuracy over seeds at steps 10 and 30. The script relates every preflight measure to the
gain of `sdpo`, `srpo` and `hybrid_0.8` over step 0 and over GRPO (slope, r, n of a least-squares line), and checks the
goal: the verdict's sign (an SDPO-family method ends above GRPO, or not) agrees with the measured outcome.

    python benchmarks/preflight.py                # preflight on every task, then the fit (results/preflight.json)
    python benchmarks/preflight.py --quick        # a smoke run (CI): one task, 2 prompts, 1 teacher sample
    python benchmarks/preflight.py --fit-only     # redo the fit and the plot from the saved reports

A finished task's report is saved at once and a rerun skips it. Every run, `--fit-only` included, gives the saved
reports the verdict that `sdpo_rl.preflight.recommend`'s current rules draw from their measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load_results, provenance, save_plot, save_results  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FAMILY = ("sdpo", "srpo", "hybrid_0.8")  # the SDPO-family methods whose gains are related to the measures
MEASURES = ("edge", "edge_demonstration", "edge_feedback_only", "log_prob_gain", "frame_share")
STEPS = (10, 30)
FULL = dict(prompts=32, teacher_samples=4)
QUICK = dict(prompts=2, teacher_samples=1)


def measure(task: str, size: dict, seed: int) -> dict:
    """The preflight report of `task` at step 0, as a dict."""
    import torch

    from sdpo_rl.cli.preflight import task_inputs
    from sdpo_rl.preflight import preflight

    torch.set_num_threads(1)
    report = preflight(*task_inputs(task), seed=seed, progress=False, **size)
    return report.to_dict()


def measure_value(report: dict, name: str) -> float | None:
    """A measure of a report: an edge's value, or a plain number; None where it was not measured."""
    value = report[name]
    if isinstance(value, dict):
        return None if value["edge"] is None else value["edge"]["value"]
    return value


def outcomes(runs: list[dict]) -> dict[str, dict]:
    """Per task: its step-0 accuracy, and per method the mean held-out accuracy over seeds at each of `STEPS`."""
    table: dict[str, dict] = {}
    for run in runs:
        entry = table.setdefault(run["task"], {"start": run["heldout_accuracy"][0], "methods": {}})
        at = dict(zip(run["eval_steps"], run["heldout_accuracy"], strict=True))
        entry["methods"].setdefault(run["method"], []).append(at)
    for entry in table.values():
        entry["methods"] = {method: _mean_at_steps(seeds) for method, seeds in entry["methods"].items()}
    return table


def _mean_at_steps(seeds: list[dict]) -> dict:
    """The mean over seeds of the accuracy at each of `STEPS` that every seed evaluated, its standard deviation at the
    last step ("spread", 0 with one seed), and the seed count."""
    means = {str(step): statistics.mean(a[step] for a in seeds) for step in STEPS if all(step in a for a in seeds)}
    last = str(STEPS[-1])
    spread = statistics.stdev(a[STEPS[-1]] for a in seeds) if last in means and len(seeds) > 1 else 0.0
    return {**means, "spread": spread, "seeds": len(seeds)}


def fit(points: list[tuple[float, float]]) -> dict:
    """Least-squares line through `points` (x, y): slope, Pearson's r and n; None values where n < 3 or x is flat."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return {"slope": None, "r": None, "n": len(points)}
    return {"slope": statistics.linear_regression(xs, ys).slope, "r": statistics.correlation(xs, ys), "n": len(points)}


def apply_current_rules(reports: dict[str, dict]) -> None:
    """Set each saved report's verdict, reason and recommended config from its measures by the current rules."""
    from sdpo_rl.preflight import PreflightReport, recommend

    for report in reports.values():
        report["verdict"], report["reason"], report["recommended_config"] = recommend(PreflightReport.from_dict(report))


def relate(reports: dict[str, dict], table: dict[str, dict]) -> dict:
    """Each measure against each family method's gain over GRPO and over step 0 at each step; and the goal's check."""
    fits, agreement = {}, {}
    for step in map(str, STEPS):
        for measure_name in MEASURES:
            for baseline in ("grpo", "start"):
                points = []
                for task, report in reports.items():
                    x = measure_value(report, measure_name)
                    outcome = table.get(task, {})
                    methods = outcome.get("methods", {})
                    base = outcome.get("start") if baseline == "start" else methods.get("grpo", {}).get(step)
                    for method in FAMILY:
                        y = methods.get(method, {}).get(step)
                        if x is not None and y is not None and base is not None:
                            points.append((x, y - base))
                fits[f"{measure_name} vs gain over {baseline} at step {step}"] = fit(points)
    for task, report in reports.items():
        methods = table.get(task, {}).get("methods", {})
        grpo = methods.get("grpo", {})
        family = [methods[m] for m in FAMILY if "30" in methods.get(m, {})]
        if "30" not in grpo or not family:
            agreement[task] = {"verdict": report["verdict"], "measured": None, "agrees": None}
            continue
        # Above GRPO only by more than the seeds' spread (the larger standard deviation of the two at step 30).
        better = any(m["30"] - grpo["30"] > max(m["spread"], grpo["spread"]) for m in family)
        agreement[task] = {
            "verdict": report["verdict"],
            "measured": "sdpo-family above grpo" if better else "grpo at or above the sdpo family, within the spread",
            "agrees": better == (report["verdict"] != "grpo"),
        }
    return {"fits": fits, "agreement": agreement}


def _edge_cell(edge: dict) -> str:
    if edge["edge"] is None:
        return "-"
    e = edge["edge"]
    return f"{e['value']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}] ({edge['prompts']} prompts)"


def _number(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def summarise(results: dict) -> str:
    """Markdown tables: each task's measures and verdict, the measured outcome, and the fits with an r."""
    lines = [
        "| task | student pass rate | groups none / some / all succeed | failed with a signal | edge, all | edge, "
        "demonstration | edge, feedback only | log-prob gain | first-3-token share | verdict | SDPO family above GRPO "
        "at step 30 | agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, r in results["reports"].items():
        check = results.get("agreement", {}).get(task, {})
        groups = " / ".join(
            f"{r[k]:.2f}" for k in ("groups_without_success", "groups_with_some_success", "groups_all_successful")
        )
        measured = {None: "not measured", True: "yes", False: "no"}[
            None if check.get("measured") is None else check["measured"].startswith("sdpo")
        ]
        edges = " | ".join(_edge_cell(r[k]) for k in ("edge", "edge_demonstration", "edge_feedback_only"))
        lines.append(
            f"| {task} | {r['student_pass_rate']:.3f} | {groups} | {_number(r['failed_with_signal'])} | {edges} "
            f"| {_number(r['log_prob_gain'], '{:+.2f}')} | {_number(r['frame_share'])} | {r['verdict']} | {measured} "
            f"| {_number(check.get('agrees'), '{}')} |"
        )
    fits = [(name, line) for name, line in results.get("fits", {}).items() if line["r"] is not None]
    if fits:
        lines += ["", "| measure vs gain | slope | r | n |", "|---|---|---|---|"]
        lines += [f"| {name} | {line['slope']:+.3f} | {line['r']:+.2f} | {line['n']} |" for name, line in fits]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    table = results["outcomes"]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for marker, method in zip("os^", FAMILY, strict=True):
        xs, ys, names = [], [], []
        for task, report in results["reports"].items():
            methods = table.get(task, {}).get("methods", {})
            x, y, base = measure_value(report, "edge"), methods.get(method, {}).get("30"), methods.get("grpo", {})
            if x is not None and y is not None and "30" in base:
                xs.append(x), ys.append(y - base["30"]), names.append(task)
        axis.scatter(xs, ys, marker=marker, label=method)
        for x, y, name in zip(xs, ys, names, strict=True):
            axis.annotate(name, (x, y), fontsize=7)
    axis.axhline(0, color="grey", linewidth=0.5)
    axis.axvline(0, color="grey", linewidth=0.5)
    axis.set_xlabel("teacher edge at step 0 (teacher minus student pass rate)")
    axis.set_ylabel("held-out accuracy at step 30 minus GRPO's")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from learning import TASKS as LEARNING_TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one task, 2 prompts, 1 teacher sample")
    parser.add_argument("--tasks", nargs="+", default=list(LEARNING_TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning", type=Path, default=RESULTS_DIR / "learning_curves.json")
    parser.add_argument("--results", type=Path, help="results JSON (default: benchmarks/results/preflight.json)")
    parser.add_argument("--fit-only", action="store_true", help="only redo the fit and plot from saved reports")
    options = parser.parse_args(argv)

    size = QUICK if options.quick else FULL
    tasks = options.tasks[:1] if options.quick else options.tasks
    path = options.results or RESULTS_DIR / ("preflight_quick.json" if options.quick else "preflight.json")
    results = load_results(path, reports={})
    if not options.fit_only:  # the provenance of the measurements; a refit keeps theirs
        results.update(provenance(__file__, sys.argv[1:] if argv is None else argv))
        results["settings"] = {**size, "seed": options.seed}
        for task in tasks:
            if task in results["reports"]:
                continue
            print(f"preflight on {task} ...", flush=True)
            results["reports"][task] = measure(task, size, options.seed)
            save_results(path, results)
            report = results["reports"][task]
            print(f"{task}: edge {measure_value(report, 'edge')}, verdict {report['verdict']}", flush=True)
    apply_current_rules(results["reports"])
    learning = load_results(options.learning, runs=[])
    results["outcomes"] = outcomes(learning["runs"])
    results.update(relate(results["reports"], results["outcomes"]))
    save_results(path, results)
    print(summarise(results))
    save_plot(plot, results, path.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
