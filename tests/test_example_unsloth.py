"""The Unsloth example needs a CUDA GPU: without one it explains why and exits cleanly, loading nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sdpo_with_unsloth.py"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path; with a GPU the example trains")
def test_unsloth_example_exits_with_a_message_without_cuda(tmp_path):
    command = [sys.executable, str(SCRIPT), "--max-steps", "1", "--output-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "nothing was run: it needs a CUDA GPU" in completed.stdout
    assert "Traceback" not in completed.stderr
    assert not any(tmp_path.iterdir())
