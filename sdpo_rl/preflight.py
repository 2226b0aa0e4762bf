"""`preflight`: before training, measure whether the model's own teacher knows more than the student.

SDPO distils the model reading hindsight (a peer's success, the environment's feedback) into the model reading the
plain prompt, so it can only teach what the model knows better with that hindsight. He, Sieber and Saponati ("A
Predictive Law for On-Policy Self-Distillation From World Feedback", arXiv:2605.30070) report that the final gain of
on-policy self-distillation is linear in the initial gap between the two pass rates. `preflight` measures that gap on
the user's own model, data and reward functions, with the trainer's own code (one code path with training):

1. one rollout of `prompts` prompts through `SDPOTrainer.rollout_with_teacher_batch`: TRL's generation and rewards,
   then SDPO's signal selection and teacher prompts, as in a training step;
2. `teacher_samples` completions sampled (TRL's sampling settings) from the teacher prompt of every failed completion
   that has a teacher signal, scored by the same reward functions (`teacher_edge_counts`, which the trainer also uses
   for its `teacher_edge` metric);
3. two token-level measures without sampling: the teacher-minus-student log-probability of the group's success, and
   the share of the distillation divergence that sits on the first completion tokens.

docs/preflight.md defines every field of `PreflightReport` and the rules of the verdict.
"""

from __future__ import annotations

import copy
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .config import SDPOConfig
from .forward import no_grad_logits
from .loss import per_token_divergence, sampled_token_logps
from .model_state import restored
from .teacher_batch import total_rewards

BOOTSTRAP_RESAMPLES = 1000
FRAME_POSITIONS = 3  # the first completion positions, where a reprompt's frame shows (docs/preflight.md)
# The verdict's recommendation where the teacher knows more: distillation added to GRPO's loss, not in its place
# (docs/preflight.md says which measurements chose it).
HYBRID_GRPO_WEIGHT = 0.8
DEMONSTRATION, FEEDBACK_ONLY = EDGE_KINDS = ("demonstration", "feedback_only")  # a failed completion's teacher prompt
MIN_EDGE_PROMPTS = 5  # fewer prompts with a teacher prompt make the bootstrap interval meaningless


@dataclass
class Interval:
    """A measured value and its 95% bootstrap interval over prompts."""

    value: float
    low: float
    high: float


@dataclass
class Edge:
    """Teacher pass rate minus student pass rate on the prompts of one kind of teacher prompt.

    `failures`: failed completions of this kind with a teacher prompt, each sampled `teacher_samples` times;
    `prompts`: the prompts they belong to, over whose completions `student_pass_rate` is counted. None values: no
    such teacher prompt in the sample.
    """

    failures: int
    prompts: int
    teacher_pass_rate: float | None
    student_pass_rate: float | None
    edge: Interval | None


@dataclass
class PreflightReport:
    """What `preflight` measured (docs/preflight.md defines each field); `to_dict()` is JSON-serialisable."""

    prompts: int
    num_generations: int
    teacher_samples: int
    student_pass_rate: float
    student_mean_reward: float
    groups_without_success: float
    groups_with_some_success: float
    groups_all_successful: float
    grpo_signal_fraction: float  # completions with a non-zero advantage
    demonstration_only: float
    feedback_only: float
    demonstration_and_feedback: float
    no_signal: float
    failed_with_signal: float | None  # None: no completion failed
    edge: Edge
    edge_demonstration: Edge
    edge_feedback_only: Edge
    log_prob_gain: float | None  # nats per token
    frame_share: float | None
    step_cost_vs_grpo: float
    verdict: str
    reason: str
    recommended_config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreflightReport:
        """The report that `to_dict` gave `values` (read back from JSON)."""
        edges = {
            name: Edge(**{**values[name], "edge": values[name]["edge"] and Interval(**values[name]["edge"])})
            for name in ("edge", "edge_demonstration", "edge_feedback_only")
        }
        return cls(**{**values, **edges})


@dataclass
class PromptCounts:
    """Per prompt: its student completions and successes, and its teacher samples and their successes."""

    student: int = 0
    student_successes: int = 0
    failures: int = 0  # failed completions whose teacher prompt was sampled
    teacher: int = 0
    teacher_successes: int = 0


def preflight(
    model,
    tokenizer,
    train_dataset,
    reward_funcs: Callable | Sequence[Callable],
    args=None,
    sdpo_config: SDPOConfig | None = None,
    prompts: int = 32,
    teacher_samples: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> PreflightReport:
    """Measure the teacher's edge over the student on `prompts` prompts of `train_dataset`, before any training.

    `model`, `tokenizer`, `train_dataset`, `reward_funcs` and `args` (a `GRPOConfig`; default: TRL's defaults) are what
    `SDPOTrainer` takes, and `sdpo_config` what it would train with (default `SDPOConfig()`). Nothing is trained and
    nothing saved: the model's parameters are unchanged and every change the trainer makes to it is undone
    (`sdpo_rl.model_state.restored`); `args` and `sdpo_config` are not modified; the global random state is restored.
    The prompts are a seeded sample of the dataset's rows; sampling is seeded too.
    """
    from tqdm.auto import tqdm

    sdpo_config = _check_arguments(train_dataset, args, sdpo_config, prompts, teacher_samples)
    started = time.perf_counter()
    rows = random.Random(seed).sample(range(len(train_dataset)), min(prompts, len(train_dataset)))
    dataset = train_dataset.select(rows)
    kept = restored(model, who="preflight") if isinstance(model, torch.nn.Module) else nullcontext()
    with kept, _global_random_state_kept():
        trainer = _trainer(model, tokenizer, dataset, reward_funcs, args, sdpo_config)  # Trainer seeds everything
        torch.manual_seed(seed)
        group = trainer.num_generations
        per_call = max(1, trainer.args.generation_batch_size // group)
        calls = math.ceil(len(dataset) / per_call)
        bar = tqdm(total=2 * calls + 1, desc="preflight", disable=not progress, dynamic_ncols=True)
        rollouts, timings = [], {"rollout": 0.0, "teacher": 0.0}
        for start in range(0, len(dataset), per_call):
            inputs = [dataset[i] for i in range(start, min(start + per_call, len(dataset))) for _ in range(group)]
            tick = time.perf_counter()
            batch, teacher_batch = trainer.rollout_with_teacher_batch(inputs)
            timings["rollout"] += time.perf_counter() - tick
            rollouts.append((inputs, batch, teacher_batch))
            bar.update()
        counts = []
        for inputs, _, teacher_batch in rollouts:
            counts.append(teacher_edge_counts(trainer, inputs, teacher_batch, teacher_samples))
            bar.update()
        token_level = _token_level(trainer, rollouts, timings)
        bar.update()
        bar.close()
    return _report(trainer, sdpo_config, rollouts, counts, token_level, timings, teacher_samples, seed, started)


@contextmanager
def _global_random_state_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global random states on exit (the trainer seeds all three)."""
    import numpy as np

    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def _check_arguments(train_dataset, args, sdpo_config, prompts: int, teacher_samples: int) -> SDPOConfig:
    """The SDPOConfig to measure with; a clear error for arguments preflight cannot measure."""
    for name, value in (("prompts", prompts), ("teacher_samples", teacher_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"preflight: {name}={value!r} must be an int >= 1.")
    if train_dataset is None or not hasattr(train_dataset, "select") or len(train_dataset) == 0:
        raise ValueError(
            f"preflight: train_dataset={train_dataset!r} has no rows: give a datasets.Dataset with a 'prompt' column "
            "(and the columns the reward functions read)."
        )
    if args is not None and args.num_generations is not None and args.num_generations < 2:
        raise ValueError(
            f"preflight: GRPOConfig.num_generations={args.num_generations} leaves no peers in a group, so no "
            "completion can get a demonstration and GRPO has no advantage: use num_generations >= 2."
        )
    if sdpo_config is None:
        sdpo_config = SDPOConfig()
    if not isinstance(sdpo_config, SDPOConfig):
        raise TypeError(f"preflight: sdpo_config must be an SDPOConfig, got {type(sdpo_config).__name__}.")
    return sdpo_config


def _trainer(model, tokenizer, dataset, reward_funcs, args, sdpo_config: SDPOConfig):
    """An SDPOTrainer that samples as training would, never saves or logs, and checkpoints no activations."""
    from trl import GRPOConfig

    from .trainer import SDPOTrainer

    output_dir = tempfile.mkdtemp(prefix="sdpo-preflight-")
    args = GRPOConfig(output_dir=output_dir) if args is None else copy.deepcopy(args)
    args.output_dir, args.report_to, args.save_strategy = output_dir, [], "no"
    args.activation_checkpointing = args.gradient_checkpointing = False
    args.disable_tqdm = True
    # The teacher must exist to render its prompts, also where the user's config trains without one.
    distilling = sdpo_config if sdpo_config.distills else replace(sdpo_config, enabled=True, grpo_weight=0.0)
    trainer = SDPOTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        reward_funcs=reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs],
        train_dataset=dataset,
        sdpo_config=distilling,
    )
    if trainer.tools or trainer.rollout_func is not None or trainer.environment_factories is not None:
        raise ValueError(
            "preflight samples the teacher with plain generation: tools, rollout_func and environments are not "
            "supported. Measure without them, or train and watch the self_distillation/teacher_edge metric."
        )
    if trainer.accelerator.num_processes > 1:
        raise ValueError("preflight runs in one process: start it with python, not accelerate launch or torchrun.")
    return trainer


def teacher_edge_counts(trainer, inputs: list[dict], teacher_batch, teacher_samples: int) -> dict[int, dict]:
    """Per local prompt index (its first row in `inputs`) and per kind of teacher prompt ("demonstration",
    "feedback_only"), the student's and the teacher's completion and success counts (`PromptCounts`).

    The teacher's are `teacher_samples` completions sampled by `trainer` (its generation settings) from the teacher
    prompt of every failed local completion that has one, scored by the trainer's reward functions against the
    completion's own dataset row. `inputs` are the rows `teacher_batch` was built from (groups of `num_generations`).
    """
    group = teacher_batch.num_generations
    local = range(teacher_batch.local.start, teacher_batch.local.stop)
    threshold = trainer.sdpo_config.success_reward_threshold
    successes = [_succeeded(teacher_batch.rewards[i], threshold) for i in local]
    counts: dict[int, dict[str, PromptCounts]] = {}
    asked = []  # (local index, kind)
    for i, global_index in enumerate(local):
        signal, prompt = teacher_batch.signals[global_index], teacher_batch.teacher_prompts[i]
        if successes[i] or not signal.has_signal or prompt is None:
            continue
        kind = DEMONSTRATION if signal.demonstration is not None else FEEDBACK_ONLY
        first = i - i % group
        if kind not in counts.setdefault(first, {}):
            counts[first][kind] = PromptCounts(student=group, student_successes=sum(successes[first : first + group]))
        asked.append((i, kind))
    if not asked:
        return counts
    prompt_ids = [teacher_batch.teacher_prompts[i].input_ids for i, _ in asked for _ in range(teacher_samples)]
    rows = [inputs[i] for i, _ in asked for _ in range(teacher_samples)]
    rewards = _scores(trainer, rows, _sample(trainer, prompt_ids))
    for n, (i, kind) in enumerate(asked):
        scored = rewards[n * teacher_samples : (n + 1) * teacher_samples]
        entry = counts[i - i % group][kind]
        entry.failures += 1
        entry.teacher += teacher_samples
        entry.teacher_successes += sum(_succeeded(r, threshold) for r in scored)
    return counts


def pooled_edge(counts: Sequence[dict[int, dict[str, PromptCounts]]], kinds: Sequence[str]) -> float | None:
    """Teacher minus student pass rate over every prompt with a teacher prompt of one of `kinds` (None: none)."""
    prompts = _prompt_totals(counts, kinds)
    return _edge_of(prompts) if prompts else None


def _prompt_totals(counts, kinds) -> list[PromptCounts]:
    """One `PromptCounts` per prompt: its student counts once, its teacher counts summed over `kinds`."""
    totals = []
    for call in counts:
        for by_kind in call.values():
            present = [by_kind[k] for k in kinds if k in by_kind]
            if present:
                total = PromptCounts(student=present[0].student, student_successes=present[0].student_successes)
                total.failures = sum(p.failures for p in present)
                total.teacher = sum(p.teacher for p in present)
                total.teacher_successes = sum(p.teacher_successes for p in present)
                totals.append(total)
    return totals


def _edge_of(prompts: Sequence[PromptCounts]) -> float:
    teacher = sum(p.teacher_successes for p in prompts) / sum(p.teacher for p in prompts)
    return teacher - sum(p.student_successes for p in prompts) / sum(p.student for p in prompts)


def _edge(counts, kinds: Sequence[str], seed: int) -> Edge:
    prompts = _prompt_totals(counts, kinds)
    if not prompts:
        return Edge(0, 0, None, None, None)
    draw = random.Random(seed)
    resampled = sorted(_edge_of(draw.choices(prompts, k=len(prompts))) for _ in range(BOOTSTRAP_RESAMPLES))
    low, high = resampled[int(0.025 * BOOTSTRAP_RESAMPLES)], resampled[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]
    return Edge(
        failures=sum(p.failures for p in prompts),
        prompts=len(prompts),
        teacher_pass_rate=sum(p.teacher_successes for p in prompts) / sum(p.teacher for p in prompts),
        student_pass_rate=sum(p.student_successes for p in prompts) / sum(p.student for p in prompts),
        edge=Interval(_edge_of(prompts), low, high),
    )


def _succeeded(reward: float, threshold: float) -> bool:
    return not math.isnan(reward) and reward >= threshold


def _sample(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Completion token ids sampled by the trainer's own generation from each of `prompt_ids`, in batches of its
    generation batch size."""
    size = trainer.args.generation_batch_size
    completions = []
    for start in range(0, len(prompt_ids), size):
        part = prompt_ids[start : start + size]
        completions.extend(trainer._generate_single_turn(part, None, {}, len(part))[0])
    return completions


def _scores(trainer, rows: list[dict], completion_ids: list[list[int]]) -> list[float]:
    """The trainer's total weighted reward of each completion, each scored against its dataset row."""
    from trl.data_utils import is_conversational

    texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    completions = [[{"role": "assistant", "content": t}] for t in texts] if is_conversational(rows[0]) else texts
    prompts = [row["prompt"] for row in rows]
    rewards_per_func = trainer._calculate_rewards(rows, prompts, completions, completion_ids)
    return total_rewards(rewards_per_func, trainer.reward_weights)


def _token_level(trainer, rollouts, timings: dict[str, float]) -> dict[str, float | None]:
    """`log_prob_gain` and `frame_share` over the failed completions with a teacher prompt (docs/preflight.md), and
    the time of the teacher's forwards over them, for `step_cost_vs_grpo`."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    settings = trainer.sdpo_config.loss_settings()
    threshold = trainer.sdpo_config.success_reward_threshold
    gains, frame, total = [], 0.0, 0.0
    for _, batch, teacher_batch in rollouts:
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        start = teacher_batch.local.start
        for i, teacher_prompt in enumerate(teacher_batch.teacher_prompts):
            signal = teacher_batch.signals[start + i]
            if teacher_prompt is None or _succeeded(teacher_batch.rewards[start + i], threshold):
                continue
            own_prompt = prompt_ids[i][prompt_mask[i] > 0]
            reprompt = torch.tensor(teacher_prompt.input_ids, device=own_prompt.device)
            completion = completion_ids[i][completion_mask[i] > 0]
            tick = time.perf_counter()
            teacher_logits = _logits(trainer, student, reprompt, completion, teacher=True)
            timings["teacher"] += time.perf_counter() - tick
            student_logits = _logits(trainer, student, own_prompt, completion, teacher=False)
            divergence = per_token_divergence(student_logits, teacher_logits, completion[None], settings=settings)[0]
            frame += float(divergence[:FRAME_POSITIONS].sum())
            total += float(divergence.sum())
            if signal.demonstration_index is not None:
                j = signal.demonstration_index - start
                success = completion_ids[j][completion_mask[j] > 0]
                on_reprompt = _logits(trainer, student, reprompt, success, teacher=True)
                on_prompt = _logits(trainer, student, own_prompt, success, teacher=False)
                gain = sampled_token_logps(on_reprompt, success[None]) - sampled_token_logps(on_prompt, success[None])
                gains.append(float(gain.mean()))
    return {
        "log_prob_gain": sum(gains) / len(gains) if gains else None,
        "frame_share": frame / total if total > 0 else None,
    }


def _logits(trainer, student, prompt: torch.Tensor, completion: torch.Tensor, *, teacher: bool) -> torch.Tensor:
    """``[1, T, V]`` tempered logits of `completion` after `prompt`, from the teacher or the student, no gradient."""
    ids = torch.cat([prompt, completion])[None]
    mask = torch.ones_like(ids)
    with torch.no_grad(), trainer.accelerator.autocast():
        if teacher:
            logits = trainer.teacher.completion_logits(student, ids, mask, completion.numel())
        else:
            logits = no_grad_logits(student, ids, mask, completion.numel())
    return logits.float() / trainer.temperature


def _report(trainer, sdpo_config, rollouts, counts, token_level, timings, teacher_samples, seed, started):
    threshold = sdpo_config.success_reward_threshold
    group = trainer.num_generations
    rewards = [r for _, _, tb in rollouts for r in tb.rewards]
    signals = [s for _, _, tb in rollouts for s in tb.signals]
    successes = [_succeeded(r, threshold) for r in rewards]
    groups = [successes[i : i + group] for i in range(0, len(successes), group)]
    advantages = torch.cat([batch["advantages"].reshape(-1) for _, batch, _ in rollouts])
    failed = [s for s, ok in zip(signals, successes, strict=True) if not ok]
    n = len(signals)
    edges = {
        "edge": _edge(counts, EDGE_KINDS, seed),
        "edge_demonstration": _edge(counts, (DEMONSTRATION,), seed),
        "edge_feedback_only": _edge(counts, (FEEDBACK_ONLY,), seed),
    }
    finite = [r for r in rewards if not math.isnan(r)]
    report = PreflightReport(
        prompts=len(groups),
        num_generations=group,
        teacher_samples=teacher_samples,
        student_pass_rate=sum(successes) / n,
        student_mean_reward=sum(finite) / len(finite) if finite else math.nan,
        groups_without_success=sum(not any(g) for g in groups) / len(groups),
        groups_with_some_success=sum(any(g) and not all(g) for g in groups) / len(groups),
        groups_all_successful=sum(all(g) for g in groups) / len(groups),
        grpo_signal_fraction=float((advantages != 0).float().mean()),
        demonstration_only=sum(s.demonstration is not None and s.feedback is None for s in signals) / n,
        feedback_only=sum(s.demonstration is None and s.feedback is not None for s in signals) / n,
        demonstration_and_feedback=sum(s.demonstration is not None and s.feedback is not None for s in signals) / n,
        no_signal=sum(not s.has_signal for s in signals) / n,
        failed_with_signal=sum(s.has_signal for s in failed) / len(failed) if failed else None,
        **edges,
        log_prob_gain=token_level["log_prob_gain"],
        frame_share=token_level["frame_share"],
        step_cost_vs_grpo=_step_cost(timings, len(rollouts)),
        verdict="",
        reason="",
    )
    report.verdict, report.reason, report.recommended_config = recommend(report)
    report.seconds = time.perf_counter() - started
    return report


def _step_cost(timings: dict[str, float], calls: int) -> float:
    """A rough cost of an SDPO step relative to GRPO's: GRPO's step taken as its rollout (generation and rewards) plus a
    forward and backward of the student, about three forwards, which the teacher's forwards add to."""
    return 1.0 + timings["teacher"] / max(timings["rollout"], 1e-9) if calls else math.nan


def recommend(report: PreflightReport) -> tuple[str, str, dict[str, Any]]:
    """`(verdict, reason, SDPOConfig fields to set)` from a report's measures, by the rules of docs/preflight.md."""
    if report.failed_with_signal is None:
        return (
            "grpo",
            "every completion already succeeds, so neither GRPO nor SDPO has anything to learn from these prompts.",
            {"enabled": False},
        )
    edge = report.edge.edge
    if not report.failed_with_signal or edge is None:
        return (
            "grpo",
            "no failed completion gets a demonstration or feedback, so the teacher has nothing to teach.",
            {"enabled": False},
        )
    interval = f"{edge.value:+.3f} [{edge.low:+.3f}, {edge.high:+.3f}]"
    if report.edge.prompts < MIN_EDGE_PROMPTS:
        return (
            "grpo",
            f"only {report.edge.prompts} prompts had a failed completion with a teacher prompt (edge {interval}), "
            f"fewer than the {MIN_EDGE_PROMPTS} a verdict needs: measure more prompts before choosing SDPO.",
            {"enabled": False},
        )
    if edge.low <= 0:
        return (
            "grpo",
            f"the teacher is not clearly better than the student (edge {interval}), so distillation has nothing "
            "reliable to teach.",
            {"enabled": False},
        )
    return (
        "hybrid",
        f"the teacher knows more (edge {interval}): add its distillation to GRPO's loss at weight "
        f"{1 - HYBRID_GRPO_WEIGHT:.1f}, since pure self-distillation collapsed at 135M even where the teacher clearly "
        "knew more.",
        {"grpo_weight": HYBRID_GRPO_WEIGHT},
    )
