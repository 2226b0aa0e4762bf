"""benchmarks/preflight.py: how it relates preflight's measures to the learning runs, and its --quick smoke run."""

import json
import statistics
import subprocess
import sys

import pytest
from test_benchmarks import ROOT, benchmark_module


def report(edge: float | None, verdict: str, gain: float = 0.0) -> dict:
    entry = {"edge": None if edge is None else {"value": edge, "low": edge - 0.1, "high": edge + 0.1}, "prompts": 5}
    return {
        "edge": entry,
        "edge_demonstration": entry,
        "edge_feedback_only": {"edge": None, "prompts": 0},
        "log_prob_gain": gain,
        "frame_share": 0.5,
        "verdict": verdict,
    }


def run(task: str, method: str, seed: int, accuracies: list[float]) -> dict:
    return {"task": task, "method": method, "seed": seed, "eval_steps": [0, 10, 30], "heldout_accuracy": accuracies}


def test_outcomes_average_the_seeds_at_steps_10_and_30():
    preflight = benchmark_module("preflight")
    table = preflight.outcomes(
        [
            run("a", "grpo", 0, [0.2, 0.4, 0.6]),
            run("a", "grpo", 1, [0.2, 0.6, 0.8]),
            run("a", "srpo", 0, [0.2, 0.3, 0.9]),
        ]
    )
    assert table["a"]["start"] == 0.2
    assert table["a"]["methods"]["grpo"] == {
        "10": pytest.approx(0.5),
        "30": pytest.approx(0.7),
        "spread": pytest.approx(0.1414, abs=1e-4),
        "seeds": 2,
    }
    assert table["a"]["methods"]["srpo"]["30"] == 0.9


def test_the_verdict_agrees_when_its_sign_matches_the_measured_outcome():
    preflight = benchmark_module("preflight")
    runs = [
        run("up", "grpo", 0, [0.1, 0.2, 0.3]),
        run("up", "srpo", 0, [0.1, 0.4, 0.6]),
        run("down", "grpo", 0, [0.1, 0.5, 0.9]),
        run("down", "sdpo", 0, [0.1, 0.1, 0.0]),
        run("flat", "grpo", 0, [0.4, 0.5, 0.6]),
        run("flat", "hybrid_0.8", 0, [0.4, 0.5, 0.5]),
        run("noisy", "grpo", 0, [0.4, 0.5, 0.6]),
        run("noisy", "grpo", 1, [0.4, 0.5, 0.8]),
        run("noisy", "srpo", 0, [0.4, 0.5, 0.7]),
        run("noisy", "srpo", 1, [0.4, 0.5, 0.8]),
    ]
    reports = {
        "up": report(0.3, "srpo"),
        "down": report(0.2, "sdpo"),
        "flat": report(-0.1, "grpo"),
        "new": report(None, "grpo"),
        "noisy": report(0.2, "sdpo"),
    }
    related = preflight.relate(reports, preflight.outcomes(runs))
    agreement = related["agreement"]
    assert agreement["up"]["agrees"] is True and agreement["down"]["agrees"] is False
    assert agreement["flat"]["agrees"] is True and agreement["new"]["measured"] is None
    assert agreement["noisy"]["agrees"] is False  # srpo's 0.75 is 0.05 above GRPO's 0.7, within the spread 0.14
    line = related["fits"]["edge vs gain over grpo at step 30"]
    points = [(0.3, 0.3), (0.2, -0.9), (-0.1, -0.1), (0.2, 0.05)]  # (edge, family's step-30 gain over GRPO)
    expected = statistics.correlation([x for x, _ in points], [y for _, y in points])
    assert line["n"] == 4 and line["r"] == pytest.approx(expected)
    assert preflight.fit([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == {
        "slope": pytest.approx(2.0),
        "r": pytest.approx(1.0),
        "n": 3,
    }
    assert preflight.fit([(0.0, 1.0), (1.0, 3.0)])["r"] is None


@pytest.mark.slow
def test_preflight_benchmark_quick_mode_writes_a_report_and_its_table(tmp_path):
    results = tmp_path / "preflight_quick.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "preflight.py"), "--quick", "--results", str(results)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = json.loads(results.read_text())
    assert list(saved["reports"]) == ["capitals"] and saved["settings"]["prompts"] == 2
    assert {"command", "date", "machine", "commit"} <= set(saved)
    assert "| capitals |" in completed.stdout and results.with_suffix(".png").exists()


def test_saved_reports_get_the_current_rules_verdict():
    """A report saved under older rules (verdict "sdpo" for a clear edge) is re-judged from its measures."""
    from test_preflight import measured

    saved = measured(0.5, (0.26, 0.17, 0.34)).to_dict() | {"verdict": "sdpo", "reason": "old", "recommended_config": {}}
    reports = {"capitals_hard": json.loads(json.dumps(saved))}
    benchmark_module("preflight").apply_current_rules(reports)
    assert reports["capitals_hard"]["verdict"] == "hybrid"
    assert reports["capitals_hard"]["recommended_config"] == {"grpo_weight": 0.8}
