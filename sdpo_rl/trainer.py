"""`SDPOTrainer`: TRL's GRPOTrainer with the GRPO policy-gradient loss replaced by self-distillation.

The trainer is glue over GRPOTrainer's and Trainer's extension points (every one is listed in `_trl_compat`), in the
order a training step meets them:

1. `_calculate_rewards`: after the reward functions ran, keep what the teacher needs (prompts, completion tokens,
   total rewards, feedback).
2. `_generate_and_score_completions`: after TRL built the batch, choose each completion's demonstration and feedback
   over its whole group, decide which completions are distilled (all with a signal, or the routed ones), render the
   teacher prompts and add them, the distillation mask and weights to the batch (TRL then shuffles and splits it
   like every other batch tensor).
3. `_compute_loss`: student forward on prompt + completion, teacher forward on teacher prompt + the same completion,
   the distillation loss of `sdpo_rl.loss_chunked` (or `sdpo_rl.loss` from logits); with routing or the hybrid,
   TRL's own GRPO loss from the same student forward.
4. `_get_grad_norm` and a callback after each optimizer step: a non-finite step changes nothing; otherwise the
   teacher is updated.
5. `log`: after TRL logged a step, look for the signs of a collapse (`sdpo_rl.monitor`) and warn once.
6. `_save_checkpoint` / `_prepare_for_training` / `_save`: the teacher goes into every checkpoint and comes back on
   resume, whatever the backend; a saved model holds the student only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as TRL_LOGPROB_VOCAB_CHUNK
from trl.trainer.utils import pad

from . import _trl_compat
from .config import SDPOConfig
from .feedback import ReturnRecorder, collect_feedback, dataset_feedback, record_returns, snapshot_feedback
from .forward import (
    HeadInputs,
    completion_hidden,
    completion_logits,
    linear_head,
    logit_scale,
    prompt_sharing_blocker,
)
from .generation import prompts_prefilled_once
from .loss import self_distillation_loss, token_entropy
from .loss.chunked import PolicyGradient, default_chunk_size, self_distillation_loss_from_hidden
from .loss.grpo_gradient import GRPOLossSettings, on_policy_logp_gradient
from .metrics import (
    DISTILLATION_LOSS,
    GRPO_LOSS,
    NONFINITE_STEP,
    ONE_PASS_HYBRID,
    PROMPT_SHARING,
    ROUTED_GRPO_FRACTION,
    ROUTED_SDPO_FRACTION,
    STUDENT_ENTROPY,
    TEACHER_EDGE,
    TEACHER_ENTROPY,
    TEACHER_PROMPT_LENGTH_MEAN,
    TEACHER_PROMPT_TRUNCATED_COUNT,
    teacher_signal_metrics,
)
from .monitor import ADVICE, collapse_signs
from .preflight import EDGE_KINDS, pooled_edge, teacher_edge_counts
from .reprompt import (
    TeacherPrompt,
    TeacherSignal,
    check_prompts_end_with_user_turn,
    render_teacher_prompt,
    select_teacher_signals,
    without_hindsight,
)
from .stabilisers import (
    entropy_weights,
    head_entropy,
    normalise_to_mean_one,
    pass_rate_weights,
    routed_to_distillation,
)
from .teacher import Teacher, build_teacher
from .teacher.checkpoint import hidden_teacher_adapter, load_teacher, save_teacher

TEACHER_DIR = "teacher"
# Dataset columns through which TRL feeds images to vision-language models; SDPO's forwards carry no images.
IMAGE_COLUMNS = {"image", "images"}
# GRPO losses normalised by the generation batch's token count (`num_items_in_batch`), the denominator routing shares.
ROUTING_LOSS_TYPES = ("dapo", "cispo", "vespo")
logger = logging.getLogger(__name__)


@dataclass
class _Rollout:
    """What `_calculate_rewards` saw of the local batch; consumed by `_generate_and_score_completions`."""

    prompts: list
    completion_ids: list[list[int]]
    rewards_per_func: torch.Tensor  # [global batch, num reward functions], gathered by TRL
    feedback: list[str]


@dataclass
class _Distillation:
    """The distillation term of a micro-batch, and what it computed on the way, ``[B, T]`` over every row."""

    loss: torch.Tensor
    scored: torch.Tensor  # the distilled tokens: the only ones `student_entropy` and `logps` hold (0 elsewhere)
    student_entropy: torch.Tensor
    logps: torch.Tensor | None  # the student's log-probs of the completion tokens, with gradient (with a policy)


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


class _TeacherUpdateCallback(TrainerCallback):
    """Updates the teacher after every optimizer step (docs/teachers.md)."""

    def __init__(self, trainer: SDPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._update_teacher()


class SDPOTrainer(GRPOTrainer):
    """Self-Distilled Policy Optimization on top of `trl.GRPOTrainer`.

    Accepts every argument of `GRPOTrainer`, plus `sdpo_config` (an `SDPOConfig`, default `SDPOConfig()`). Without
    a distillation term (`SDPOConfig(enabled=False)` or `grpo_weight=1.0`) every step runs TRL's own code, so that
    it trains exactly as GRPOTrainer does, to the bit on any CPU; the CPU savings of generation
    (`_generate_single_turn`) and scoring (`_get_per_token_logps_and_entropies`) serve the distilling configurations.
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
        _check_grpo_config(sdpo_config, arguments.arguments.get("args"))
        self.sdpo_config = dataclasses.replace(sdpo_config)  # a private copy: later edits of the caller's do nothing
        self._sdpo_rollout: _Rollout | None = None
        self._last_grad_norm_finite = True
        self._collapse_warned = False
        self._scored_completions: tuple[torch.Tensor, torch.Tensor] | None = None  # see `_one_pass_hybrid`
        self._fast_path_notices: set[tuple[str, str]] = set()  # see `_note_fast_path`
        super().__init__(*arguments.args[1:], **arguments.kwargs)
        _trl_compat.check_trainer_attributes(self)
        self._check_chat_template()
        self._check_supported_inputs()
        # Keep each reward function's returned values, to read the feedback of `Scored` rewards.
        self.reward_funcs = [f if isinstance(f, nn.Module) else record_returns(f) for f in self.reward_funcs]
        if self.sdpo_config.teacher_edge_every is not None and self.accelerator.num_processes > 1:
            raise ValueError(
                f"SDPOConfig.teacher_edge_every={self.sdpo_config.teacher_edge_every} samples each process's own "
                "failed completions, so processes would call generate a different number of times; it runs in one "
                "process only. Set it to None under accelerate launch or torchrun, and measure with `sdpo-rl "
                "preflight` first."
            )
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

    def _check_supported_inputs(self) -> None:
        """Refuse, at construction, what the distillation loss would silently drop: images and MoE balancing."""
        if not self.sdpo_config.distills:
            return
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
            columns = {c for d in datasets if d is not None for c in (getattr(d, "column_names", None) or [])}
            if columns & IMAGE_COLUMNS:
                raise ValueError(
                    f"The {name} has an image column ({', '.join(sorted(columns & IMAGE_COLUMNS))}), but SDPOTrainer "
                    "supports text prompts only: the teacher prompt and both distillation forwards carry no image "
                    "inputs. Train vision-language data with GRPOTrainer, or drop the image column."
                )
        if _uses_grpo_term(self.sdpo_config) or not self.aux_loss_enabled:
            return
        raise ValueError(
            f"{type(self.accelerator.unwrap_model(self.model)).__name__} is a Mixture-of-Experts model whose "
            f"load-balancing loss (router_aux_loss_coef={self.router_aux_loss_coef}) GRPOTrainer adds to its GRPO "
            "loss, which pure SDPO replaces, so it would be silently dropped. Set "
            "GRPOConfig(router_aux_loss_coef=0.0) to train without it, or keep TRL's loss term with "
            "SDPOConfig(sample_routing=True) or grpo_weight > 0."
        )

    # ---- 0. generation: each distinct prompt prefilled once on a CPU ------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's sampling, with `generation.prompts_prefilled_once` on the model TRL unwraps for it where prompts are
        shared (`_shares_prompts`; TRL turns gradient checkpointing off to generate) and TRL samples text prompts with
        transformers' `generate`. Without a distillation term, TRL's alone (the class docstring)."""
        student = self.accelerator.unwrap_model(self.model_wrapped)
        prefills_once = (
            self.sdpo_config.distills
            and not (
                self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields
            )
            and self._shares_prompts(student, training_forward=False)
        )
        with prompts_prefilled_once(student) if prefills_once else nullcontext():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )

    # ---- 1. rewards: keep what the teacher needs -------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        before = snapshot_feedback(self.reward_funcs)
        for func in self.reward_funcs:
            if isinstance(func, ReturnRecorder):
                func.returned = None
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.teacher is not None:
            feedback = collect_feedback(
                self.reward_funcs, self.reward_func_names, before, len(prompts), dataset_feedback(inputs)
            )
            self._sdpo_rollout = _Rollout(list(prompts), list(completion_ids_list), rewards_per_func, feedback)
        return rewards_per_func

    # ---- 2. the batch: teacher prompts -----------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        batch, teacher_batch = self.rollout_with_teacher_batch(inputs)
        if teacher_batch is not None:
            batch.update(teacher_batch.tensors)
            self._log_teacher_edge(inputs, teacher_batch)
        return batch

    def _log_teacher_edge(self, inputs, teacher_batch: TeacherBatch) -> None:
        """Every `teacher_edge_every` steps, `self_distillation/teacher_edge`: one teacher completion sampled from each
        failed completion's teacher prompt, its pass rate minus the student's on those prompts (`sdpo_rl.preflight`);
        NaN when no failed completion has a teacher prompt."""
        every = self.sdpo_config.teacher_edge_every
        if every is None or not self.model.training or self.state.global_step % every:
            return
        counts = teacher_edge_counts(self, inputs, teacher_batch, teacher_samples=1)
        edge = pooled_edge([counts], EDGE_KINDS)
        self._metrics["train"][TEACHER_EDGE].append(math.nan if edge is None else edge)

    def rollout_with_teacher_batch(self, inputs) -> tuple[dict[str, Any], TeacherBatch | None]:
        """TRL's generation batch of `inputs` and, when SDPO distills, its `TeacherBatch` (None otherwise).

        `_generate_and_score_completions` adds the teacher batch's tensors to TRL's batch; `sdpo_rl.preflight` reads
        its signals and teacher prompts, so that both see the same rollout, rewards, signals and prompts.
        """
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher is None:
            return batch, None
        _trl_compat.check_batch(batch)
        rollout, self._sdpo_rollout = self._sdpo_rollout, None
        if rollout is None:
            raise RuntimeError("SDPOTrainer: the reward step did not run before the batch was built.")
        check_prompts_end_with_user_turn(rollout.prompts)
        if "pixel_values" in batch:
            raise ValueError(
                "This batch carries images (pixel_values), but SDPOTrainer supports text prompts only: the teacher "
                "prompt and both distillation forwards carry no image inputs. Train vision-language data with "
                "GRPOTrainer."
            )
        return batch, self._build_teacher_batch(rollout, batch)

    def _build_teacher_batch(self, rollout: _Rollout, batch: dict[str, Any]) -> TeacherBatch:
        config = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        device = self.accelerator.device
        self.teacher.to(device)  # a full-copy teacher is built where the student was: on the CPU under DeepSpeed

        rewards = total_rewards(rollout.rewards_per_func, self.reward_weights)

        # Demonstrations are searched over the whole group, which may span processes: gather texts and feedback.
        local_count = len(rollout.prompts)
        texts = gather_object(self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True))
        feedback = gather_object(rollout.feedback)
        signals = select_teacher_signals(texts, rewards, feedback, num_generations, config.signal_settings())
        distilled = [s.has_signal for s in signals]
        if config.sample_routing:
            distilled = routed_to_distillation(rewards, distilled, config.success_reward_threshold)
        start = self.accelerator.process_index * local_count
        local = slice(start, start + local_count)

        teacher_prompts = self._render_teacher_prompts(rollout.prompts, signals[local], distilled[local], start)
        outputs = self._pad_prompts(teacher_prompts, "teacher_prompt")
        if config.hindsight_contrast is not None:
            frames = [without_hindsight(s) for s in signals[local]]
            frame_prompts = self._render_teacher_prompts(rollout.prompts, frames, distilled[local], start)
            outputs.update(self._pad_prompts(frame_prompts, "frame_prompt"))
        outputs["self_distillation_mask"] = torch.tensor([float(d) for d in distilled[local]], device=device)

        # Normaliser of the loss over the whole generation batch, so that accumulated micro-batches sum to the loss
        # of one big batch (see `_compute_loss`). With routing both losses share it: every valid token counts.
        valid = batch["completion_mask"] * batch.get("tool_mask", 1)
        counted = valid if config.sample_routing else valid * outputs["self_distillation_mask"].unsqueeze(1)
        local_items = counted.sum() if config.loss_agg_mode == "token-mean" else (counted.sum(1) > 0).sum().float()
        outputs["num_self_distillation_items"] = self.accelerator.gather(local_items.reshape(1)).sum()

        weight = self._distillation_weights(rewards, distilled, num_generations, local, {**batch, **outputs})
        if weight is not None:
            outputs["self_distillation_weight"] = weight
        self._log_teacher_metrics(mode, signals, rewards, feedback, num_generations, teacher_prompts, distilled)
        return TeacherBatch(outputs, rewards, signals, distilled, local, teacher_prompts, num_generations)

    def _render_teacher_prompts(self, prompts, signals, distilled, start: int) -> list[TeacherPrompt | None]:
        """The teacher prompt of each local completion that is distilled (None for the others)."""
        config = self.sdpo_config
        template_kwargs = {
            "chat_template": self.chat_template,
            "tools": self.tools or None,
            **self.chat_template_kwargs,
            **config.apply_chat_template_kwargs,
        }
        return [
            render_teacher_prompt(
                prompt,
                signal,
                self._tokenizer,
                config.template_settings(),
                chat_template_kwargs=template_kwargs,
                sample_index=start + i,
            )
            if is_distilled
            else None
            for i, (prompt, signal, is_distilled) in enumerate(zip(prompts, signals, distilled, strict=True))
        ]

    def _pad_prompts(self, prompts: list[TeacherPrompt | None], name: str) -> dict[str, torch.Tensor]:
        """``{name}_ids`` and ``{name}_mask``: the prompts left-padded to ``[B, P]`` (an empty row for None)."""
        ids = [torch.tensor(p.input_ids if p else [], dtype=torch.long) for p in prompts]
        masks = [torch.ones_like(row) for row in ids]
        if max(len(row) for row in ids) == 0:  # no teacher prompt here: keep one padding column
            ids[0] = torch.tensor([self._tokenizer.pad_token_id])
            masks[0] = torch.zeros(1, dtype=torch.long)
        device = self.accelerator.device
        return {
            f"{name}_ids": pad(ids, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device),
            f"{name}_mask": pad(masks, padding_value=0, padding_side="left").to(device),
        }

    def _distillation_weights(self, rewards, distilled, num_generations, local: slice, batch) -> torch.Tensor | None:
        """``[B, T]`` weights of the distilled tokens (mean 1 over the generation batch), or None when unweighted."""
        config = self.sdpo_config
        mask = batch["self_distillation_mask"].unsqueeze(1) * batch["completion_mask"] * batch.get("tool_mask", 1)
        weight = None
        if config.pass_rate_weighting:
            rates = pass_rate_weights(rewards, distilled, num_generations, config.success_reward_threshold)
            weight = torch.tensor(rates[local], device=mask.device).unsqueeze(1) * mask
        if config.teacher_entropy_weighting is not None:
            raw = entropy_weights(self._teacher_entropy(batch), config.teacher_entropy_weighting)
            totals = self.accelerator.reduce(torch.stack([(raw * mask).sum(), mask.sum()]).float(), reduction="sum")
            entropy_weight = normalise_to_mean_one(raw, mask, totals[0], totals[1])
            weight = entropy_weight if weight is None else weight * entropy_weight
        return weight

    def _teacher_entropy(self, batch) -> torch.Tensor:
        """``[B, T]`` entropy of the teacher's next-token distributions (0 where nothing is distilled), no gradient.

        Computed when the batch is built, with one more teacher forward per distilled completion, because its
        normalisation spans the whole generation batch, which the loss sees one micro-batch at a time. Every process
        runs as many forwards as the process with the most chunks of distilled rows (`_idle_teacher_forwards`).
        """
        entropy = torch.zeros(batch["completion_ids"].shape, device=self.accelerator.device)
        rows = batch["self_distillation_mask"].nonzero().squeeze(1)
        step = self.args.per_device_train_batch_size
        student = self.accelerator.unwrap_model(self.model)
        head = linear_head(student)
        parts = [rows[start : start + step] for start in range(0, rows.numel(), step)]  # no part for no rows
        for _ in range(self._idle_teacher_forwards(len(parts))):
            self._teacher_outputs(student, batch, rows.new_zeros(1), head)
        for part in parts:
            completion_ids, completion_mask, teacher = self._teacher_outputs(student, batch, part, head)
            active = completion_mask > 0
            if isinstance(teacher, HeadInputs):
                chunk = default_chunk_size(teacher.weight[0].shape[0], torch.float32)
                temperature = self.temperature / logit_scale(student)  # the head's logits times the scale
                values = head_entropy([h[active] for h in teacher.hidden], teacher.weight, temperature, chunk)
            else:
                values = token_entropy(teacher / self.temperature)[active]
            entropy[part] = torch.zeros_like(completion_mask, dtype=entropy.dtype).masked_scatter(active, values)
        return entropy

    def _log_teacher_metrics(
        self, mode, signals, rewards, feedback, num_generations, teacher_prompts, distilled
    ) -> None:
        config = self.sdpo_config
        metrics = teacher_signal_metrics(
            signals,
            rewards,
            feedback,
            num_generations,
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
            self._metrics[mode][name].append(value)
        self._logs["extra"]["teacher_prompt"].extend(p.text if p is not None else "" for p in every_process_prompts)

    # ---- 3. the loss -----------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """The SDPO loss; or, with TRL's GRPO loss as a second term, the routed sum or the `grpo_weight` blend.

        With both terms and a model whose head is a plain linear layer, one student forward serves both, and the
        head projects each completion token once for both (`_one_pass_hybrid`).
        """
        if self.teacher is None:
            return super()._compute_loss(model, inputs)
        config = self.sdpo_config
        if not _uses_grpo_term(config):
            return self._self_distillation_loss(model, inputs).loss
        grpo_inputs = inputs
        if config.sample_routing:  # GRPO's loss masks the distilled rows; they keep attending, as tool outputs do
            routed_to_grpo = (1.0 - inputs["self_distillation_mask"]).unsqueeze(1)
            grpo_inputs = {**inputs, "tool_mask": inputs.get("tool_mask", 1) * routed_to_grpo}
        # Both terms' weights in the total: routing adds two sums over one shared token count.
        grpo_weight, distillation_weight = (
            (1.0, 1.0) if config.sample_routing else (config.grpo_weight, 1.0 - config.grpo_weight)
        )
        student = self.accelerator.unwrap_model(model)
        head = linear_head(student)
        blocker = self._one_pass_hybrid_blocker(student, head)
        self._note_fast_path(ONE_PASS_HYBRID, "The hybrid's one pass", blocker)
        if blocker is not None:
            grpo_loss = super()._compute_loss(model, grpo_inputs)
            distillation_loss = self._self_distillation_loss(model, inputs).loss
        else:
            grpo_loss, distillation_loss = self._one_pass_hybrid(
                model, inputs, grpo_inputs, head, grpo_weight / distillation_weight
            )
        self._log_loss_metric(GRPO_LOSS, grpo_loss)
        return grpo_weight * grpo_loss + distillation_weight * distillation_loss

    def _one_pass_hybrid_blocker(self, student, head: nn.Linear | None) -> str | None:
        """Why the hybrid's terms need TRL's forward and a second one for the distillation; None where
        `_one_pass_hybrid` serves both."""
        if head is None:
            return (
                f"the logits of {type(student).__name__} are not a plain linear projection of its hidden states "
                "(`forward.linear_head`), so TRL's forward runs its head"
            )
        if self.aux_loss_enabled:
            return f"TRL's forward returns the MoE balancing loss (router_aux_loss_coef={self.router_aux_loss_coef})"
        if self._entropy_bonus_enabled:
            return "TRL's entropy bonus (entropy_coef, use_adaptive_entropy) takes the entropies from its own forward"
        return None

    def _note_fast_path(self, metric: str, fast_path: str, blocker: str | None) -> None:
        """Log `metric` 1 where `fast_path` runs and 0 where `blocker` turns it off; the first time each blocker does,
        one info line naming it."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][metric].append(float(blocker is None))
        if blocker is not None and (metric, blocker) not in self._fast_path_notices:
            self._fast_path_notices.add((metric, blocker))
            logger.info("%s is off (%s logs 0): %s.", fast_path, metric, blocker)

    def _one_pass_hybrid(self, model, inputs, grpo_inputs, head: nn.Linear, relative_grpo_weight: float):
        """``(GRPO loss, distillation loss)`` from one student forward, the head projecting each token once.

        The distillation's chunk pass also returns the student's log-probs of the distilled tokens and folds TRL's
        GRPO gradient w.r.t. them into its own (`sdpo_rl.grpo_gradient`); the other completion tokens are scored by
        TRL's chunked log-prob kernel, compact. TRL's `_compute_loss` then computes its loss and metrics from these
        log-probs and entropies instead of running its own forward.
        """
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        every_row = torch.arange(completion_ids.size(0), device=completion_ids.device)
        student_hidden = self._student_outputs(model, inputs, every_row, head)
        expected = self._expected_grpo_logp_gradient(grpo_inputs)
        rows = _distilled_rows(inputs)
        policy = PolicyGradient(None if expected is None else relative_grpo_weight * expected[rows])
        distillation = self._self_distillation_loss(model, inputs, student_hidden, policy)
        others = (completion_mask > 0) & ~distillation.scored  # the distillation left them 0
        self._scored_completions = self._score_completion_tokens(
            student_hidden, head, completion_ids, others, distillation.logps, distillation.student_entropy
        )
        try:
            grpo_loss = super()._compute_loss(model, grpo_inputs)
        finally:
            self._scored_completions = None
        return grpo_loss, distillation.loss

    def _expected_grpo_logp_gradient(self, grpo_inputs) -> torch.Tensor | None:
        """TRL's GRPO gradient w.r.t. the per-token log-probs when it is known in advance (on policy), else None."""
        unknown = (
            grpo_inputs.get("old_per_token_logps") is not None
            or self.importance_sampling_level != "token"
            or self.off_policy_mask_threshold is not None
            or (self.use_vllm and self.vllm_importance_sampling_correction)
            or self.beta != 0.0  # the KL term's gradient depends on the log-probs
            or self.top_entropy_quantile < 1.0  # the entropy mask zeroes some tokens' gradient
        )
        if unknown:
            return None
        training = self.model.training
        mask = grpo_inputs["completion_mask"] * grpo_inputs.get("tool_mask", 1)
        settings = GRPOLossSettings(
            loss_type=self.loss_type,
            epsilon_high=self.epsilon_high,
            max_completion_length=self.args.max_completion_length,
            accumulation_steps=self.current_gradient_accumulation_steps if training else 1,
            steps_per_generation=self.args.steps_per_generation if training else 1,
            num_processes=self.accelerator.num_processes,
        )
        return on_policy_logp_gradient(grpo_inputs["advantages"], mask, grpo_inputs.get("num_items_in_batch"), settings)

    def _score_completion_tokens(self, hidden, head: nn.Linear, completion_ids, where, logps, entropies=None):
        """`logps` and `entropies` ``[B, T]`` with the tokens `where` set to their log-probs and entropies under
        ``logit_scale * head(hidden) / temperature``; `entropies` None: not computed.

        TRL's chunked kernel with TRL's precision settings computes them, as its fused head does; `masked_scatter`
        keeps the result connected to the model when `where` is empty, as TRL's own compact scoring does.
        """
        cast_to_float32 = self.args.cast_lm_head_to_fp32
        outputs = ("entropy",) if entropies is not None else ()
        scale = logit_scale(self.accelerator.unwrap_model(self.model))
        with torch.autocast(hidden.device.type, enabled=False) if cast_to_float32 else self.accelerator.autocast():
            token_logps, token_entropies, *_ = ChunkedLogProbFunction.apply(
                hidden[where].float() if cast_to_float32 else hidden[where],
                head.weight,
                None,
                completion_ids[where],
                self.temperature,
                TRL_LOGPROB_VOCAB_CHUNK,
                None,  # soft-capping: `linear_head` leaves soft-capped models to TRL's forward
                scale,
                outputs,
            )
        logps = logps.masked_scatter(where, token_logps.to(logps.dtype))
        if entropies is not None:
            entropies = entropies.masked_scatter(where, token_entropies.to(entropies.dtype))
        return logps, entropies

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **model_inputs,
    ):
        """TRL's per-token log-probs and entropies of the completions: those `_one_pass_hybrid` already computed;
        else, on a CPU, of the completion tokens only; else TRL's.

        TRL's fused head projects the prompt positions too where it has no Triton kernel (a CPU among them), so that
        compiled backends see one tile shape; a CPU compiles nothing, and skipping the prompt positions skips most
        of the head's work, with the same values up to float rounding. The backbone runs each group's prompt once
        where `_shares_prompts`. Images, an MoE aux loss, a head that is not a plain linear layer or no distillation
        term (the class docstring) go to TRL's.
        """
        if self._scored_completions is not None:
            logps, entropies = self._scored_completions
            return logps, entropies, None
        head = linear_head(self.accelerator.unwrap_model(model))
        text_only = all(value is None for value in model_inputs.values())
        trls = not self.sdpo_config.distills or head is None or compute_aux_loss or not text_only
        if trls or input_ids.device.type != "cpu":
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        batch_size = batch_size or input_ids.size(0)
        share_prompts = self._shares_prompts(model)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                hidden = completion_hidden(model, head, ids, mask, logits_to_keep, share_prompts)
            scored = mask[:, -logits_to_keep:] > 0
            zeros = hidden.new_zeros(scored.shape, dtype=torch.float32)
            logps, entropies = self._score_completion_tokens(
                hidden, head, ids[:, -logits_to_keep:], scored, zeros, zeros if compute_entropy else None
            )
            all_logps.append(logps)
            all_entropies.append(entropies)
        return torch.cat(all_logps), torch.cat(all_entropies) if compute_entropy else None, None

    def _log_loss_metric(self, name: str, loss: torch.Tensor) -> None:
        """Log a loss term as its value for the whole optimizer step (not this micro-batch's share of it)."""
        mode = "train" if self.model.training else "eval"
        # In training, `loss` is this micro-batch's share of the step's loss; times the accumulation steps it is a
        # per-micro-batch estimate whose average over the step is the step's loss.
        step_share = self.current_gradient_accumulation_steps if mode == "train" else 1
        self._metrics[mode][name].append(self.accelerator.gather(loss.detach().reshape(1) * step_share).mean().item())

    def _log_masked_mean(self, mode: str, name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Log the mean of `values` over the unmasked positions of every process (NaN when there are none)."""
        totals = self.accelerator.reduce(torch.stack([(values * mask).sum(), mask.sum()]).float(), reduction="sum")
        self._metrics[mode][name].append((totals[0] / totals[1]).item() if totals[1] > 0 else math.nan)

    def _self_distillation_loss(
        self, model, inputs, student_hidden: torch.Tensor | None = None, policy: PolicyGradient | None = None
    ) -> _Distillation:
        """The distillation loss of the distilled completions (docs/how-it-works.md section 4).

        For a model whose output head is a plain linear layer (`linear_head`) the loss projects final hidden states a
        chunk of tokens at a time, so that no `[B, T, V]` logits are materialised; other models go through their
        logits. `student_hidden` (``[B, T, H]``, at the completion positions of every row) comes from a forward that
        already ran; without it the student runs its own forward on the distilled rows. With `policy` (over the
        `_distilled_rows`, and a linear head), the pass also returns the student's log-probs of the distilled tokens,
        for TRL's GRPO loss.
        """
        config = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        rows = _distilled_rows(inputs)
        has_signal = bool(inputs["self_distillation_mask"][rows].any())
        student = self.accelerator.unwrap_model(model)
        head = linear_head(student)
        completion_ids, completion_mask = inputs["completion_ids"][rows], inputs["completion_mask"][rows]
        student_out = (
            self._student_outputs(model, inputs, rows, head) if student_hidden is None else student_hidden[rows]
        )
        # Without a signal the rows are `_distilled_rows`' placeholder; in several processes the teacher still runs on
        # it, as every process must run as many teacher forwards (`_idle_teacher_forwards`), and its target is unused.
        if has_signal or self.accelerator.num_processes > 1:
            teacher = self._teacher_outputs(student, inputs, rows, head)[2]
            if config.hindsight_contrast is not None:
                teacher = self._contrast_target(student, inputs, rows, student_out, head, teacher)
        if not has_signal:
            teacher = HeadInputs((student_out.detach(),), (head.weight,)) if head else student_out.detach()

        # The loss sums the valid tokens (tool outputs excluded) of the distilled rows.
        loss_mask = completion_mask * inputs["tool_mask"][rows] if "tool_mask" in inputs else completion_mask
        loss_inputs = (
            completion_ids,
            loss_mask,
            inputs["self_distillation_mask"][rows],
            None if inputs.get("old_per_token_logps") is None else inputs["old_per_token_logps"][rows],
        )
        options = dict(
            settings=config.loss_settings(),
            per_token_weight=self._per_token_weight(inputs, rows, completion_ids.shape),
            normalizer=self._loss_normalizer(inputs),
        )
        logps = None
        if head is not None:
            if policy is not None:
                options["policy_gradient"] = policy
            loss, student_entropy, teacher_entropy, *logps = self_distillation_loss_from_hidden(
                student_out,
                head.weight,
                teacher.hidden,
                teacher.weight,
                *loss_inputs,
                temperature=self.temperature,
                logit_scale=logit_scale(student),
                return_entropy=True,
                **options,
            )
        else:
            student_logits, teacher_logits = student_out / self.temperature, teacher / self.temperature
            loss = self_distillation_loss(student_logits, teacher_logits, *loss_inputs, **options)
            student_entropy, teacher_entropy = token_entropy(student_logits), token_entropy(teacher_logits)
        distilled = loss_mask * inputs["self_distillation_mask"][rows].unsqueeze(1)
        self._log_masked_mean(mode, STUDENT_ENTROPY, student_entropy, distilled)
        self._log_masked_mean(mode, TEACHER_ENTROPY, teacher_entropy, distilled)
        self._log_loss_metric(DISTILLATION_LOSS, loss)

        def on_every_row(values: torch.Tensor) -> torch.Tensor:  # [len(rows), T] -> [B, T], 0 on the other rows
            return torch.zeros_like(inputs["completion_mask"], dtype=values.dtype).index_copy(0, rows, values)

        return _Distillation(
            loss=loss,
            scored=on_every_row(distilled) > 0,
            student_entropy=on_every_row(student_entropy * distilled),
            logps=on_every_row(logps[0]) if logps else None,
        )

    def _student_outputs(self, model, inputs, rows: torch.Tensor, head: nn.Linear | None) -> torch.Tensor:
        """The student's forward on the prompts and completions of `rows`, with gradient: the final hidden states
        ``[b, T, H]`` at the completion positions for a `linear_head`, else the logits ``[b, T, V]``."""
        completion_ids = inputs["completion_ids"][rows]
        ids = torch.cat([inputs["prompt_ids"][rows], completion_ids], dim=1)
        mask = torch.cat([inputs["prompt_mask"][rows], inputs["completion_mask"][rows]], dim=1)
        forward = (
            completion_logits
            if head is None
            else partial(completion_hidden, head=head, share_prompts=self._shares_prompts(model))
        )
        with self.accelerator.autocast():
            return forward(model, input_ids=ids, attention_mask=mask, logits_to_keep=completion_ids.size(1))

    def _shares_prompts(self, model, training_forward: bool = True) -> bool:
        """Whether forwards of the student's model run each distinct prompt once (`forward.completion_hidden`; in
        generation, `generation.prompts_prefilled_once`): on a CPU in one process, where it is measured; for a model
        `forward.prompt_sharing_blocker` allows (attention-only caches); and, for a `training_forward`, not under
        gradient checkpointing, which turns the key/value cache off (TRL turns it off to generate; the teachers run in
        eval mode, where it does not apply). On a CPU in one process it logs `PROMPT_SHARING` (`_note_fast_path`)."""
        if self.accelerator.device.type != "cpu" or self.accelerator.num_processes != 1:
            return False
        student = self.accelerator.unwrap_model(model)
        blocker = prompt_sharing_blocker(student)
        if blocker is None and training_forward:
            if any(getattr(module, "gradient_checkpointing", False) for module in student.modules()):
                blocker = "gradient checkpointing turns the key/value cache off in the student's training forwards"
        self._note_fast_path(PROMPT_SHARING, "Running each distinct prompt once", blocker)
        return blocker is None

    def _teacher_outputs(
        self, student, inputs, rows: torch.Tensor, head: nn.Linear | None, prompt: str = "teacher_prompt"
    ):
        """``(completion_ids, completion_mask, teacher)`` of `rows`: the teacher's `HeadInputs`, or its logits where
        `head` (the student's `linear_head`) is None.

        The teacher reads `prompt` (``teacher_prompt`` or ``frame_prompt``) followed by the student's completion;
        it attends to the whole completion, tool outputs included. The caller looks `head` up once for the student
        and the teacher alike: FSDP2 leaves the root module's parameters whole after a forward, so that a head found
        sharded before the student's forward could be found plain after it.
        """
        completion_ids, completion_mask = inputs["completion_ids"][rows], inputs["completion_mask"][rows]
        prompt_ids, prompt_mask = _drop_shared_padding(inputs[f"{prompt}_ids"][rows], inputs[f"{prompt}_mask"][rows])
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        mask = torch.cat([prompt_mask, completion_mask], dim=1)
        forward = (
            self.teacher.completion_logits
            if head is None
            else partial(
                self.teacher.completion_head_inputs,
                share_prompts=self._shares_prompts(student, training_forward=False),
            )
        )
        with self.accelerator.autocast():
            return completion_ids, completion_mask, forward(student, ids, mask, completion_ids.size(1))

    def _contrast_target(self, student, inputs, rows, student_out, head, teacher):
        """Hindsight contrast: the target ``z_S + gamma (z_T - z_frame)``, as `HeadInputs` terms or logits."""
        gamma = self.sdpo_config.hindsight_contrast
        frame = self._teacher_outputs(student, inputs, rows, head, prompt="frame_prompt")[2]
        if head is None:
            return student_out.detach() + gamma * (teacher - frame)
        return HeadInputs(
            hidden=(student_out.detach(),)
            + tuple(gamma * h for h in teacher.hidden)
            + tuple(-gamma * h for h in frame.hidden),
            weight=(head.weight,) + teacher.weight + frame.weight,
        )

    @staticmethod
    def _per_token_weight(inputs, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """The product of vLLM's importance-sampling correction and the stabilisers' token weights, if any."""
        weight = None
        ratio = inputs.get("importance_sampling_ratio")
        if ratio is not None:  # per token, or per sequence ([B, 1]) in vLLM's sequence-level modes
            weight = ratio[rows].expand(shape)
        if "self_distillation_weight" in inputs:
            stabiliser = inputs["self_distillation_weight"][rows]
            weight = stabiliser if weight is None else weight * stabiliser
        return weight

    def _loss_normalizer(self, inputs) -> torch.Tensor:
        """This process's share of the generation batch's item count, in training rescaled to one accumulation window.

        TRL scales the loss for gradient accumulation inside `_compute_loss`: the loss sums this micro-batch's items
        and divides by this, as TRL's "dapo" loss does, so that accumulated micro-batches add up to one big batch.
        Evaluation, which accumulates nothing, divides by the share alone, as TRL does: with routing, the eval loss
        is the same routed sum over one shared token count as in training.
        """
        share = inputs["num_self_distillation_items"].clamp(min=1.0) / self.accelerator.num_processes
        if not self.model.training:
            return share
        return share * self.current_gradient_accumulation_steps / self.args.steps_per_generation

    def _idle_teacher_forwards(self, count: int) -> int:
        """How many teacher forwards, on top of its `count`, this process runs so that all processes run as many.

        A sharded teacher's forward is a series of collectives (DeepSpeed ZeRO-3 and FSDP2 all-gather each layer's
        parameters), so a process that ran fewer would leave the others waiting in one (docs/distributed.md). The
        extra forwards run on one row and their result is unused.
        """
        most = self.accelerator.gather(torch.tensor([count], device=self.accelerator.device)).max()
        return int(most) - count

    # ---- 4. the optimizer step: skip a non-finite one, then update the teacher ---------------------------------------

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
        self._metrics["train"][NONFINITE_STEP].append(float(not self._last_grad_norm_finite))

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

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Restore the teacher when resuming, once the student, its optimizer and any engine are restored.

        Trainer restores the student in `_load_from_checkpoint` before `accelerator.prepare`, or after it under FSDP;
        under DeepSpeed it calls `deepspeed_load_checkpoint` instead and never reaches `_load_from_checkpoint`. Every
        backend ends here, with the resolved checkpoint path, once per training run and before `on_train_begin`; the
        teacher's weights are by then in the dtype and shards training uses, so its float32 EMA masters are made from
        them and hold the checkpoint's values exactly (docs/teachers.md).
        """
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.teacher is not None and resume_from_checkpoint is not None:
            folder = os.path.join(resume_from_checkpoint, TEACHER_DIR)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"{resume_from_checkpoint} has no {TEACHER_DIR}/ folder, so the SDPO teacher cannot be restored "
                    "(was the checkpoint written by GRPOTrainer or with SDPO disabled?). Resume from an SDPOTrainer "
                    "checkpoint."
                )
            load_teacher(self.teacher, folder, self.sdpo_config.teacher_mode)
        return prepared

    def _save(self, output_dir=None, state_dict=None):
        """Save the student only: a `lora_ema` teacher adapter is kept out of the saved PEFT model."""
        with hidden_teacher_adapter(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)


def total_rewards(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor) -> list[float]:
    """Each completion's total weighted reward, on which success is judged; NaN where no reward function scored it.

    rewards_per_func: ``[N, num reward functions]`` as TRL's `_calculate_rewards` returns them.
    """
    rewards = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = math.nan
    return rewards.tolist()


def _distilled_rows(inputs) -> torch.Tensor:
    """The rows the distillation loss forwards: the distilled completions (deviation D3 in docs/deviations.md).

    Without any, the first row still runs through the student so that the loss is a zero connected to the model
    (every process must take part in backward); its distillation mask keeps it out of the loss.
    """
    rows = inputs["self_distillation_mask"].nonzero().squeeze(1)
    return rows if rows.numel() > 0 else rows.new_zeros(1)


def _uses_grpo_term(config: SDPOConfig) -> bool:
    """Whether the loss keeps TRL's GRPO loss as a term (routing or the hybrid), besides the distillation loss."""
    return config.sample_routing or config.grpo_weight > 0.0


def _check_grpo_config(sdpo_config: SDPOConfig, grpo_config) -> None:
    """Refuse GRPOConfig settings that the SDPO loss would silently ignore, or that routing cannot normalise."""
    if not sdpo_config.distills or grpo_config is None:
        return
    if sdpo_config.sample_routing and grpo_config.loss_type not in ROUTING_LOSS_TYPES:
        raise ValueError(
            "SDPOConfig.sample_routing=True needs a GRPO loss normalised by the generation batch's token count, which "
            f"both routed losses share; GRPOConfig.loss_type={grpo_config.loss_type!r} is not. Use loss_type one of "
            f"{', '.join(repr(t) for t in ROUTING_LOSS_TYPES)} (TRL's default is 'dapo'), or "
            "SDPOConfig(grpo_weight=...) for the blended hybrid."
        )
    if _uses_grpo_term(sdpo_config):
        return
    ignored = {
        "beta": grpo_config.beta != 0.0,
        "entropy_coef": grpo_config.entropy_coef != 0.0,
        "use_adaptive_entropy": grpo_config.use_adaptive_entropy,
        "top_entropy_quantile": grpo_config.top_entropy_quantile < 1.0,
    }
    for name, is_set in ignored.items():
        if is_set:
            raise ValueError(
                f"GRPOConfig.{name}={getattr(grpo_config, name)!r} shapes TRL's GRPO loss (a KL penalty, the entropy "
                "bonus or the high-entropy token mask), which pure SDPO replaces, so it would be silently ignored. "
                "Reset it to its default, keep TRL's loss term with SDPOConfig(sample_routing=True) or grpo_weight > "
                "0, or train with GRPO (SDPOConfig(enabled=False))."
            )


def _drop_shared_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the left-padding columns that every row of a left-padded batch has (the batch was padded globally)."""
    keep_from = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else mask.size(1) - 1
    return ids[:, keep_from:], mask[:, keep_from:]
