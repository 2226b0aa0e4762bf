"""Ends a two-process run as `sdpo-rl train` does, right after a collective (for tests/test_distributed.py).

    torchrun --standalone --nproc_per_node 2 tests/exit_worker.py OUTPUT_DIR

Like a Trainer, it wraps a model in DDP through accelerate; the wrapper keeps a reference to the process group. Its
last collective ends just before `sdpo_rl.process_group.end_training` and the end of the script: a gloo worker thread
still freeing that collective's tensors when the interpreter begins to finalize aborts the process ("terminate called
without an active exception"). Each process writes `rank{R}.json`: the names of its threads before and after
`end_training`.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import Accelerator

from sdpo_rl.process_group import end_training


def thread_names() -> list[str]:
    return sorted(Path("/proc/self/task", task, "comm").read_text().strip() for task in os.listdir("/proc/self/task"))


if __name__ == "__main__":
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 1)
    wrapped = accelerator.prepare(model)
    wrapped(torch.ones(2, 4)).sum().backward()
    for _ in range(20):
        gathered = [torch.empty(8) for _ in range(accelerator.num_processes)]
        dist.all_gather(gathered, torch.full((8,), float(accelerator.process_index)))
    del gathered
    before = thread_names()
    trainer = SimpleNamespace(model=model, model_wrapped=wrapped, accelerator=accelerator)
    rank = accelerator.process_index
    del wrapped  # the trainer's references are the script's only ones, as in `sdpo_rl.cli.train.train`
    end_training(trainer)
    report = {"before": before, "after": thread_names()}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(report))
