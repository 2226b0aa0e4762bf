"""Every example runs one step on CPU with the embedded model."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["basic_sdpo.py", "sdpo_lora_ema.py", "sdpo_rich_feedback.py"])
def test_example_runs_one_step(script, tmp_path):
    command = [sys.executable, str(EXAMPLES / script), "--max-steps", "1", "--output-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "self_distillation/reprompt_sample_fraction" in completed.stdout
