"""`HybridLoss`: TRL's GRPO loss as a second term beside the distillation, the routed sum or the `grpo_weight` blend.

With a model whose head is a plain linear layer, one student forward serves both terms and the head projects each
completion token once for both (`_one_pass_hybrid`): the distillation's chunk pass folds TRL's GRPO gradient, known
in advance on policy (`_expected_grpo_logp_gradient`, `sdpo_rl.loss.grpo_gradient`), into its own, and hands the
completions' log-probs and entropies to TRL's `_compute_loss` through `CPUFastPath.scored_completions`
(`sdpo_rl.cpu_fast_path`). A mixin of `SDPOTrainer`, next to `DistillationStep` (`sdpo_rl.distillation`) and
`CPUFastPath`, whose methods it calls.
"""

from __future__ import annotations

import torch
from torch import nn
from trl import GRPOTrainer

from .distillation import distilled_rows
from .forward import linear_head
from .loss.chunked import PolicyGradient
from .loss.grpo_gradient import GRPOLossSettings, on_policy_logp_gradient
from .metrics import GRPO_LOSS, ONE_PASS_HYBRID


class HybridLoss:
    """The loss with TRL's GRPO term (the module docstring); TRL's term is `GRPOTrainer._compute_loss`'s."""

    def _hybrid_loss(self, model, inputs) -> torch.Tensor:
        """The routed sum (`sample_routing`) or the `grpo_weight` blend of TRL's GRPO loss and the distillation loss,
        from one student forward where `_one_pass_hybrid_blocker` allows."""
        config = self.sdpo_config
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
            grpo_loss = GRPOTrainer._compute_loss(self, model, grpo_inputs)
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

    def _one_pass_hybrid(self, model, inputs, grpo_inputs, head: nn.Linear, relative_grpo_weight: float):
        """``(GRPO loss, distillation loss)`` from one student forward, the head projecting each token once.

        The distillation's chunk pass also returns the student's log-probs of the distilled tokens and folds TRL's
        GRPO gradient w.r.t. them into its own (`sdpo_rl.loss.grpo_gradient`); the other completion tokens are scored by
        TRL's chunked log-prob kernel, compact. TRL's `_compute_loss` then computes its loss and metrics from these
        log-probs and entropies, handed over by `scored_completions`, instead of running its own forward.
        """
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        every_row = torch.arange(completion_ids.size(0), device=completion_ids.device)
        student_hidden = self._student_outputs(model, inputs, every_row, head)
        expected = self._expected_grpo_logp_gradient(grpo_inputs)
        rows = distilled_rows(inputs)
        policy = PolicyGradient(None if expected is None else relative_grpo_weight * expected[rows])
        distillation = self._self_distillation_loss(model, inputs, student_hidden, policy)
        others = (completion_mask > 0) & ~distillation.scored  # the distillation left them 0
        logps, entropies = self._score_completion_tokens(
            student_hidden, head, completion_ids, others, distillation.logps, distillation.student_entropy
        )
        with self.scored_completions(logps, entropies):
            grpo_loss = GRPOTrainer._compute_loss(self, model, grpo_inputs)
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
