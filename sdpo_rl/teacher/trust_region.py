"""`trust_region`: the teacher's logits mix the initial and the current weights' (docs/teachers.md)."""

from __future__ import annotations

import torch

from ..forward import no_grad_head_inputs, no_grad_logits
from .base import Teacher


class TrustRegionTeacher(Teacher):
    """Teacher logits `(1 - r) z_ref + r z_theta` on the teacher prompt (docs/teachers.md).

    `z_ref` comes from the initial weights (`reference`), `z_theta` from the current student, both without gradient.
    At temperature 1 this is the geometric mixture pi_ref^(1 - r) pi_theta^r, a teacher that cannot drift further
    from the initial policy than the student itself.
    """

    def __init__(self, reference: Teacher, rate: float):
        self.reference = reference
        self.rate = rate

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        reference = self.reference.completion_logits(student, input_ids, attention_mask, logits_to_keep)
        current = no_grad_logits(student, input_ids, attention_mask, logits_to_keep)
        return torch.lerp(reference, current.to(reference.dtype), self.rate)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep, share_prompts=False):
        """The mixture as two terms, ``(1 - r) z_ref`` and ``r z_theta``."""
        reference = self.reference.completion_head_inputs(
            student, input_ids, attention_mask, logits_to_keep, share_prompts
        )
        current = no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep, share_prompts)
        return reference.scaled(1.0 - self.rate) + current.scaled(self.rate)

    def to(self, device: torch.device) -> None:
        self.reference.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.reference.state_tensors()
