"""The teacher's interface (`Teacher`, described in `sdpo_rl.teacher`) and the names every strategy module shares."""

from __future__ import annotations

import torch
from torch import nn

from ..forward import HeadInputs

TEACHER_ADAPTER_NAME = "sdpo_teacher"


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


class Teacher:
    """Interface of a teacher; see `sdpo_rl.teacher`'s docstring."""

    def completion_logits(
        self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def completion_head_inputs(
        self,
        student: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        share_prompts: bool = False,
    ) -> HeadInputs:
        """What `completion_logits` are projected from, for a student whose head is a `linear_head`; with
        `share_prompts`, rows with equal prompts run theirs once (`forward.completion_hidden`)."""
        raise NotImplementedError

    def update(self, student: nn.Module) -> None:
        """Called after every optimizer step whose gradient norm was finite; most teachers do nothing."""

    def to(self, device: torch.device) -> None:
        """Move the teacher's own weights, if it has any, to the student's training device."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors that rebuild this teacher exactly when loaded back into a fresh one."""
        return {}

    @torch.no_grad()
    def load_state_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors()` returned, from tensors with the same names."""
        for name, tensor in self.state_tensors().items():
            tensor.copy_(saved[name])
