"""The teacher's side of a generation batch: which completions are distilled, and the teacher prompts they get.

`TeacherBatchBuilder.build` turns what the reward step kept (`_Rollout`) and TRL's generation batch into a
`TeacherBatch` (docs/how-it-works.md sections 2-3): each completion's demonstration and feedback chosen over its whole
group, the distilled completions (all with a signal, or the routed ones), their teacher (and hindsight frame) prompts
rendered and padded, the loss normaliser, the stabilisers' token weights and the teacher metrics. Compare TRL's
`SuccessfulRolloutTeacherContextBuilder`, which builds a teacher context from a group's successful rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from trl.trainer.utils import pad

from .config import SDPOConfig
from .metrics import (
    ROUTED_GRPO_FRACTION,
    ROUTED_SDPO_FRACTION,
    TEACHER_PROMPT_LENGTH_MEAN,
    TEACHER_PROMPT_TRUNCATED_COUNT,
    teacher_signal_metrics,
)
from .reprompt import TeacherPrompt, TeacherSignal, render_teacher_prompt, select_teacher_signals, without_hindsight
from .stabilisers import entropy_weights, normalise_to_mean_one, pass_rate_weights, routed_to_distillation


@dataclass
class _Rollout:
    """What `_calculate_rewards` saw of the local batch; consumed by `rollout_with_teacher_batch`."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor  # [global batch, num reward functions], gathered by TRL
    feedback: list[str]


@dataclass
class TeacherBatch:
    """The teacher's side of one generation batch: the batch tensors, and how they were chosen.

    `rewards`, `signals` and `distilled` cover the whole (global) generation batch, in groups of `num_generations`;
    `teacher_prompts` the local completions (`local` is their slice of the global batch), None where not distilled.
    """

    tensors: dict[str, torch.Tensor]  # teacher prompts, distillation mask, normaliser, weights: added to TRL's batch
    rewards: list[float]  # total weighted reward per completion (NaN: no reward function scored it)
    signals: list[TeacherSignal]
    distilled: list[bool]
    local: slice
    teacher_prompts: list[TeacherPrompt | None]
    num_generations: int


def total_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> list[float]:
    """Each completion's total weighted reward, on which success is judged; NaN where no reward function scored it.

    rewards_per_func: ``[N, num reward functions]`` as TRL's `_calculate_rewards` returns them.
    """
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return rewards.tolist()


@dataclass
class TeacherBatchBuilder:
    """Builds the `TeacherBatch` of one generation batch from what the trainer holds for it (`SDPOTrainer` makes one
    per batch, `_teacher_batch_builder`, as the mode and the group size change between training and evaluation)."""

    config: SDPOConfig
    tokenizer: Any
    chat_template_kwargs: dict[str, Any]  # the student's, as TRL renders its prompts, then the SDPOConfig's
    accelerator: Accelerator
    num_generations: int
    reward_weights: torch.Tensor
    teacher_entropy: Callable[[dict[str, torch.Tensor]], torch.Tensor]  # ``[B, T]``, for the entropy weights
    metrics: dict[str, list]  # the trainer's metrics of this mode ("train" or "eval")
    logged_prompts: list[str]  # the trainer's log of teacher prompts, one per completion ("" when none)

    def build(self, rollout: _Rollout, batch: dict[str, Any]) -> TeacherBatch:
        """The `TeacherBatch` of TRL's generation `batch`, whose rewards and feedback `rollout` kept."""
        config = self.config
        device = self.accelerator.device
        rewards = total_rewards(rollout.rewards_per_func, self.reward_weights)

        # Demonstrations are searched over the whole group, which may span processes: gather texts and feedback.
        local_count = len(rollout.prompts)
        texts = gather_object(self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True))
        feedback = gather_object(rollout.feedback)
        signals = select_teacher_signals(texts, rewards, feedback, self.num_generations, config.signal_settings())
        distilled = [s.has_signal for s in signals]
        if config.sample_routing:
            distilled = routed_to_distillation(rewards, distilled, config.success_reward_threshold)
        start = self.accelerator.process_index * local_count
        local = slice(start, start + local_count)

        teacher_prompts = self.render_prompts(rollout.prompts, signals[local], distilled[local], start)
        outputs = self.pad_prompts(teacher_prompts, "teacher_prompt")
        if config.hindsight_contrast is not None:
            frames = [without_hindsight(s) for s in signals[local]]
            frame_prompts = self.render_prompts(rollout.prompts, frames, distilled[local], start)
            outputs.update(self.pad_prompts(frame_prompts, "frame_prompt"))
        outputs["self_distillation_mask"] = torch.tensor([float(d) for d in distilled[local]], device=device)

        # Normaliser of the loss over the whole generation batch, so that accumulated micro-batches sum to the loss
        # of one big batch (`distillation.DistillationStep._loss_normalizer`). With routing both losses share it:
        # every valid token counts.
        valid = batch["completion_mask"] * batch.get("tool_mask", 1)
        counted = valid if config.sample_routing else valid * outputs["self_distillation_mask"].unsqueeze(1)
        local_items = counted.sum() if config.loss_agg_mode == "token-mean" else (counted.sum(1) > 0).sum().float()
        outputs["num_self_distillation_items"] = self.accelerator.gather(local_items.reshape(1)).sum()

        weight = self.distillation_weights(rewards, distilled, local, {**batch, **outputs})
        if weight is not None:
            outputs["self_distillation_weight"] = weight
        self.log_metrics(signals, rewards, feedback, teacher_prompts, distilled)
        return TeacherBatch(outputs, rewards, signals, distilled, local, teacher_prompts, self.num_generations)

    def render_prompts(self, prompts, signals, distilled, start: int) -> list[TeacherPrompt | None]:
        """The teacher prompt of each local completion that is distilled (None for the others)."""
        return [
            render_teacher_prompt(
                prompt,
                signal,
                self.tokenizer,
                self.config.template_settings(),
                chat_template_kwargs=self.chat_template_kwargs,
                sample_index=start + i,
            )
            if is_distilled
            else None
            for i, (prompt, signal, is_distilled) in enumerate(zip(prompts, signals, distilled, strict=True))
        ]

    def pad_prompts(self, prompts: list[TeacherPrompt | None], name: str) -> dict[str, torch.Tensor]:
        """``{name}_ids`` and ``{name}_mask``: the prompts left-padded to ``[B, P]`` (an empty row for None)."""
        ids = [torch.tensor(p.input_ids if p else [], dtype=torch.long) for p in prompts]
        masks = [torch.ones_like(row) for row in ids]
        if max(len(row) for row in ids) == 0:  # no teacher prompt here: keep one padding column
            ids[0] = torch.tensor([self.tokenizer.pad_token_id])
            masks[0] = torch.zeros(1, dtype=torch.long)
        device = self.accelerator.device
        return {
            f"{name}_ids": pad(ids, padding_value=self.tokenizer.pad_token_id, padding_side="left").to(device),
            f"{name}_mask": pad(masks, padding_value=0, padding_side="left").to(device),
        }

    def distillation_weights(self, rewards, distilled, local: slice, batch) -> torch.Tensor | None:
        """``[B, T]`` weights of the distilled tokens (mean 1 over the generation batch), or None when unweighted."""
        config = self.config
        mask = batch["self_distillation_mask"].unsqueeze(1) * batch["completion_mask"] * batch.get("tool_mask", 1)
        weight = None
        if config.pass_rate_weighting:
            rates = pass_rate_weights(rewards, distilled, self.num_generations, config.success_reward_threshold)
            weight = torch.tensor(rates[local], device=mask.device).unsqueeze(1) * mask
        if config.teacher_entropy_weighting is not None:
            raw = entropy_weights(self.teacher_entropy(batch), config.teacher_entropy_weighting)
            totals = self.accelerator.reduce(torch.stack([(raw * mask).sum(), mask.sum()]).float(), reduction="sum")
            entropy_weight = normalise_to_mean_one(raw, mask, totals[0], totals[1])
            weight = entropy_weight if weight is None else weight * entropy_weight
        return weight

    def log_metrics(self, signals, rewards, feedback, teacher_prompts, distilled) -> None:
        """The teacher metrics of the batch (`metrics.teacher_signal_metrics`, routing, prompt lengths), and every
        process's teacher prompts in the trainer's log."""
        config = self.config
        metrics = teacher_signal_metrics(
            signals,
            rewards,
            feedback,
            self.num_generations,
            config.success_reward_threshold,
            include_environment_feedback=config.include_environment_feedback,
        )
        if config.sample_routing:
            metrics[ROUTED_SDPO_FRACTION] = sum(distilled) / len(distilled)
            metrics[ROUTED_GRPO_FRACTION] = 1.0 - sum(distilled) / len(distilled)
        every_process_prompts = gather_object(teacher_prompts)
        rendered = [p for p in every_process_prompts if p is not None]
        metrics[TEACHER_PROMPT_LENGTH_MEAN] = (
            sum(len(p.input_ids) for p in rendered) / len(rendered) if rendered else math.nan
        )
        metrics[TEACHER_PROMPT_TRUNCATED_COUNT] = float(sum(p.truncated for p in rendered))
        for name, value in metrics.items():
            self.metrics[name].append(value)
        self.logged_prompts.extend(p.text if p is not None else "" for p in every_process_prompts)
