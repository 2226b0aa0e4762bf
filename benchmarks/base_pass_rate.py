"""How often the untrained SmolLM2-135M-Instruct already passes each task: the share of sampled answers that pass, and
the share of prompts with at least one passing answer (a GRPO group of that size with a success).

Measured on the train and the held-out prompts, at the learning benchmark's training temperature (1.0) and at its
evaluation temperature (0.7), with its completion length (24 new tokens) and a fixed sampling seed.

    python benchmarks/base_pass_rate.py                        # the learning benchmark's tasks
    python benchmarks/base_pass_rate.py --tasks capitals_hard --prompts 12 --samples 8 --jobs 4

Each (task, split, temperature) runs in one of `--jobs` worker processes with one thread, as in `learning.py`. Each
invocation appends one run (its command, date, commit, machine and table) to the `runs` of results/base_pass_rate.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import load_results, provenance, run_in_workers, save_results  # noqa: E402
from learning import EVAL, RESULTS_DIR, SHARED, TASKS  # noqa: E402

TEMPERATURES = (SHARED["temperature"], EVAL["temperature"])
SPLITS = ("train", "heldout")


def pass_rate(model, tokenizer, task, dataset, *, samples_per_prompt: int, temperature: float, seed: int = 0) -> dict:
    """`pass_rate` (passing samples / samples) and `prompts_with_a_pass` (share of prompts with at least one)."""
    from sdpo_rl.evaluation import heldout_accuracy

    result = heldout_accuracy(
        model,
        tokenizer,
        dataset,
        task,
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=EVAL["max_new_tokens"],
        seed=seed,
    )
    return {
        "pass_rate": result["accuracy"],
        "prompts_with_a_pass": result["prompts_with_a_pass"],
        "prompts": len(dataset),
        "samples_per_prompt": samples_per_prompt,
    }


def measure(name: str, split: str, temperature: float, samples_per_prompt: int, prompts: int | None) -> dict:
    """One row of the table, in a worker process with one thread (the model is loaded per worker), on the split's
    first `prompts` rows (all of them when None)."""
    import torch

    torch.set_num_threads(1)
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.models import load_default_model

    task = get_task(name)
    dataset = task.train_dataset() if split == "train" else task.heldout_dataset()
    if prompts is not None:
        dataset = dataset.select(range(min(prompts, len(dataset))))
    model, tokenizer = load_default_model()
    result = pass_rate(model, tokenizer, task, dataset, samples_per_prompt=samples_per_prompt, temperature=temperature)
    return {"task": name, "split": split, "temperature": temperature, **result}


def main(argv: list[str] | None = None) -> int:
    from sdpo_rl.apps.tasks import TASKS as ALL_TASKS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(ALL_TASKS))
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--prompts", type=int, help="only the first PROMPTS rows of each split (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="measurements in parallel, one thread each (default 2)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "base_pass_rate.json")
    options = parser.parse_args(argv)

    results = load_results(options.json, runs=[])
    report = {
        **provenance(__file__, sys.argv[1:] if argv is None else argv),
        "max_new_tokens": EVAL["max_new_tokens"],
        "table": [],
    }
    results["runs"].append(report)
    todo = [(name, split, temperature) for name in options.tasks for split in SPLITS for temperature in TEMPERATURES]

    def record(row_key: tuple, row: dict) -> None:
        print(
            f"{row['task']:>12} {row['split']:>7} T={row['temperature']}: pass rate {row['pass_rate']:.1%}, "
            f"prompts with a pass {row['prompts_with_a_pass']:.1%}",
            flush=True,
        )
        report["table"].append(row)
        report["table"].sort(key=lambda r: todo.index((r["task"], r["split"], r["temperature"])))
        save_results(options.json, results)  # after every measurement, so an interrupted run keeps the finished ones

    jobs = [(measure, (*row, options.samples, options.prompts)) for row in todo]
    failed = run_in_workers(jobs, options.jobs, record)
    if failed:
        print(f"{len(failed)} measurements failed: {[job[:3] for job in failed]}", file=sys.stderr)
        return 1
    print(f"Wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
