"""What the benchmark scripts share: running a measurement in a fresh process, the machine, saving the report."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path


def in_fresh_process(script: str, task: dict) -> dict:
    """Run `script --worker TASK` in a new interpreter (a clean memory high-water mark) and return its JSON line."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(task)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {task} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """The CPU model, the cores this process may use, and torch's default thread count."""
    import os

    import torch

    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return dict(
        cpu=models[0] if models else platform.machine(),
        cores=len(os.sched_getaffinity(0)),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def save_report(report: dict, path: Path) -> None:
    """Write the report as JSON, creating the results folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
