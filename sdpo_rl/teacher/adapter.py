"""Teachers on a PEFT student's own base model: `frozen` (the adapter disabled) and `lora_ema` (a second LoRA
adapter, EMA-updated from the student's); nothing else is copied (docs/teachers.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..forward import no_grad_head_inputs, no_grad_logits
from ..sharding import paired_shards
from .base import TEACHER_ADAPTER_NAME, Teacher
from .ema import FloatEMA


class AdapterDisabledTeacher(Teacher):
    """The initial weights of a PEFT student: its base model with the adapter disabled; nothing is copied."""

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        with student.disable_adapter():
            return no_grad_logits(student, input_ids, attention_mask, logits_to_keep)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep, share_prompts=False):
        with student.disable_adapter():
            return no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep, share_prompts)


class LoraEMATeacher(Teacher):
    """A second LoRA adapter on the student's base model, EMA-updated from the student's adapter.

    The EMA is taken factor by factor: A_T <- (1 - r) A_T + r A_S and B_T <- (1 - r) B_T + r B_S. That is not the EMA
    of the weight update B·A: the teacher's update B_T·A_T contains cross terms of old and new factors. It starts
    exact (the teacher's factors are a copy) and the gap is second order in how far the factors moved within the
    EMA's horizon; see docs/teachers.md.
    """

    def __init__(self, student: nn.Module, rate: float):
        self.student = student
        self.student_adapter = student.active_adapter
        student.add_adapter(TEACHER_ADAPTER_NAME, copy.deepcopy(student.peft_config[self.student_adapter]))
        teacher_params, student_params = self._adapter_parameters(student)
        if not student_params:
            raise ValueError(f"The PEFT model has no parameters of its active adapter {self.student_adapter!r}.")
        with torch.no_grad():
            for teacher_shard, student_shard in paired_shards(teacher_params, student_params):
                teacher_shard.copy_(student_shard)
        for param in teacher_params.values():
            param.requires_grad_(False)
        self.ema = FloatEMA(rate)

    def _adapter_parameters(self, student: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The teacher's and the student's adapter parameters, both keyed by the student parameter's name.

        That name is stable across runs, so a checkpoint's tensors map back one to one.
        """
        student_segment, teacher_segment = f".{self.student_adapter}.", f".{TEACHER_ADAPTER_NAME}."
        params = dict(student.named_parameters())
        student_params = {name: param for name, param in params.items() if student_segment in name}
        teacher_params = {name: params[name.replace(student_segment, teacher_segment)] for name in student_params}
        return teacher_params, student_params

    @contextmanager
    def _active(self, student: nn.Module) -> Iterator[None]:
        student.set_adapter(TEACHER_ADAPTER_NAME, inference_mode=True)
        try:
            yield
        finally:
            student.set_adapter(self.student_adapter)

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        with self._active(student):
            return no_grad_logits(student, input_ids, attention_mask, logits_to_keep)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep, share_prompts=False):
        with self._active(student):
            return no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep, share_prompts)

    def update(self, student: nn.Module) -> None:
        self.ema.step(*self._adapter_parameters(student))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.ema.state(self._adapter_parameters(self.student)[0])

    def load_state_tensors(self, saved: dict[str, torch.Tensor]) -> None:
        self.ema.restore(self._adapter_parameters(self.student)[0], saved)
