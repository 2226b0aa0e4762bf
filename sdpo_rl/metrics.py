"""The `self_distillation/*` metrics of one generation batch, from plain Python values (docs/how-it-works.md §6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .reprompt import TeacherSignal

PREFIX = "self_distillation/"


def teacher_signal_metrics(
    signals: Sequence[TeacherSignal],
    rewards: Sequence[float],
    feedback: Sequence[str | None],
    num_generations: int,
    success_reward_threshold: float,
) -> dict[str, float]:
    """Fractions describing how many completions got a teacher signal, over the whole (global) batch.

    - `success_group_fraction`: groups with at least one successful completion;
    - `success_sample_fraction`: completions that received a demonstration;
    - `feedback_available_fraction`: completions with non-empty feedback;
    - `feedback_used_fraction`: completions whose teacher prompt contains feedback;
    - `reprompt_sample_fraction`: completions with any teacher signal (the mean self-distillation mask).
    """
    count = len(signals)
    if count == 0:
        return {}
    successes = [not math.isnan(r) and r >= success_reward_threshold for r in rewards]
    groups = [successes[start : start + num_generations] for start in range(0, count, num_generations)]
    return {
        PREFIX + "success_group_fraction": sum(any(group) for group in groups) / len(groups),
        PREFIX + "success_sample_fraction": sum(s.demonstration is not None for s in signals) / count,
        PREFIX + "feedback_available_fraction": sum(bool(f and f.strip()) for f in feedback) / count,
        PREFIX + "feedback_used_fraction": sum(s.feedback is not None for s in signals) / count,
        PREFIX + "reprompt_sample_fraction": sum(s.has_signal for s in signals) / count,
    }
