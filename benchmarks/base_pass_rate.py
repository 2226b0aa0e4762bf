"""How often the untrained SmolLM2-135M-Instruct already passes each task: the share of sampled answers that pass, and
the share of prompts with at least one passing answer (a GRPO group of that size with a success).

Measured on the train and the held-out prompts, at the learning benchmark's training temperature (1.0) and at its
evaluation temperature (0.7), with its completion length (24 new tokens) and a fixed sampling seed.

    python benchmarks/base_pass_rate.py                        # every task; writes results/base_pass_rate.json
    python benchmarks/base_pass_rate.py --tasks one_word --samples 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import machine, save_report  # noqa: E402
from learning import EVAL, RESULTS_DIR, SHARED, TASKS  # noqa: E402

TEMPERATURES = (SHARED["temperature"], EVAL["temperature"])


def pass_rate(model, tokenizer, task, dataset, *, samples_per_prompt: int, temperature: float, seed: int = 0) -> dict:
    """`pass_rate` (passing samples / samples) and `prompts_with_a_pass` (share of prompts with at least one)."""
    from sdpo_rl.evaluation import sample_completions

    rows = list(dataset)
    samples = sample_completions(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=EVAL["max_new_tokens"],
        seed=seed,
    )
    passed = [[task.is_correct(text, row) for text, _ in group] for row, group in zip(rows, samples, strict=True)]
    return {
        "pass_rate": sum(map(sum, passed)) / (len(rows) * samples_per_prompt),
        "prompts_with_a_pass": sum(map(any, passed)) / len(rows),
        "prompts": len(rows),
        "samples_per_prompt": samples_per_prompt,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (default 4)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "base_pass_rate.json")
    options = parser.parse_args(argv)

    from sdpo_rl.models import load_default_model
    from sdpo_rl.tasks import get_task

    model, tokenizer = load_default_model()
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "max_new_tokens": EVAL["max_new_tokens"],
        "table": [],
    }
    for name in options.tasks:
        task = get_task(name)
        for split, dataset in (("train", task.train_dataset()), ("heldout", task.heldout_dataset())):
            for temperature in TEMPERATURES:
                start = time.perf_counter()
                result = pass_rate(
                    model, tokenizer, task, dataset, samples_per_prompt=options.samples, temperature=temperature
                )
                report["table"].append({"task": name, "split": split, "temperature": temperature, **result})
                save_report(report, options.json)  # after every measurement, so an interrupted run keeps them
                print(
                    f"{name:>12} {split:>7} T={temperature}: pass rate {result['pass_rate']:.1%}, prompts with a pass "
                    f"{result['prompts_with_a_pass']:.1%} ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    print(f"Wrote {options.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
