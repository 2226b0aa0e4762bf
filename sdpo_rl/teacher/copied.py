"""`ema` and `frozen` without PEFT: a separate full copy of the student's initial weights (docs/teachers.md).

A full copy is not sharded, so it is refused under ZeRO-3 and FSDP (docs/distributed.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..forward import no_grad_head_inputs, no_grad_logits
from ..sharding import paired_shards, parameter_sharding
from .base import Teacher
from .ema import FloatEMA


def detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with its own weights, no gradients, in eval mode, and its original forwards.

    TRL patches `model.forward` (fused LM head) and, with `cast_lm_head_to_fp32`, `lm_head.forward` as instance
    attributes whose closures point at the *student's* modules; a plain deep copy would keep calling them and
    silently return the student's outputs. Dropping those instance attributes restores each class's own forward.
    """
    teacher = copy.deepcopy(model)
    for module in teacher.modules():
        module.__dict__.pop("forward", None)
    teacher.requires_grad_(False)
    teacher.eval()
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        # With `cast_lm_head_to_fp32` the head's weight can be float32 while the hidden states are not.
        head.register_forward_pre_hook(lambda module, args: tuple(a.to(module.weight.dtype) for a in args))
    return teacher


class CopiedWeightsTeacher(Teacher):
    """A separate copy of the student's initial weights, EMA-updated at `rate` (rate 0 = frozen).

    Memory: one more full set of weights (no gradients, no optimizer state), plus their float32 master copy when
    the weights are in a lower precision and the rate is not 0 (`FloatEMA`).
    """

    def __init__(self, student: nn.Module, rate: float):
        sharding = parameter_sharding()
        if sharding is not None:
            raise ValueError(
                f"This run shards parameters ({sharding}), but a teacher with a full copy of the weights "
                "(teacher_mode='ema', or 'frozen'/'trust_region' without PEFT) would be a whole unsharded model on "
                "every process, which the EMA cannot update from the student's shards. Use a PEFT student with "
                "teacher_mode='lora_ema', 'frozen' or 'trust_region', or DDP / DeepSpeed ZeRO-1/2 for full "
                "fine-tuning. See docs/distributed.md."
            )
        self.model = detached_copy(student)
        paired_shards(dict(self.model.named_parameters()), dict(student.named_parameters()))
        self.ema = FloatEMA(rate) if rate > 0.0 else None

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        return no_grad_logits(self.model, input_ids, attention_mask, logits_to_keep)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep, share_prompts=False):
        return no_grad_head_inputs(self.model, input_ids, attention_mask, logits_to_keep, share_prompts)

    def update(self, student: nn.Module) -> None:
        if self.ema is not None:
            self.ema.step(dict(self.model.named_parameters()), dict(student.named_parameters()))

    def to(self, device: torch.device) -> None:
        # Under DeepSpeed or FSDP the trainer leaves the student on the CPU until training starts, so the copy made at
        # construction is there too; `Module.to` moves nothing when it is already in place.
        self.model.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return params if self.ema is None else self.ema.state(params)

    def load_state_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        if self.ema is None:
            super().load_state_tensors(saved)
        else:
            self.ema.restore(dict(self.model.named_parameters()), saved)
