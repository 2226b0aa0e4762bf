"""`SDPOConfig`: every SDPO setting, its default, and its validation.

Defaults are the reference's, except where docs/deviations.md says otherwise. Every field is validated when the
config is built, and a bad value raises `ValueError` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass, field, fields
from typing import Any

from .loss import LOSS_AGG_MODES, LossSettings
from .reprompt import (
    DEFAULT_FEEDBACK_TEMPLATE,
    DEFAULT_REPROMPT_TEMPLATE,
    DEFAULT_SOLUTION_TEMPLATE,
    REPROMPT_TRUNCATIONS,
    SignalSettings,
    TemplateSettings,
)

TEACHER_MODES = ("ema", "frozen", "lora_ema", "trust_region")

# Placeholders each template must contain, and the only ones it may contain.
TEMPLATE_PLACEHOLDERS = {
    "solution_template": {"successful_previous_attempt"},
    "feedback_template": {"feedback_raw"},
    "reprompt_template": {"prompt", "solution", "feedback"},
}


@dataclass
class SDPOConfig:
    """Settings of Self-Distilled Policy Optimization, passed to `SDPOTrainer` next to a `trl.GRPOConfig`.

    See docs/configuration.md for the meaning of each field and how it relates to the reference implementation.
    """

    enabled: bool = field(
        default=True,
        metadata={"help": "Use the SDPO loss. `False` makes SDPOTrainer behave exactly like GRPOTrainer."},
    )
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation of the generalised Jensen-Shannon divergence: 0 = forward KL(teacher||student), "
            "1 = reverse KL(student||teacher), 0.5 = symmetric JSD."
        },
    )
    full_logit_distillation: bool = field(
        default=True,
        metadata={
            "help": "Distil the teacher's next-token distribution (top-K or full vocabulary). `False` uses the "
            "sampled-token estimator, which requires alpha=1."
        },
    )
    distillation_topk: int | None = field(
        default=100,
        metadata={"help": "Number of the student's most likely tokens to distil over; `None` = full vocabulary."},
    )
    distillation_add_tail: bool = field(
        default=True,
        metadata={
            "help": "Add a bucket holding the probability mass outside the top-K; otherwise renormalise over the K."
        },
    )
    is_clip: float | None = field(
        default=2.0,
        metadata={"help": "Upper clip of the per-token importance-sampling ratio pi/pi_old; `None` disables it."},
    )
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": f"How per-token losses are averaged: one of {LOSS_AGG_MODES}."},
    )
    teacher_mode: str = field(
        default="ema",
        metadata={"help": f"Where the teacher's weights come from: one of {TEACHER_MODES}."},
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata={
            "help": "EMA rate r of the teacher update theta_T <- (1 - r) theta_T + r theta_S after each optimizer "
            "step (`ema`, `lora_ema`); weight r of the current policy's logits for `trust_region`."
        },
    )
    grpo_weight: float = field(
        default=0.0,
        metadata={
            "help": "Hybrid SDPO+GRPO: the loss is grpo_weight * GRPO loss + (1 - grpo_weight) * SDPO loss. "
            "0 = pure SDPO, 1 = pure GRPO (no teacher is built, same as enabled=False)."
        },
    )
    sample_routing: bool = field(
        default=False,
        metadata={
            "help": "SRPO's sample routing: failed completions with a teacher signal get the distillation loss only, "
            "every other completion TRL's GRPO loss; both share one token denominator. Needs grpo_weight=0 and a "
            "GRPOConfig.loss_type normalised by the batch's token count ('dapo', 'cispo' or 'vespo')."
        },
    )
    teacher_entropy_weighting: float | None = field(
        default=None,
        metadata={
            "help": "SRPO's entropy weighting: beta > 0 weights each distilled token by exp(-beta * H_teacher), "
            "normalised to mean 1 over the generation batch (the paper uses 1.0); None = off."
        },
    )
    pass_rate_weighting: bool = field(
        default=False,
        metadata={
            "help": "SC-SDPO's pass-rate weighting: each prompt's distillation loss is weighted by sqrt(p(1 - p)), p "
            "its group's success rate this step, normalised to mean 1 over the distilled completions."
        },
    )
    hindsight_contrast: float | None = field(
        default=None,
        metadata={
            "help": "Hindsight contrast (this library's hypothesis): gamma > 0 distils toward z_S + gamma * "
            "(z_teacher - z_frame), z_frame the teacher on the same reprompt with the demonstration and feedback "
            "emptied, so that the reprompt's frame cancels; None = off (the plain teacher)."
        },
    )
    teacher_edge_every: int | None = field(
        default=None,
        metadata={
            "help": "Every this many optimizer steps, sample one completion from the teacher prompt of each failed "
            "completion and log self_distillation/teacher_edge, the teacher's pass rate minus the student's on those "
            "prompts (docs/preflight.md); None = off. Costs one generation of those prompts on such a step."
        },
    )
    apply_chat_template_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Extra keyword arguments for the chat template of the teacher prompt, applied on top of "
            "GRPOConfig.chat_template_kwargs (which the student's prompt uses)."
        },
    )
    success_reward_threshold: float = field(
        default=1.0,
        metadata={"help": "A completion whose total weighted reward is >= this value is a successful demonstration."},
    )
    dont_reprompt_on_self_success: bool = field(
        default=True,
        metadata={"help": "Never show a completion its own success as the demonstration; use a peer's instead."},
    )
    remove_thinking_from_demonstration: bool = field(
        default=True,
        metadata={"help": "Strip <think>...</think> blocks from the demonstration."},
    )
    include_environment_feedback: bool = field(
        default=True,
        metadata={"help": "Put the reward functions' feedback (`last_feedback`) into the teacher prompt."},
    )
    environment_feedback_only_without_solution: bool = field(
        default=True,
        metadata={"help": "Use feedback only for completions that have no demonstration."},
    )
    max_reprompt_length: int = field(
        default=10240,
        metadata={"help": "Maximum number of tokens of the rendered teacher prompt."},
    )
    reprompt_truncation: str = field(
        default="right",
        metadata={
            "help": "How an over-long teacher prompt is shortened: 'right' cuts the end of the demonstration and "
            "feedback, 'left' their start, 'error' raises. The task and the chat scaffolding are never cut."
        },
    )
    solution_template: str = field(
        default=DEFAULT_SOLUTION_TEMPLATE,
        metadata={"help": "Template of the demonstration block; placeholder {successful_previous_attempt}."},
    )
    feedback_template: str = field(
        default=DEFAULT_FEEDBACK_TEMPLATE,
        metadata={"help": "Template of the feedback block; placeholder {feedback_raw}."},
    )
    reprompt_template: str = field(
        default=DEFAULT_REPROMPT_TEMPLATE,
        metadata={"help": "Template of the teacher's task text; placeholders {prompt}, {solution}, {feedback}."},
    )

    @property
    def distills(self) -> bool:
        """Whether a teacher is built and the distillation loss used (False = exactly GRPO)."""
        return self.enabled and self.grpo_weight < 1.0

    def loss_settings(self) -> LossSettings:
        """The settings of the distillation loss (`sdpo_rl.loss`)."""
        return self._settings(LossSettings)

    def signal_settings(self) -> SignalSettings:
        """How each completion's demonstration and feedback are chosen (`sdpo_rl.reprompt.select_teacher_signals`)."""
        return self._settings(SignalSettings)

    def template_settings(self) -> TemplateSettings:
        """How the teacher prompt is written and fitted (`sdpo_rl.reprompt.render_teacher_prompt`)."""
        return self._settings(TemplateSettings)

    def _settings(self, settings_class):
        """`settings_class` (a dataclass whose fields are a subset of this config's) with this config's values."""
        return settings_class(**{f.name: getattr(self, f.name) for f in fields(settings_class)})

    def __post_init__(self) -> None:
        for name in (
            "enabled",
            "full_logit_distillation",
            "distillation_add_tail",
            "dont_reprompt_on_self_success",
            "remove_thinking_from_demonstration",
            "include_environment_feedback",
            "environment_feedback_only_without_solution",
        ):
            if not isinstance(getattr(self, name), bool):
                _reject(name, getattr(self, name), "True or False")
        _check_number("alpha", self.alpha, 0.0, 1.0)
        if self.distillation_topk is not None and (
            isinstance(self.distillation_topk, bool)
            or not isinstance(self.distillation_topk, int)
            or self.distillation_topk < 1
        ):
            _reject("distillation_topk", self.distillation_topk, "an integer >= 1, or None for the full vocabulary")
        if self.is_clip is not None:
            _check_number("is_clip", self.is_clip, 0.0, math.inf, low_open=True)
        _check_choice("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _check_choice("teacher_mode", self.teacher_mode, TEACHER_MODES)
        _check_number("teacher_update_rate", self.teacher_update_rate, 0.0, 1.0, low_open=True)
        _check_number("grpo_weight", self.grpo_weight, 0.0, 1.0)
        if not isinstance(self.apply_chat_template_kwargs, dict):
            _reject("apply_chat_template_kwargs", self.apply_chat_template_kwargs, "a dict of keyword arguments")
        _check_number("success_reward_threshold", self.success_reward_threshold, -math.inf, math.inf)
        if (
            isinstance(self.max_reprompt_length, bool)
            or not isinstance(self.max_reprompt_length, int)
            or self.max_reprompt_length < 1
        ):
            _reject("max_reprompt_length", self.max_reprompt_length, "an integer >= 1")
        _check_choice("reprompt_truncation", self.reprompt_truncation, REPROMPT_TRUNCATIONS)
        for name, placeholders in TEMPLATE_PLACEHOLDERS.items():
            _check_template(name, getattr(self, name), placeholders)
        for name in ("sample_routing", "pass_rate_weighting"):
            if not isinstance(getattr(self, name), bool):
                _reject(name, getattr(self, name), "True or False")
        for name in ("teacher_entropy_weighting", "hindsight_contrast"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), 0.0, math.inf, low_open=True)
        if self.teacher_edge_every is not None and (
            isinstance(self.teacher_edge_every, bool)
            or not isinstance(self.teacher_edge_every, int)
            or self.teacher_edge_every < 1
        ):
            _reject("teacher_edge_every", self.teacher_edge_every, "an integer >= 1 (steps), or None for off")
        if self.sample_routing and self.grpo_weight != 0.0:
            raise ValueError(
                f"SDPOConfig.sample_routing=True with grpo_weight={self.grpo_weight!r}: routing already gives every "
                "completion that is not distilled TRL's GRPO loss, with no mixing weight. Set grpo_weight=0.0, or "
                "sample_routing=False for the blended hybrid."
            )
        if self.sample_routing and self.loss_agg_mode != "token-mean":
            raise ValueError(
                f"SDPOConfig.sample_routing=True with loss_agg_mode={self.loss_agg_mode!r}: routing sums both losses "
                "over one shared token count. Set loss_agg_mode='token-mean'."
            )
        if not self.full_logit_distillation and self.alpha != 1.0:
            raise ValueError(
                f"SDPOConfig.full_logit_distillation=False (sampled-token distillation) needs alpha=1.0, got "
                f"alpha={self.alpha!r}: the sampled-token estimator only exists for the reverse KL. Set alpha=1.0 "
                "or full_logit_distillation=True."
            )


def _reject(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SDPOConfig.{name}={value!r} is invalid: expected {allowed}.")


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    """Reject non-numbers, NaN and values outside [low, high] (or (low, high] with `low_open`)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if math.isinf(high) else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _reject(name, value, f"a number in {interval}")
    if math.isinf(value) or value < low or value > high or (low_open and value == low):
        _reject(name, value, f"a finite number in {interval}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _reject(name, value, f"one of {', '.join(repr(c) for c in choices)}")


def _check_template(name: str, template: Any, placeholders: set[str]) -> None:
    """A template must parse as a `str.format` string and use exactly its own placeholders."""
    if not isinstance(template, str):
        _reject(name, template, "a string")
    try:
        used = {field_name for _, field_name, _, _ in string.Formatter().parse(template) if field_name is not None}
    except ValueError as error:
        raise ValueError(
            f"SDPOConfig.{name}={template!r} is not a valid str.format template ({error}). Write a literal brace as "
            "'{{' or '}}'."
        ) from error
    unknown = used - placeholders
    missing = placeholders - used
    if unknown or missing:
        allowed = ", ".join("{" + p + "}" for p in sorted(placeholders))
        problems = []
        if missing:
            problems.append("missing " + ", ".join("{" + p + "}" for p in sorted(missing)))
        if unknown:
            problems.append("unknown " + ", ".join("{" + p + "}" for p in sorted(unknown)))
        raise ValueError(
            f"SDPOConfig.{name}={template!r} is invalid ({'; '.join(problems)}): it must contain exactly the "
            f"placeholders {allowed}. Write a literal brace as '{{{{' or '}}}}'."
        )
