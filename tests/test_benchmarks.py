"""The learning benchmark's --quick smoke run (CI executes it) on the embedded SmolLM2-135M-Instruct."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module():
    spec = importlib.util.spec_from_file_location("learning", ROOT / "benchmarks" / "learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_learning_benchmark_quick_mode_writes_every_run(tmp_path):
    results = tmp_path / "quick.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--quick", "--results", str(results)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    runs = json.loads(results.read_text())["runs"]
    learning = benchmark_module()
    assert {(r["method"], r["task"]) for r in runs} == {(m, t) for m in learning.METHODS for t in learning.TASKS}
    assert {"grpo", "sdpo", "hybrid"} <= set(learning.METHODS)
    for run in runs:
        assert run["eval_steps"] == [0, 1]
        assert all(0.0 <= a <= 1.0 for a in run["heldout_accuracy"])
        assert run["wall_seconds"] > 0
    assert "| capitals | sdpo | 1 |" in completed.stdout
    assert results.with_suffix(".png").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "runs to do" not in again.stdout, "a rerun must skip finished runs"
