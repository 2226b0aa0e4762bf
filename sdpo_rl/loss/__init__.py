"""The SDPO losses, pure tensor math without model code (docs/how-it-works.md section 4).

- `self_distillation`: the self-distillation loss from ``[B, T, V]`` logits (`self_distillation_loss`) and the
  per-token math it shares with the chunked twin.
- `chunked`: the same loss from final hidden states and output heads, a chunk of tokens at a time
  (`self_distillation_loss_from_hidden`), optionally folding in the gradient of a second loss (`PolicyGradient`).
- `grpo_gradient`: the gradient of TRL's GRPO loss w.r.t. the log-probabilities, which the hybrid folds into the
  chunk pass.
"""

from .chunked import PolicyGradient, default_chunk_size, self_distillation_loss_from_hidden
from .grpo_gradient import GRPOLossSettings, on_policy_logp_gradient
from .self_distillation import (
    LOSS_AGG_MODES,
    LossSettings,
    aggregate,
    check_token_shapes,
    distillation_mask,
    divergence,
    importance_weight,
    loss_dtype,
    per_token_divergence,
    per_token_loss,
    sampled_token_logps,
    self_distillation_loss,
    support_divergence,
    support_indices,
    support_loss,
    token_entropy,
)

__all__ = [
    "LOSS_AGG_MODES",
    "GRPOLossSettings",
    "LossSettings",
    "PolicyGradient",
    "aggregate",
    "check_token_shapes",
    "default_chunk_size",
    "distillation_mask",
    "divergence",
    "importance_weight",
    "loss_dtype",
    "on_policy_logp_gradient",
    "per_token_divergence",
    "per_token_loss",
    "sampled_token_logps",
    "self_distillation_loss",
    "self_distillation_loss_from_hidden",
    "support_divergence",
    "support_indices",
    "support_loss",
    "token_entropy",
]
