"""Peak memory and time of the distillation loss at the Qwen2.5-0.5B head: sdpo_rl's chunked loss vs TRL's path.

Both compute the same loss from the same final hidden states, forward and backward, with gradients for the student's
hidden states and head weight (the teacher has its own head, as an EMA teacher does):

- `trl`: TRL's experimental SDPOTrainer path (`distillation_mode="topk_logits"`): `[B, T, V]` logits of student and
  teacher, `compute_topk_self_distillation_loss`, `apply_importance_sampling_clipping`, mean over sequences of the
  token mean (`_compute_self_distillation_loss`);
- `sdpo_rl`: `sdpo_rl.loss.chunked.self_distillation_loss_from_hidden` with the same settings
  (`loss_agg_mode="seq-mean-token-mean"`);
- `sdpo_rl+entropy`: the same with `return_entropy=True`, as the trainer calls it to log both models' entropies.

Memory: each (implementation, T) runs in a fresh process: inputs allocated (in place, so that nothing above them
was ever resident), resident memory read, one forward+backward, `ru_maxrss` read. The difference is the peak extra
resident memory of a forward+backward (logits, intermediates and gradients, the head weight's included: 520 MiB at
this head in float32). Time: one process per T runs the implementations in turn after a short warm-up, three rounds
(one with `--quick`) rotating their order; each one's time is its median. One more process runs both at a short
length and reports the largest differences of loss and gradients.

On a GPU (`--device cuda`), the peak extra memory is `torch.cuda.max_memory_allocated` above what was allocated
before the forward+backward, and times are taken after `torch.cuda.synchronize()`.

    python benchmarks/loss_memory.py                  # T = 512, 1024, 2048 (about 8 minutes on 2 cores)
    python benchmarks/loss_memory.py --quick          # a smoke run (under a minute): T = 64, a small head, one pass
    python benchmarks/loss_memory.py --device cuda    # the same on the GPU: results/loss_memory_cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import in_fresh_process, machine, save_results  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QWEN_HEAD = dict(hidden_size=896, vocab_size=151_936)  # Qwen2.5-0.5B
SETTINGS = dict(topk=100, alpha=0.5, add_tail=True, is_clip=2.0)
FULL = dict(lengths=(512, 1024, 2048), repeats=3, check_length=128, head=QWEN_HEAD)
QUICK = dict(lengths=(64,), repeats=1, check_length=16, head=dict(hidden_size=128, vocab_size=16_384))
IMPLEMENTATIONS = ("trl", "sdpo_rl", "sdpo_rl+entropy")
TARGET_LENGTH = 1024  # the targets of issue #15: at T = 1024, sdpo_rl's ratios to TRL's
TARGETS = dict(memory_ratio=0.20, time_ratio=1.1)


def make_inputs(length: int, head: dict, device: str, seed: int = 0) -> dict:
    """Student and teacher hidden states ``[1, T, H]`` and heads ``[V, H]``, ids, mask and old log-probs.

    Filled in place, so that the process's resident high-water mark is the inputs themselves. Head weights of std
    0.1 give logits of std 3, about a trained model's.
    """
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    hidden, vocab = head["hidden_size"], head["vocab_size"]

    def normal(*shape, std=1.0):
        return torch.empty(*shape, device=device).normal_(0.0, std, generator=gen)

    return dict(
        student_hidden=normal(1, length, hidden).requires_grad_(),
        student_weight=normal(vocab, hidden, std=0.1).requires_grad_(),
        teacher_hidden=normal(1, length, hidden),
        teacher_weight=normal(vocab, hidden, std=0.1),
        completion_ids=torch.randint(vocab, (1, length), generator=gen, device=device),
        completion_mask=torch.ones(1, length, device=device),
        old_per_token_logps=normal(1, length, std=0.5) - 8.0,
    )


def trl_loss(inputs: dict):
    """TRL's experimental SDPOTrainer: logits, top-k loss, IS clip, mean over sequences of the token mean."""
    import torch
    from trl.experimental.sdpo.loss_utils import apply_importance_sampling_clipping, compute_topk_self_distillation_loss
    from trl.trainer.utils import selective_log_softmax

    student_logits = inputs["student_hidden"] @ inputs["student_weight"].T
    with torch.no_grad():
        teacher_logits = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    per_token = compute_topk_self_distillation_loss(
        student_logits,
        teacher_logits,
        distillation_topk=SETTINGS["topk"],
        distillation_alpha=SETTINGS["alpha"],
        distillation_add_tail=SETTINGS["add_tail"],
    )
    student_logps = selective_log_softmax(student_logits, inputs["completion_ids"])
    per_token = apply_importance_sampling_clipping(
        per_token, student_logps, inputs["old_per_token_logps"], SETTINGS["is_clip"]
    )
    mask = inputs["completion_mask"]
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def sdpo_rl_loss(inputs: dict, return_entropy: bool = False, chunk_size: int | None = None):
    from sdpo_rl.loss import LossSettings
    from sdpo_rl.loss.chunked import self_distillation_loss_from_hidden

    settings = LossSettings(
        alpha=SETTINGS["alpha"],
        distillation_topk=SETTINGS["topk"],
        distillation_add_tail=SETTINGS["add_tail"],
        full_logit_distillation=True,
        is_clip=SETTINGS["is_clip"],
        loss_agg_mode="seq-mean-token-mean",
    )

    result = self_distillation_loss_from_hidden(
        inputs["student_hidden"],
        inputs["student_weight"],
        inputs["teacher_hidden"],
        inputs["teacher_weight"],
        inputs["completion_ids"],
        inputs["completion_mask"],
        None,
        inputs["old_per_token_logps"],
        settings=settings,
        chunk_size=chunk_size,
        return_entropy=return_entropy,
    )
    return result[0] if return_entropy else result


def loss_of(implementation: str, inputs: dict, chunk_size: int | None):
    if implementation == "trl":
        return trl_loss(inputs)
    return sdpo_rl_loss(inputs, return_entropy=implementation == "sdpo_rl+entropy", chunk_size=chunk_size)


def import_implementations() -> None:
    import trl.experimental.sdpo.loss_utils  # noqa: F401
    import trl.trainer.utils  # noqa: F401

    import sdpo_rl.loss  # noqa: F401


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_resident_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def forward_backward(implementation: str, inputs: dict, chunk_size: int | None) -> float:
    """One forward+backward from fresh gradients; returns the loss."""
    for name in ("student_hidden", "student_weight"):
        inputs[name].grad = None
    loss = loss_of(implementation, inputs, chunk_size)
    loss.backward()
    return loss.item()


def measure_memory(implementation: str, length: int, head: dict, chunk_size: int | None, device: str) -> dict:
    """Run in a fresh process: the peak extra memory (resident, or CUDA allocated) of one forward+backward."""
    import torch

    import_implementations()  # imported before the baseline, not counted as the loss's memory
    inputs = make_inputs(length, head, device)
    if device == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        loss = forward_backward(implementation, inputs, chunk_size)
        synchronize(device)
        peak_extra, hidden_before = torch.cuda.max_memory_allocated() / 2**20 - before, 0.0
    else:
        before, high_water_before = resident_mib(), peak_resident_mib()
        loss = forward_backward(implementation, inputs, chunk_size)
        peak_extra, hidden_before = peak_resident_mib() - before, high_water_before - before
    return dict(
        implementation=implementation,
        length=length,
        peak_extra_mib=peak_extra,
        high_water_above_resident_before_mib=hidden_before,  # ~0: nothing hid the peak
        loss=loss,
    )


def measure_time(length: int, head: dict, repeats: int, chunk_size: int | None, device: str) -> dict:
    """Run in a fresh process: every implementation's forward+backward seconds, in turn, over `repeats` rounds."""
    inputs = make_inputs(length, head, device)
    for implementation in IMPLEMENTATIONS:  # warm-up: thread pools, allocator, lazy imports, kernels
        forward_backward(implementation, make_inputs(8, head, device), chunk_size)
    seconds = {implementation: [] for implementation in IMPLEMENTATIONS}
    for round_index in range(repeats):
        shift = round_index % len(IMPLEMENTATIONS)
        for implementation in IMPLEMENTATIONS[shift:] + IMPLEMENTATIONS[:shift]:
            synchronize(device)
            start = time.perf_counter()
            forward_backward(implementation, inputs, chunk_size)
            synchronize(device)
            seconds[implementation].append(time.perf_counter() - start)
    return dict(length=length, seconds=seconds)


def check(length: int, head: dict, device: str) -> dict:
    """Run in a fresh process: both implementations on the same inputs, largest differences of loss and gradients."""
    outputs = {}
    for implementation in ("trl", "sdpo_rl"):
        inputs = make_inputs(length, head, device)
        loss = loss_of(implementation, inputs, None)
        loss.backward()
        outputs[implementation] = (loss.detach(), inputs["student_hidden"].grad, inputs["student_weight"].grad)
    differences = {}
    names = ("loss", "grad_hidden", "grad_head_weight")
    for name, theirs, ours in zip(names, outputs["trl"], outputs["sdpo_rl"], strict=True):
        scale = theirs.abs().max().item()
        difference = (ours - theirs).abs().max().item()
        differences[name] = dict(
            max_abs_difference=difference,
            max_abs_value=scale,
            same=difference <= 1e-4 * scale,  # float32 rounding of two summation orders, not a different result
        )
    return dict(length=length, **differences)


def run_worker(task: dict) -> dict:
    if task["kind"] == "check":
        return check(task["length"], task["head"], task["device"])
    if task["kind"] == "time":
        return measure_time(task["length"], task["head"], task["repeats"], task["chunk_size"], task["device"])
    return measure_memory(task["implementation"], task["length"], task["head"], task["chunk_size"], task["device"])


def summarise(memory: list[dict], timing: list[dict]) -> list[dict]:
    """One row per length: each implementation's peak extra memory and median time, and their ratios to TRL's."""
    rows = []
    for times in timing:
        length = times["length"]
        peak = {m["implementation"]: m["peak_extra_mib"] for m in memory if m["length"] == length}
        median = {name: statistics.median(seconds) for name, seconds in times["seconds"].items()}
        row = dict(length=length)
        for name in IMPLEMENTATIONS:
            row[name] = dict(peak_extra_mib=round(peak[name]), median_seconds=round(median[name], 2))
            if name != "trl":
                row[name]["memory_ratio"] = round(peak[name] / peak["trl"], 3)
                row[name]["time_ratio"] = round(median[name] / median["trl"], 3)
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    header = ["T", "TRL peak extra", "TRL time"]
    for name in IMPLEMENTATIONS[1:]:
        header += [f"{name} peak extra", f"{name} time", "memory ratio", "time ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        trl = row["trl"]
        cells = [str(row["length"]), f"{trl['peak_extra_mib']} MiB", f"{trl['median_seconds']} s"]
        for name in IMPLEMENTATIONS[1:]:
            ours = row[name]
            cells += [f"{ours['peak_extra_mib']} MiB", f"{ours['median_seconds']} s"]
            cells += [f"{ours['memory_ratio']}x", f"{ours['time_ratio']}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(size: dict, lengths: list[int], chunk_size: int | None, device: str) -> dict:
    """Every measurement in its own process; returns the report written to the results JSON."""
    started = time.time()
    memory, timing = [], []
    for length in lengths:
        for implementation in IMPLEMENTATIONS:
            task = dict(kind="memory", implementation=implementation, length=length, head=size["head"], device=device)
            memory.append(in_fresh_process(__file__, dict(task, chunk_size=chunk_size)))
            print(f"T={length} {implementation}: peak extra {memory[-1]['peak_extra_mib']:.0f} MiB", flush=True)
        task = dict(kind="time", length=length, head=size["head"], repeats=size["repeats"], chunk_size=chunk_size)
        timing.append(in_fresh_process(__file__, dict(task, device=device)))
        print(f"T={length} seconds: {timing[-1]['seconds']}", flush=True)
    rows = summarise(memory, timing)
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=commit(),
        machine=machine(),
        device=device,
        memory_measure="torch.cuda.max_memory_allocated" if device == "cuda" else "resident high-water (ru_maxrss)",
        head=size["head"],
        settings=SETTINGS,
        chunk_size=chunk_size or sdpo_rl_chunk_size(size["head"]),
        table=rows,
        targets=verdicts(rows),
        equivalence=in_fresh_process(
            __file__, dict(kind="check", length=size["check_length"], head=size["head"], device=device)
        ),
        memory=memory,
        timing=timing,
        wall_seconds=round(time.time() - started),
    )


def verdicts(rows: list[dict]) -> list[dict]:
    """The targets at T = TARGET_LENGTH (when measured), each with the measured ratio and whether it is met."""
    results = []
    for row in rows:
        if row["length"] != TARGET_LENGTH:
            continue
        for name in IMPLEMENTATIONS[1:]:
            for ratio, target in TARGETS.items():
                value = row[name][ratio]
                results.append(dict(implementation=name, ratio=ratio, target=target, value=value, met=value <= target))
    return results


def print_report(report: dict) -> None:
    print(markdown(report["table"]))
    for verdict in report["targets"]:
        state = "met" if verdict["met"] else "MISSED"
        print(
            f"target {verdict['implementation']} {verdict['ratio']} <= {verdict['target']}: {verdict['value']} {state}"
        )
    equivalence = report["equivalence"]
    for name in ("loss", "grad_hidden", "grad_head_weight"):
        check = equivalence[name]
        print(
            f"T={equivalence['length']} {name}: max |difference| {check['max_abs_difference']:.2e}, "
            f"max |value| {check['max_abs_value']:.2e}, same: {check['same']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: T = 64, a small head, one pass each")
    parser.add_argument("--results", type=Path, help="output JSON (default: results/loss_memory[_quick].json)")
    parser.add_argument("--chunk-size", type=int, help="sdpo_rl's chunk size (default: sdpo_rl's default)")
    parser.add_argument("--lengths", type=int, nargs="+", help="completion lengths T (default: 512 1024 2048)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the loss runs (default: cpu)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    size = QUICK if args.quick else FULL
    report = dict(
        command=" ".join(["python", "benchmarks/loss_memory.py", *sys.argv[1:]]),
        **run(size, args.lengths or list(size["lengths"]), args.chunk_size, args.device),
    )
    name = "loss_memory" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    results_path = args.results or RESULTS_DIR / f"{name}.json"
    save_results(results_path, report)
    print_report(report)
    print(f"wrote {results_path} in {report['wall_seconds']} s")


def commit() -> str:
    """The checkout's commit (with "+changes" when its tracked files differ from it), or "unknown" outside git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+changes" if git("diff", "--quiet", "HEAD").returncode else "")


def sdpo_rl_chunk_size(head: dict) -> int:
    import torch

    from sdpo_rl.loss.chunked import default_chunk_size

    return default_chunk_size(head["vocab_size"], torch.float32)


if __name__ == "__main__":
    main()
