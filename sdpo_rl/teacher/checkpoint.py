"""The teacher in checkpoints: saving and restoring its state, and keeping it out of a saved student."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

from safetensors.torch import load_file, save_file
from torch import nn

from ..sharding import is_sharded
from .base import TEACHER_ADAPTER_NAME, Teacher, is_peft_model

TEACHER_WEIGHTS_FILE = "teacher.safetensors"
TEACHER_INFO_FILE = "teacher.json"


@contextmanager
def hidden_teacher_adapter(model: nn.Module) -> Iterator[None]:
    """Hide the `lora_ema` teacher adapter from PEFT while saving, so `save_pretrained` writes the student only."""
    peft_config = getattr(model, "peft_config", None)
    hidden = peft_config.pop(TEACHER_ADAPTER_NAME, None) if is_peft_model(model) else None
    try:
        yield
    finally:
        if hidden is not None:
            peft_config[TEACHER_ADAPTER_NAME] = hidden


def save_teacher(teacher: Teacher, directory: str, mode: str) -> None:
    """Write the teacher's state to `directory` (`teacher.safetensors` and `teacher.json`)."""
    state = teacher.state_tensors()
    sharded = [name for name, tensor in state.items() if is_sharded(tensor)]
    if sharded:
        raise NotImplementedError(
            f"The teacher's {sharded[0]} is sharded over processes (DeepSpeed ZeRO-3 or FSDP2), and saving a sharded "
            "teacher with a checkpoint is not supported: train with save_strategy='no' and save the final student "
            "with trainer.save_model(), or use DDP / ZeRO-1/2 to checkpoint the teacher (docs/distributed.md)."
        )
    os.makedirs(directory, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}
    save_file(tensors, os.path.join(directory, TEACHER_WEIGHTS_FILE))
    with open(os.path.join(directory, TEACHER_INFO_FILE), "w") as f:
        json.dump({"teacher_mode": mode, "tensors": len(tensors)}, f)


def load_teacher(teacher: Teacher, directory: str, mode: str) -> None:
    """Restore what `save_teacher` wrote, in place; the saved mode and tensor names must match this teacher."""
    with open(os.path.join(directory, TEACHER_INFO_FILE)) as f:
        saved_mode = json.load(f)["teacher_mode"]
    if saved_mode != mode:
        raise ValueError(
            f"The checkpoint's teacher at {directory} was saved with teacher_mode={saved_mode!r}, but this run uses "
            f"teacher_mode={mode!r}. Resume with the same SDPOConfig.teacher_mode."
        )
    saved = load_file(os.path.join(directory, TEACHER_WEIGHTS_FILE))
    current = teacher.state_tensors()
    if saved.keys() != current.keys():
        raise ValueError(
            f"The checkpoint's teacher at {directory} has {len(saved)} tensors that do not match this teacher's "
            f"{len(current)}: was it saved for another model?"
        )
    teacher.load_state_tensors(saved)
