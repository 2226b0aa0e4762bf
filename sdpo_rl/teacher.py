"""Teacher strategies: where the teacher's logits come from and how the teacher follows the student.

Every teacher answers two questions behind one small interface:

- `completion_logits(student, input_ids, attention_mask, logits_to_keep)`: the teacher's logits at the positions that
  predict the last `logits_to_keep` tokens, without gradient and in eval mode (no dropout);
- `update(student)`: what happens after each optimizer step.

`ema` keeps its own copy of the weights and moves it toward the student (spec section 4); `frozen` keeps the initial
weights (a copy, or the base model with the adapter disabled for a PEFT student).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import SDPOConfig


def completion_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """Logits `[B, logits_to_keep, V]` that predict the last `logits_to_keep` tokens of `input_ids: [B, L]`.

    The model returns the logits of the last `logits_to_keep + 1` positions; the last one predicts the token after
    the sequence and is dropped, so position t predicts `input_ids[:, L - logits_to_keep + t]`.
    """
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, use_cache=False
    )
    return outputs.logits[:, :-1, :]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


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


class Teacher:
    """Interface of a teacher; see the module docstring."""

    def completion_logits(
        self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def update(self, student: nn.Module) -> None:
        """Called after every optimizer step whose gradient norm was finite."""


class CopiedWeightsTeacher(Teacher):
    """A separate copy of the student's initial weights, EMA-updated at `rate` (rate 0 = frozen).

    EMA (spec section 4): theta_T <- (1 - r) theta_T + r theta_S, done in place with one fused `lerp` over all
    parameters, matched by name.
    """

    def __init__(self, student: nn.Module, rate: float):
        self.model = detached_copy(student)
        self.rate = rate
        teacher_params = dict(self.model.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise RuntimeError("The teacher copy does not have the same parameters as the student.")
        self._pairs = [(teacher_params[name], student_params[name]) for name in teacher_params]

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        with torch.no_grad():
            return completion_logits(self.model, input_ids, attention_mask, logits_to_keep)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        if self.rate == 0.0:
            return
        teacher_tensors = [t.data for t, _ in self._pairs]
        student_tensors = [s.data.to(t.dtype) for t, s in self._pairs]
        torch._foreach_lerp_(teacher_tensors, student_tensors, self.rate)


class AdapterDisabledTeacher(Teacher):
    """Frozen teacher of a PEFT student: the shared base model with the adapter disabled; no copy is made."""

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        with torch.no_grad(), eval_mode(student), student.disable_adapter():
            return completion_logits(student, input_ids, attention_mask, logits_to_keep)


def build_teacher(config: SDPOConfig, student: nn.Module) -> Teacher:
    """The teacher for `config.teacher_mode`, built from the (unwrapped) student before training starts."""
    peft = is_peft_model(student)
    if config.teacher_mode == "frozen":
        return AdapterDisabledTeacher() if peft else CopiedWeightsTeacher(student, rate=0.0)
    if config.teacher_mode == "ema":
        if peft:
            raise ValueError(
                "SDPOConfig.teacher_mode='ema' copies the whole model, which a PEFT student does not need: use "
                "teacher_mode='frozen' (the base model with the adapter disabled) for a PEFT model."
            )
        return CopiedWeightsTeacher(student, rate=config.teacher_update_rate)
    raise ValueError(f"SDPOConfig.teacher_mode={config.teacher_mode!r} has no teacher implementation.")
