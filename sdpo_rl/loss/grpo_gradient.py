"""The gradient of TRL's GRPO loss w.r.t. the per-token log-probabilities, known before they are computed.

On policy, the ratio ``pi_theta / pi_old`` TRL's loss clips is exactly 1 (TRL uses the log-probs themselves, detached,
as the old ones), so every loss type's gradient w.r.t. a token's log-prob is ``-advantage`` times the token's weight
in the loss type's aggregation, whatever the log-probs are. The hybrid folds this gradient into the distillation's
chunk pass (`sdpo_rl.loss.chunked.PolicyGradient`), so that both terms share one projection of the output head; if
the gradient TRL's loss then produces differs, the pass is recomputed, so this only decides the speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# TRL's loss types whose per-token loss is clipped or smoothed in the ratio (its gradient at ratio 1 is -advantage)
# or is `-ratio.clamp(max=epsilon_high).detach() * advantage * logp` (cispo) or `-phi * advantage * logp` with
# phi(1) = 1 (vespo).
_RATIO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo")


@dataclass(frozen=True)
class GRPOLossSettings:
    """What TRL's `_compute_loss` reads besides the batch, for one micro-batch."""

    loss_type: str
    epsilon_high: float
    max_completion_length: int
    accumulation_steps: int  # the current gradient accumulation steps in training, 1 in evaluation
    steps_per_generation: int  # 1 in evaluation
    num_processes: int


def on_policy_logp_gradient(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    num_items_in_batch: torch.Tensor | None,
    settings: GRPOLossSettings,
) -> torch.Tensor | None:
    """``d loss / d per_token_logps`` ``[B, T]`` of TRL's token-level GRPO loss on policy; None for other loss types.

    ``advantages`` ``[B]`` or ``[B, T]``; ``mask`` ``[B, T]`` the tokens the loss sums (completion mask times tool
    mask); ``num_items_in_batch`` the generation batch's token count (for dapo, cispo and vespo). The caller
    establishes the on-policy, token-level setting (no old log-probs, no vLLM correction, no KL or entropy terms).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(advantages.dtype)
    rows = mask.size(0)
    if settings.loss_type in _RATIO_LOSSES or settings.loss_type == "vespo":
        slope = -advantages
    elif settings.loss_type == "cispo":
        slope = -min(1.0, settings.epsilon_high) * advantages
    else:
        return None
    accumulation = settings.accumulation_steps
    if settings.loss_type in ("grpo", "sapo"):
        weight = mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / rows / accumulation
    elif settings.loss_type == "bnpo":
        weight = mask / mask.sum().clamp(min=1.0) / accumulation
    elif settings.loss_type == "dr_grpo":
        weight = mask / (rows * settings.max_completion_length) / accumulation
    elif settings.loss_type == "luspo":
        weight = mask / rows / accumulation
    else:  # dapo, cispo, vespo: normalised by the generation batch's token count
        normalizer = num_items_in_batch.clamp(min=1.0) / settings.num_processes
        weight = mask / (normalizer * accumulation / settings.steps_per_generation)
    return slope * weight
