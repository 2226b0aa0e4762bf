"""`SDPOTrainer`: TRL's GRPOTrainer with the GRPO policy-gradient loss replaced by self-distillation.

The trainer is glue over four of GRPOTrainer's extension points (listed in `_trl_compat`):

1. `_calculate_rewards`: after the reward functions ran, keep what the teacher needs (prompts, completion tokens,
   total rewards, feedback).
2. `_generate_and_score_completions`: after TRL built the batch, choose each completion's demonstration and feedback
   over its whole group, render the teacher prompts, and add `teacher_prompt_ids`, `teacher_prompt_mask` and
   `self_distillation_mask` to the batch (TRL then shuffles and splits it like every other batch tensor).
3. `_compute_loss`: student forward on prompt + completion, teacher forward on teacher prompt + the same completion,
   the distillation loss of `sdpo_rl.loss`.
4. After each optimizer step the teacher is updated (a callback), unless the gradient norm was not finite.
5. `log`: after TRL logged a step, look for the signs of a collapse (`sdpo_rl.monitor`) and warn once.
6. `_save_checkpoint` / `_load_from_checkpoint` / `_save`: the teacher goes into every checkpoint and comes back on
   resume; a saved model holds the student only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from . import _trl_compat
from .config import SDPOConfig
from .feedback import FEEDBACK_COLUMN, ReturnRecorder, collect_feedback, record_returns, snapshot_feedback
from .forward import HeadInputs, completion_hidden, completion_logits, linear_head
from .loss import self_distillation_loss, token_entropy
from .loss_chunked import self_distillation_loss_from_hidden
from .metrics import PREFIX, teacher_signal_metrics
from .monitor import ADVICE, collapse_signs
from .reprompt import (
    TeacherPrompt,
    check_prompts_end_with_user_turn,
    render_teacher_prompt,
    select_teacher_signals,
)
from .teacher import Teacher, build_teacher
from .teacher_checkpoint import hidden_teacher_adapter, load_teacher, save_teacher

TEACHER_DIR = "teacher"
logger = logging.getLogger(__name__)


@dataclass
class _Rollout:
    """What `_calculate_rewards` saw of the local batch; consumed by `_generate_and_score_completions`."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor  # [global batch, num reward functions], gathered by TRL
    feedback: list[str]


class _TeacherUpdateCallback(TrainerCallback):
    """Updates the teacher after every optimizer step (docs/teachers.md)."""

    def __init__(self, trainer: SDPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._update_teacher()


class SDPOTrainer(GRPOTrainer):
    """Self-Distilled Policy Optimization on top of `trl.GRPOTrainer`.

    Accepts every argument of `GRPOTrainer`, plus `sdpo_config` (an `SDPOConfig`, default `SDPOConfig()`). With
    `SDPOConfig(enabled=False)` it is exactly GRPOTrainer.
    """

    _tag_names = ["trl", "grpo", "sdpo"]

    def __init__(self, *args: Any, sdpo_config: SDPOConfig | None = None, **kwargs: Any):
        if sdpo_config is None:
            sdpo_config = SDPOConfig()
        if not isinstance(sdpo_config, SDPOConfig):
            raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(sdpo_config).__name__}.")
        arguments = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs)
        if isinstance(arguments.arguments.get("reward_funcs"), list):  # GRPOTrainer edits the list it is given
            arguments.arguments["reward_funcs"] = list(arguments.arguments["reward_funcs"])
        grpo_config = arguments.arguments.get("args")
        if sdpo_config.distills and sdpo_config.grpo_weight == 0.0 and grpo_config is not None and grpo_config.beta:
            raise ValueError(
                f"GRPOConfig.beta={grpo_config.beta} weights a KL penalty of the GRPO loss, which pure SDPO replaces, "
                "so it would be silently ignored. Set beta=0.0, or SDPOConfig(grpo_weight=...) > 0 to keep a GRPO "
                "term (the hybrid), or SDPOConfig(enabled=False) to train with GRPO."
            )
        self.sdpo_config = dataclasses.replace(sdpo_config)  # a private copy: later edits of the caller's do nothing
        self._sdpo_rollout: _Rollout | None = None
        self._last_grad_norm_finite = True
        self._collapse_warned = False
        super().__init__(*arguments.args[1:], **arguments.kwargs)
        _trl_compat.check_trainer_attributes(self)
        self._check_chat_template()
        # Keep each reward function's returned values, to read the feedback of `Scored` rewards.
        self.reward_funcs = [f if isinstance(f, nn.Module) else record_returns(f) for f in self.reward_funcs]
        self.teacher: Teacher | None = None
        if self.sdpo_config.distills:
            self.teacher = build_teacher(self.sdpo_config, self.model)
            self.add_callback(_TeacherUpdateCallback(self))

    def _check_chat_template(self) -> None:
        """Fail at construction, not mid-training, when conversational prompts meet a tokenizer without a template."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or len(dataset) == 0 or not is_conversational(dataset[0]):
            return
        if self.chat_template is None and getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The train dataset's prompts are conversational (lists of messages) but the tokenizer "
                f"({type(self._tokenizer).__name__}) has no chat template and GRPOConfig.chat_template is not set. "
                "Use a chat (instruct) model's tokenizer, set tokenizer.chat_template, or give plain-text prompts."
            )

    # ---- 1. rewards: keep what the teacher needs -------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        before = snapshot_feedback(self.reward_funcs)
        for func in self.reward_funcs:
            if isinstance(func, ReturnRecorder):
                func.returned = None
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.teacher is not None:
            dataset_feedback = [x[FEEDBACK_COLUMN] for x in inputs] if FEEDBACK_COLUMN in inputs[0] else None
            feedback = collect_feedback(
                self.reward_funcs, self.reward_func_names, before, len(prompts), dataset_feedback
            )
            self._sdpo_rollout = _Rollout(list(prompts), list(completion_ids_list), rewards_per_func, feedback)
        return rewards_per_func

    # ---- 2. the batch: teacher prompts -----------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher is None:
            return batch
        _trl_compat.check_batch(batch)
        rollout, self._sdpo_rollout = self._sdpo_rollout, None
        if rollout is None:
            raise RuntimeError("SDPOTrainer: the reward step did not run before the batch was built.")
        check_prompts_end_with_user_turn(rollout.prompts)
        batch.update(self._build_teacher_batch(rollout, batch["completion_mask"]))
        return batch

    def _build_teacher_batch(self, rollout: _Rollout, completion_mask: torch.Tensor) -> dict[str, Any]:
        config = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        device = self.accelerator.device
        self.teacher.to(device)  # a full-copy teacher is built where the student was: on the CPU under DeepSpeed

        # Success is judged on the total weighted reward; a completion no reward function could score is NaN.
        rewards_per_func = rollout.rewards_per_func
        rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan

        # Demonstrations are searched over the whole group, which may span processes: gather texts and feedback.
        local_count = len(rollout.prompts)
        texts = gather_object(self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True))
        feedback = gather_object(rollout.feedback)
        signals = select_teacher_signals(texts, rewards.tolist(), feedback, num_generations, config.signal_settings())
        start = self.accelerator.process_index * local_count
        local_signals = signals[start : start + local_count]

        template_kwargs = {
            "chat_template": self.chat_template,
            "tools": self.tools or None,
            **self.chat_template_kwargs,
            **config.apply_chat_template_kwargs,
        }
        teacher_prompts: list[TeacherPrompt | None] = [
            render_teacher_prompt(
                prompt,
                signal,
                self._tokenizer,
                config.template_settings(),
                chat_template_kwargs=template_kwargs,
                sample_index=start + i,
            )
            if signal.has_signal
            else None
            for i, (prompt, signal) in enumerate(zip(rollout.prompts, local_signals, strict=True))
        ]

        ids = [torch.tensor(p.input_ids if p else [], dtype=torch.long) for p in teacher_prompts]
        masks = [torch.ones_like(row) for row in ids]
        if max(len(row) for row in ids) == 0:  # no teacher signal here: keep one padding column
            ids[0] = torch.tensor([self._tokenizer.pad_token_id])
            masks[0] = torch.zeros(1, dtype=torch.long)
        teacher_prompt_ids = pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        teacher_prompt_mask = pad(masks, padding_value=0, padding_side="left").to(device)
        self_distillation_mask = torch.tensor([float(s.has_signal) for s in local_signals], device=device)

        # Normaliser of the loss over the whole generation batch, so that accumulated micro-batches sum to the loss
        # of one big batch (see `_compute_loss`).
        active = completion_mask * self_distillation_mask.unsqueeze(1)
        local_items = active.sum() if config.loss_agg_mode == "token-mean" else (active.sum(1) > 0).sum().float()
        num_items = self.accelerator.gather(local_items.reshape(1)).sum()

        self._log_teacher_metrics(mode, signals, rewards.tolist(), feedback, num_generations, teacher_prompts)
        return {
            "teacher_prompt_ids": teacher_prompt_ids,
            "teacher_prompt_mask": teacher_prompt_mask,
            "self_distillation_mask": self_distillation_mask,
            "num_self_distillation_items": num_items,
        }

    def _log_teacher_metrics(self, mode, signals, rewards, feedback, num_generations, teacher_prompts) -> None:
        metrics = teacher_signal_metrics(
            signals, rewards, feedback, num_generations, self.sdpo_config.success_reward_threshold
        )
        every_process_prompts = gather_object(teacher_prompts)
        rendered = [p for p in every_process_prompts if p is not None]
        metrics[PREFIX + "teacher_prompt_length_mean"] = (
            sum(len(p.input_ids) for p in rendered) / len(rendered) if rendered else math.nan
        )
        metrics[PREFIX + "teacher_prompt_truncated_count"] = float(sum(p.truncated for p in rendered))
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        self._logs["extra"]["teacher_prompt"].extend(p.text if p is not None else "" for p in every_process_prompts)

    # ---- 3. the loss -----------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """The SDPO loss; with `grpo_weight` = w in (0, 1), the blend w * GRPO loss + (1 - w) * SDPO loss."""
        if self.teacher is None:
            return super()._compute_loss(model, inputs)
        loss = self._self_distillation_loss(model, inputs)
        weight = self.sdpo_config.grpo_weight
        if weight == 0.0:
            return loss
        # TRL's own GRPO loss, with its own student forward, normalisation and accumulation scaling.
        grpo_loss = super()._compute_loss(model, inputs)
        self._log_loss_metric("grpo_loss", grpo_loss)
        return weight * grpo_loss + (1.0 - weight) * loss

    def _log_loss_metric(self, name: str, loss: torch.Tensor) -> None:
        """Log a loss term as its value for the whole optimizer step (not this micro-batch's share of it)."""
        mode = "train" if self.model.training else "eval"
        # In training, `loss` is this micro-batch's share of the step's loss; times the accumulation steps it is a
        # per-micro-batch estimate whose average over the step is the step's loss.
        step_share = self.current_gradient_accumulation_steps if mode == "train" else 1
        self._metrics[mode][PREFIX + name].append(
            self.accelerator.gather(loss.detach().reshape(1) * step_share).mean().item()
        )

    def _log_masked_mean(self, mode: str, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Log the mean of `values` over the unmasked positions of every process (NaN when there are none)."""
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]).float(), reduction="sum")
        self._metrics[mode][PREFIX + name].append((totals[0] / totals[1]).item() if totals[1] > 0 else math.nan)

    def _self_distillation_loss(self, model, inputs) -> torch.Tensor:
        """The distillation loss of the completions with a teacher signal (docs/how-it-works.md section 4).

        For a model whose output head is a plain linear layer (`linear_head`) the models return final hidden states
        and the loss projects them a chunk of tokens at a time, so that no `[B, T, V]` logits are materialised;
        other models go through their logits.
        """
        config = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            completion_mask = completion_mask * inputs["tool_mask"]
        self_distillation_mask = inputs["self_distillation_mask"]

        # Only completions with a teacher signal are forwarded (deviation D3 in docs/deviations.md). Without any, one
        # row still runs through the student so the loss is a zero connected to the model (every process must take
        # part in backward), and the teacher does not run at all.
        rows = self_distillation_mask.nonzero().squeeze(1)
        has_signal = rows.numel() > 0
        if not has_signal:
            rows = rows.new_zeros(1)
        completion_ids, completion_mask = completion_ids[rows], completion_mask[rows]
        logits_to_keep = completion_ids.size(1)
        student_ids = torch.cat([inputs["prompt_ids"][rows], completion_ids], dim=1)
        student_mask = torch.cat([inputs["prompt_mask"][rows], completion_mask], dim=1)
        if has_signal:
            teacher_ids, teacher_prompt_mask = _drop_shared_padding(
                inputs["teacher_prompt_ids"][rows], inputs["teacher_prompt_mask"][rows]
            )
            teacher_ids = torch.cat([teacher_ids, completion_ids], dim=1)
            teacher_mask = torch.cat([teacher_prompt_mask, completion_mask], dim=1)

        student = self.accelerator.unwrap_model(model)
        head = linear_head(student)
        with self.accelerator.autocast():
            if head is not None:
                student_hidden = completion_hidden(model, head, student_ids, student_mask, logits_to_keep)
                teacher = (
                    self.teacher.completion_head_inputs(student, teacher_ids, teacher_mask, logits_to_keep)
                    if has_signal
                    else HeadInputs((student_hidden.detach(),), (head.weight,))
                )
            else:
                student_logits = completion_logits(model, student_ids, student_mask, logits_to_keep)
                teacher_logits = (
                    self.teacher.completion_logits(student, teacher_ids, teacher_mask, logits_to_keep)
                    if has_signal
                    else student_logits.detach()
                )

        old_per_token_logps = inputs.get("old_per_token_logps")
        importance_sampling_ratio = inputs.get("importance_sampling_ratio")
        if mode == "train":
            # TRL scales the loss for gradient accumulation inside `_compute_loss`: divide the sum by this process's
            # share of the generation batch's items, rescaled to one accumulation window (as TRL's "dapo" loss does).
            normalizer = (
                inputs["num_self_distillation_items"].clamp(min=1.0)
                / self.accelerator.num_processes
                * self.current_gradient_accumulation_steps
                / self.args.steps_per_generation
            )
        else:
            normalizer = None
        loss_inputs = (
            completion_ids,
            completion_mask,
            self_distillation_mask[rows],
            None if old_per_token_logps is None else old_per_token_logps[rows],
        )
        options = dict(
            settings=config.loss_settings(),
            # vLLM's correction is per token, or per sequence ([B, 1]) in its sequence-level modes.
            per_token_weight=None
            if importance_sampling_ratio is None
            else importance_sampling_ratio[rows].expand(completion_ids.shape),
            normalizer=normalizer,
        )
        if head is not None:
            loss, student_entropy, teacher_entropy = self_distillation_loss_from_hidden(
                student_hidden,
                head.weight,
                teacher.hidden,
                teacher.weight,
                *loss_inputs,
                temperature=self.temperature,
                return_entropy=True,
                **options,
            )
        else:
            student_logits, teacher_logits = student_logits / self.temperature, teacher_logits / self.temperature
            loss = self_distillation_loss(student_logits, teacher_logits, *loss_inputs, **options)
            student_entropy, teacher_entropy = token_entropy(student_logits), token_entropy(teacher_logits)
        distilled = completion_mask * self_distillation_mask[rows].unsqueeze(1)
        self._log_masked_mean(mode, "student_entropy", student_entropy, distilled)
        self._log_masked_mean(mode, "teacher_entropy", teacher_entropy, distilled)
        self._log_loss_metric("distillation_loss", loss)
        return loss

    # ---- 4. the teacher update -------------------------------------------------------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        """Note whether the step's gradient norm is finite; if not, drop the gradients so the step changes nothing.

        A NaN/inf gradient would otherwise be applied by the optimizer and corrupt the student, and then the EMA
        teacher. With the gradients set to None, `optimizer.step()` skips every parameter (no weight or optimizer
        state changes); the learning-rate schedule still advances. Under DeepSpeed, its engine owns the gradients
        and only the teacher update is skipped.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm_finite = grad_norm is None or math.isfinite(float(grad_norm))
        if not self._last_grad_norm_finite and self.teacher is not None:
            logger.warning(
                "SDPO: step %d has a non-finite gradient norm (%s); its update of the student and the teacher is "
                "skipped.",
                self.state.global_step + 1,
                grad_norm,
            )
            if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
                model.zero_grad(set_to_none=True)
        return grad_norm

    def _update_teacher(self) -> None:
        """EMA step of the teacher; skipped (and counted) when the step's gradient norm was not finite."""
        if self._last_grad_norm_finite:
            self.teacher.update(self.accelerator.unwrap_model(self.model))
        self._metrics["train"][PREFIX + "nonfinite_step"].append(float(not self._last_grad_norm_finite))

    # ---- 5. logging: warn once when the signs of a collapse appear -------------------------------------------------

    def log(self, logs, start_time=None):
        super().log(logs, start_time)
        if self.teacher is None or self._collapse_warned or not self.model.training:
            return
        signs = collapse_signs(self.state.log_history)
        if signs:
            self._collapse_warned = True
            logger.warning("SDPO may be collapsing: %s. %s", "; ".join(signs), ADVICE)

    # ---- 6. checkpoints: the teacher is saved with every checkpoint and restored on resume (deviation D4) ------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.teacher is not None and self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            save_teacher(self.teacher, os.path.join(checkpoint, TEACHER_DIR), self.sdpo_config.teacher_mode)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self.teacher is None:
            return
        folder = os.path.join(resume_from_checkpoint, TEACHER_DIR)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {TEACHER_DIR}/ folder, so the SDPO teacher cannot be restored (was "
                "the checkpoint written by GRPOTrainer or with SDPO disabled?). Resume from an SDPOTrainer checkpoint."
            )
        load_teacher(self.teacher, folder, self.sdpo_config.teacher_mode)

    def _save(self, output_dir=None, state_dict=None):
        """Save the student only: a `lora_ema` teacher adapter is kept out of the saved PEFT model."""
        with hidden_teacher_adapter(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)


def _drop_shared_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the left-padding columns that every row of a left-padded batch has (the batch was padded globally)."""
    keep_from = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else mask.size(1) - 1
    return ids[:, keep_from:], mask[:, keep_from:]
