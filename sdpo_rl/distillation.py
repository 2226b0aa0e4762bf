"""`DistillationStep`: the self-distillation loss of a micro-batch (docs/how-it-works.md section 4).

The student's forward on prompt + completion, the teacher's on teacher prompt + the same completion, the hindsight
contrast target, the per-token weights and the loss normaliser, and the loss of `sdpo_rl.loss.chunked` (from final
hidden states, for a plain linear head) or `sdpo_rl.loss` (from logits). A mixin of `SDPOTrainer`; it reads the
trainer's `sdpo_config`, `teacher`, `accelerator`, `temperature`, `args` and `_metrics`, and `_shares_prompts`
(`sdpo_rl.cpu_fast_path`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .forward import HeadInputs, completion_hidden, completion_logits, linear_head, logit_scale, logit_softcap
from .loss import self_distillation_loss, token_entropy
from .loss.chunked import PolicyGradient, default_chunk_size, self_distillation_loss_from_hidden
from .metrics import DISTILLATION_LOSS, STUDENT_ENTROPY, TEACHER_ENTROPY
from .stabilisers import head_entropy


@dataclass
class _Distillation:
    """The distillation term of a micro-batch, and what it computed on the way, ``[B, T]`` over every row."""

    loss: torch.Tensor
    scored: torch.Tensor  # the distilled tokens: the only ones `student_entropy` and `logps` hold (0 elsewhere)
    student_entropy: torch.Tensor
    logps: torch.Tensor | None  # the student's log-probs of the completion tokens, with gradient (with a policy)


class DistillationStep:
    """The distillation term of `SDPOTrainer`'s loss, and the teacher forwards it and the entropy weights run."""

    def _self_distillation_loss(
        self, model, inputs, student_hidden: torch.Tensor | None = None, policy: PolicyGradient | None = None
    ) -> _Distillation:
        """The distillation loss of the distilled completions (docs/how-it-works.md section 4).

        For a model whose output head is a plain linear layer (`linear_head`) the loss projects final hidden states a
        chunk of tokens at a time, so that no `[B, T, V]` logits are materialised; other models go through their
        logits. `student_hidden` (``[B, T, H]``, at the completion positions of every row) comes from a forward that
        already ran; without it the student runs its own forward on the distilled rows. With `policy` (over the
        `distilled_rows`, and a linear head), the pass also returns the student's log-probs of the distilled tokens,
        for TRL's GRPO loss.
        """
        config = self.sdpo_config
        mode = "train" if self.model.training else "eval"
        rows = distilled_rows(inputs)
        has_signal = bool(inputs["self_distillation_mask"][rows].any())
        student = self.accelerator.unwrap_model(model)
        head = linear_head(student)
        completion_ids, completion_mask = inputs["completion_ids"][rows], inputs["completion_mask"][rows]
        student_out = (
            self._student_outputs(model, inputs, rows, head) if student_hidden is None else student_hidden[rows]
        )
        # Without a signal the rows are `distilled_rows`' placeholder; in several processes the teacher still runs on
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
                logit_softcap=logit_softcap(student),
                teacher_coefficients=teacher.term_coefficients,
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
        return HeadInputs((student_out.detach(),), (head.weight,)) + teacher.scaled(gamma) + frame.scaled(-gamma)

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
                terms = HeadInputs(tuple(h[active] for h in teacher.hidden), teacher.weight, teacher.coefficients)
                values = head_entropy(terms, temperature, chunk, logit_softcap(student))
            else:
                values = token_entropy(teacher / self.temperature)[active]
            entropy[part] = torch.zeros_like(completion_mask, dtype=entropy.dtype).masked_scatter(active, values)
        return entropy

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


def distilled_rows(inputs) -> torch.Tensor:
    """The rows the distillation loss forwards: the distilled completions (deviation D3 in docs/deviations.md).

    Without any, the first row still runs through the student so that the loss is a zero connected to the model
    (every process must take part in backward); its distillation mask keeps it out of the loss.
    """
    rows = inputs["self_distillation_mask"].nonzero().squeeze(1)
    return rows if rows.numel() > 0 else rows.new_zeros(1)


def _drop_shared_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the left-padding columns that every row of a left-padded batch has (the batch was padded globally)."""
    keep_from = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else mask.size(1) - 1
    return ids[:, keep_from:], mask[:, keep_from:]
