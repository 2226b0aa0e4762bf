"""The names of the logged metrics, defined once, and the `self_distillation/*` fractions of one generation batch.

Every module that logs or reads a metric by name imports it from here (docs/how-it-works.md §6 says what each one
means). `teacher_signal_metrics` computes the signal fractions from plain Python values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .reprompt import TeacherSignal

# Logged by TRL's GRPOTrainer.
REWARD = "reward"
ENTROPY = "entropy"  # the student's mean next-token entropy over the completion tokens, in TRL's GRPO loss
COMPLETION_LENGTH = "completions/mean_length"
STEP_TIME = "step_time"

# Logged by SDPOTrainer.
PREFIX = "self_distillation/"
SUCCESS_GROUP_FRACTION = PREFIX + "success_group_fraction"
SUCCESS_SAMPLE_FRACTION = PREFIX + "success_sample_fraction"
FEEDBACK_AVAILABLE_FRACTION = PREFIX + "feedback_available_fraction"
FEEDBACK_USED_FRACTION = PREFIX + "feedback_used_fraction"
REPROMPT_SAMPLE_FRACTION = PREFIX + "reprompt_sample_fraction"
TEACHER_PROMPT_LENGTH_MEAN = PREFIX + "teacher_prompt_length_mean"
TEACHER_PROMPT_TRUNCATED_COUNT = PREFIX + "teacher_prompt_truncated_count"
DISTILLATION_LOSS = PREFIX + "distillation_loss"
GRPO_LOSS = PREFIX + "grpo_loss"
STUDENT_ENTROPY = PREFIX + "student_entropy"
TEACHER_ENTROPY = PREFIX + "teacher_entropy"
NONFINITE_STEP = PREFIX + "nonfinite_step"
ROUTED_SDPO_FRACTION = PREFIX + "routed_sdpo_fraction"
ROUTED_GRPO_FRACTION = PREFIX + "routed_grpo_fraction"
TEACHER_EDGE = PREFIX + "teacher_edge"  # with SDPOConfig.teacher_edge_every (docs/preflight.md)
# 1 per forward or sampling call that took the fast path, 0 per call that fell back (an info line names why, once).
PROMPT_SHARING = PREFIX + "prompt_sharing"  # each distinct prompt run once; logged on a CPU in one process
ONE_PASS_HYBRID = PREFIX + "one_pass_hybrid"  # one student forward for both of the hybrid's terms


def teacher_signal_metrics(
    signals: Sequence[TeacherSignal],
    rewards: Sequence[float],
    feedback: Sequence[str | None],
    num_generations: int,
    success_reward_threshold: float,
    *,
    include_environment_feedback: bool = True,
) -> dict[str, float]:
    """Fractions describing how many completions got a teacher signal, over the whole (global) batch.

    - `success_group_fraction`: groups with at least one successful completion;
    - `success_sample_fraction`: completions that received a demonstration;
    - `feedback_available_fraction`: completions with non-empty feedback the teacher may read: 0 when
      `include_environment_feedback` is False (`SDPOConfig`), since the teacher then never reads feedback;
    - `feedback_used_fraction`: completions whose teacher prompt contains feedback;
    - `reprompt_sample_fraction`: completions with any teacher signal (the mean self-distillation mask).
    """
    count = len(signals)
    if count == 0:
        return {}
    successes = [not math.isnan(r) and r >= success_reward_threshold for r in rewards]
    groups = [successes[start : start + num_generations] for start in range(0, count, num_generations)]
    available = sum(bool(f and f.strip()) for f in feedback) if include_environment_feedback else 0
    return {
        SUCCESS_GROUP_FRACTION: sum(any(group) for group in groups) / len(groups),
        SUCCESS_SAMPLE_FRACTION: sum(s.demonstration is not None for s in signals) / count,
        FEEDBACK_AVAILABLE_FRACTION: available / count,
        FEEDBACK_USED_FRACTION: sum(s.feedback is not None for s in signals) / count,
        REPROMPT_SAMPLE_FRACTION: sum(s.has_signal for s in signals) / count,
    }
