"""What the benchmark scripts share: running measurements in fresh processes, the machine, saving results and plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path


def in_fresh_process(script: str, task: dict) -> dict:
    """Run `script --worker TASK` in a new interpreter (a clean memory high-water mark) and return its JSON line."""
    command = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(task)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"worker {task} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def step_clock(synchronize: Callable[[], None] = lambda: None, after_step: Callable[[object], None] | None = None):
    """A `TrainerCallback` that records each training step's wall and CPU seconds in its lists `wall` and `cpu`, from
    `on_step_begin` to `on_step_end` (generation, rewards, forwards, backward, optimizer step and the callbacks').

    `synchronize` runs before each reading (on a GPU: wait for its queued work); `after_step(state)` runs after each
    step's reading.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            synchronize()
            self.started = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.wall.append(time.perf_counter() - self.started[0])
            self.cpu.append(time.process_time() - self.started[1])
            if after_step is not None:
                after_step(state)

    return StepClock()


def machine() -> dict:
    """The CPU model, the cores this process may use, and torch's default thread count."""
    import torch

    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return dict(
        cpu=models[0] if models else platform.machine(),
        cores=len(os.sched_getaffinity(0)),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def provenance(script: str, argv: list[str]) -> dict:
    """Where a result comes from, for the top of its results JSON: the command line, the UTC date, the machine and
    the commit checked out (the docs cite these instead of retyping them)."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return dict(
        command=" ".join(["python", f"benchmarks/{Path(script).name}", *argv]),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=machine(),
        commit=head.stdout.strip() or None,
    )


def load_results(path: Path, **empty) -> dict:
    """The results JSON at `path`, with the keys of `empty` (name=default) added where missing."""
    results = json.loads(path.read_text()) if path.exists() else {}
    for key, default in empty.items():
        results.setdefault(key, default)
    return results


def save_results(path: Path, results: dict) -> None:
    """Write the results JSON atomically (an interrupted write never leaves a truncated file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=1))
    os.replace(temporary, path)


def run_in_workers(jobs: list[tuple[Callable, tuple]], workers: int, on_result: Callable[[tuple, dict], None]) -> list:
    """Run each `(function, arguments)` in one of `workers` spawned processes, handing every finished result to
    `on_result(arguments, result)` at once; a job that raises is reported on stderr and the others go on.

    Returns the arguments of the failed jobs."""
    failed = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(function, *arguments): arguments for function, arguments in jobs}
        for future in as_completed(futures):
            if future.exception() is not None:
                failed.append(futures[future])
                print(f"job {futures[future]} failed:", file=sys.stderr)
                traceback.print_exception(future.exception())
                continue
            on_result(futures[future], future.result())
    return failed


def save_plot(draw: Callable[[dict, Path], None], results: dict, path: Path) -> None:
    """`draw(results, path)`, or say that matplotlib is missing (it is an extra, not a runtime dependency)."""
    try:
        draw(results, path)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    print(f"plot: {path}")
