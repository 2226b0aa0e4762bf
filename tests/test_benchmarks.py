"""The benchmarks: their --quick smoke runs (CI executes them) on SmolLM2-135M-Instruct, their harness, and
docs/results.md, rendered from their results JSON."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module(name: str = "learning"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_learning_benchmark_quick_mode_writes_every_run(tmp_path):
    results = tmp_path / "quick.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--results", str(results)]
    # A guard against a hang, not a time limit: the 21 quick runs took over 30 minutes on a slow 2-core CI machine.
    completed = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]
    learning = benchmark_module()
    expected = {(m, t) for m in learning.DEFAULT_METHODS for t in learning.TASKS}
    assert {(r["method"], r["task"]) for r in runs} == expected
    assert {"grpo", "sdpo", "hybrid_0.8", "srpo", "srpo_plain", "sc_sdpo", "contrast"} <= set(learning.DEFAULT_METHODS)
    assert set(learning.DEFAULT_METHODS) <= set(learning.METHODS)
    for run in runs:
        assert run["eval_steps"] == [0, 1]
        assert all(0.0 <= a <= 1.0 for a in run["heldout_accuracy"])
        assert run["wall_seconds"] > 0
    assert "| capitals | sdpo | 1 |" in completed.stdout
    assert results.with_suffix(".png").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "runs to do" not in again.stdout, "a rerun must skip finished runs"


def run_quick(script, results):
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--results", str(results)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.mark.slow
def test_loss_memory_benchmark_quick_mode_measures_both_losses_and_finds_them_equal(tmp_path):
    report = run_quick("loss_memory.py", tmp_path / "loss.json")
    (row,) = report["table"]
    for name in ("trl", "sdpo_rl", "sdpo_rl+entropy"):
        assert row[name]["peak_extra_mib"] > 0 and row[name]["median_seconds"] > 0, name
    assert row["sdpo_rl"]["memory_ratio"] > 0 and row["sdpo_rl"]["time_ratio"] > 0
    assert all(report["equivalence"][name]["same"] for name in ("loss", "grad_hidden", "grad_head_weight"))
    assert report["machine"]["cores"] >= 1 and report["command"].endswith(
        "--quick --results " + str(tmp_path / "loss.json")
    )


@pytest.mark.slow
def test_step_time_benchmark_quick_mode_times_every_trainer_with_and_without_teacher_signal(tmp_path):
    report = run_quick("step_time.py", tmp_path / "steps.json")
    assert {row["reward"] for row in report["table"]} == {"mixed", "zero"}
    for row in report["table"]:
        assert all(row["seconds"][name] > 0 for name in ("grpo", "sdpo", "hybrid", "trl_sdpo"))
    for run in report["runs"]:
        assert set(run["mean_completion_length"]) == {32.0}, "every completion must have exactly 32 tokens"
        if run["trainer"] != "grpo":
            assert set(run["reprompt_sample_fraction"]) == {1.0 if run["reward"] == "mixed" else 0.0}
    assert {(t["reward"], t["ratio"]) for t in report["targets"]} == {
        ("mixed", "sdpo / grpo"),
        ("zero", "sdpo / grpo"),
        ("mixed", "hybrid / sdpo"),
    }


def test_base_pass_rate_counts_passing_samples_and_prompts_with_a_pass(monkeypatch):
    from sdpo_rl import evaluation
    from sdpo_rl.apps.tasks import get_task

    task = get_task("one_word_form")  # the word count alone: "no" and "Honey" pass for "What color is the sky?"
    rows = task.train_dataset().select(range(3))
    fake = [[("Blue.", 2), ("It is blue.", 4)], [("no", 1), ("Honey", 1)], [("two words", 2), ("", 1)]]
    monkeypatch.setattr(evaluation, "sample_completions", lambda *args, **kwargs: fake)
    result = benchmark_module("base_pass_rate").pass_rate(None, None, task, rows, samples_per_prompt=2, temperature=1.0)
    assert result == {"pass_rate": 0.5, "prompts_with_a_pass": 2 / 3, "prompts": 3, "samples_per_prompt": 2}


@pytest.mark.slow
def test_step_profile_reports_every_phase_of_the_demo_step():
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "step_profile.py"),
        "--steps=1",
        "--",
        "--num-generations=2",
        "--prompts-per-step=1",
        "--max-completion-length=4",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in completed.stdout.splitlines() if line.startswith("| ")}
    for phase in ("generation", "hybrid forward", "backward", "optimizer step"):
        assert phase in rows, phase
        assert float(rows[phase].split("|")[2]) > 0, phase
    assert "**step**" in rows


@pytest.mark.slow
def test_step_profile_of_a_learning_method_times_its_grpo_forward():
    command = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--steps=1", "--learning=grpo"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "learning.py's grpo on capitals" in completed.stdout
    rows = {line.split("|")[1].strip(): line for line in completed.stdout.splitlines() if line.startswith("| ")}
    for phase in ("generation", "GRPO forward", "backward"):
        assert float(rows[phase].split("|")[2]) > 0, phase
    assert "hybrid forward" not in rows and "distillation forward" not in rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, message",
    [(["--learning=sgd"], "not a method of learning.py"), (["--learning=sdpo", "--", "--no-lora"], "no demo options")],
)
def test_step_profile_refuses_a_learning_method_it_cannot_profile(options, message):
    command = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), *options]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2 and message in completed.stderr


@pytest.mark.slow
def test_a_failed_benchmark_job_is_reported_and_the_others_still_land():
    harness = benchmark_module("harness")
    landed = []
    jobs = [(math.sqrt, (4.0,)), (math.sqrt, (-1.0,)), (math.sqrt, (9.0,))]  # sqrt(-1) raises ValueError
    failed = harness.run_in_workers(jobs, 2, lambda arguments, result: landed.append((arguments, result)))
    assert failed == [(-1.0,)]
    assert sorted(landed) == [((4.0,), 2.0), ((9.0,), 3.0)]


def test_results_are_saved_whole_and_loaded_with_their_empty_keys(tmp_path):
    harness = benchmark_module("harness")
    path = tmp_path / "results" / "runs.json"
    assert harness.load_results(path, runs=[], pass_at_1={}) == {"runs": [], "pass_at_1": {}}
    harness.save_results(path, {"runs": [{"seed": 0}]})
    assert harness.load_results(path, runs=[], pass_at_1={}) == {"runs": [{"seed": 0}], "pass_at_1": {}}
    assert [p.name for p in path.parent.iterdir()] == ["runs.json"]  # no temporary file left behind


def test_learning_report_finds_when_a_method_reaches_grpo_and_whether_it_meets_the_goal():
    learning = benchmark_module()

    def run(method, task, seed, curve):
        metrics = {"reward": [0.0, 0.5, 1.0], "self_distillation/distillation_loss": [None] * 3}
        return dict(method=method, task=task, seed=seed, eval_steps=[0, 5, 10], heldout_accuracy=curve,
                    mean_completion_length=[9.0, 8.0, 7.0], seconds_per_step=2.0, train_metrics=metrics)  # fmt: skip

    results = {
        "runs": [
            run("grpo", "a", 0, [0.2, 0.3, 0.6]),
            run("grpo", "a", 1, [0.2, 0.5, 0.6]),
            run("grpo", "b", 0, [0.5, 0.6, 0.7]),
            run("new", "a", 0, [0.2, 0.7, 0.8]),
            run("new", "b", 0, [0.5, 0.6, 0.9]),
            run("risky", "a", 0, [0.2, 0.9, 0.1]),
            run("risky", "b", 0, [0.5, 0.9, 0.95]),
        ]
    }
    rows = {(r["task"], r["method"]): r for r in learning.method_rows(results)}
    assert rows["a", "grpo"]["final"] == 0.6 and rows["a", "grpo"]["reaches_grpo_final_at"] == 10
    assert rows["a", "new"]["reaches_grpo_final_at"] == 5 and rows["b", "new"]["reaches_grpo_final_at"] == 10
    assert abs(rows["a", "risky"]["worst_change"] + 0.1) < 1e-9
    verdicts = learning.goal_verdicts(results)
    assert verdicts["new"]["met"] and verdicts["new"]["above_grpo"] == ["a", "b"]
    assert verdicts["new"]["faster_than_grpo"] == ["a"]
    assert not verdicts["risky"]["met"] and not verdicts["risky"]["never_below_start"]
    assert "| a | new | 1 | 20.0% | 80.0 ± 0.0% | +60.0 pts | 5 | 7.0 | 2.0 |" in learning.summarise(results)
    # the diagnosis: first and last steps' means over seeds; a metric never logged (or absent) is "-"
    assert "| a | grpo | 0.25 → 0.75 | - | - | - | - | - |" in learning.diagnosis(results, window=2)
    assert "| a | grpo | 0 → 1 | - |" in learning.diagnosis(results, window=1)


@pytest.mark.slow
def test_learning_step_time_quick_mode_times_both_versions_of_each_method(tmp_path):
    results = tmp_path / "steps.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "learning_step_time.py"), "--quick"]
    completed = subprocess.run(
        [*command, "--before", str(ROOT), "--after", str(ROOT), "--results", str(results)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(results.read_text())
    (repeat,) = report["repeats"]
    assert [r["method"] for r in repeat["runs"]] == ["grpo", "hybrid_0.8"]
    assert set(report["median_ratio"]) == {"grpo", "hybrid_0.8"} and report["commit"]
    for run in repeat["runs"]:
        for version in ("before", "after"):
            timing = run[version]
            assert len(timing["wall"]) == len(timing["cpu"]) == 2 and timing["median_cpu"] > 0
            assert Path(timing["library"]) == ROOT / "sdpo_rl", "the checkout given must be the one imported"
    assert "| hybrid_0.8 |" in completed.stdout and report["command"].endswith(str(results))
    refused = subprocess.run([*command, "--before", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"--before={tmp_path} must be a checkout" in refused.stderr


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_the_cpu_without_a_gpu(tmp_path):
    """The CPU fallback of benchmarks/gpu_check.sh: the same steps at the quick sizes, everything under $OUT."""
    out = tmp_path / "gpu_check"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800,
    )  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert completed.returncode == 0, summary + completed.stdout[-2000:]
    for step in ("environment", "loss_tests", "loss_memory", "step_time"):
        assert re.search(rf"^{step}: exit 0 in \d+ s$", summary, re.MULTILINE), summary
    assert "device: cpu" in (out / "environment.log").read_text()
    assert json.loads((out / "loss_memory.json").read_text())["table"]
    assert json.loads((out / "step_time.json").read_text())["table"]
    assert 'failures="0"' in (out / "loss_tests.xml").read_text()


@pytest.mark.slow
def test_learning_step_time_refuses_fewer_than_one_pass():
    script = ROOT / "benchmarks" / "learning_step_time.py"
    command = [sys.executable, str(script), "--before", str(ROOT), "--after", str(ROOT), "--repeats", "0"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2 and "--repeats=0 must be at least 1" in completed.stderr


def test_results_page_is_what_the_results_json_render():
    render = benchmark_module("render_results")
    text = render.DOC.read_text()
    assert render.render(text) == text, "docs/results.md is out of date: run python benchmarks/render_results.py"
    assert render.main(["--check"]) == 0


def test_every_results_json_is_rendered_on_the_results_page():
    render = benchmark_module("render_results")
    text = render.DOC.read_text()
    shown = set(re.findall(r"`benchmarks/results/([\w.]+\.json)`", text))
    assert {path.name for path in render.RESULTS.glob("*.json")} <= shown
    assert set(re.findall(r"^<!-- results:([\w.]+) -->$", text, flags=re.M)) == set(render.RENDERERS)


def test_a_changed_number_in_a_results_json_makes_the_results_page_out_of_date(tmp_path, capsys):
    render = benchmark_module("render_results")
    results = tmp_path / "results"
    results.mkdir()
    for path in render.RESULTS.glob("*.json"):
        (results / path.name).write_text(path.read_text())
    report = json.loads((results / "step_time.json").read_text())
    report["table"][0]["sdpo / grpo"] = 0.123
    (results / "step_time.json").write_text(json.dumps(report))
    assert render.main(["--check", "--results", str(results)]) == 1
    assert "docs/results.md is out of date" in capsys.readouterr().err
    doc = tmp_path / "results.md"
    doc.write_text(render.DOC.read_text())
    assert render.main(["--results", str(results), "--doc", str(doc)]) == 0
    assert "| 0.123x |" in doc.read_text()
    assert render.main(["--check", "--results", str(results), "--doc", str(doc)]) == 0


def test_an_unknown_results_marker_is_refused_with_the_known_names():
    render = benchmark_module("render_results")
    with pytest.raises(ValueError, match=r"<!-- results:nope --> names no renderer; known: learning_curves_10steps, "):
        render.render("<!-- results:nope -->\n<!-- /results -->\n")
