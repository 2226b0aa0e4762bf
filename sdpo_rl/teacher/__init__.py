"""Teacher strategies: where the teacher's logits come from and how the teacher follows the student (one module
per strategy, chosen by `build_teacher`).

Every teacher answers three questions behind one small interface:

- `completion_logits(student, input_ids, attention_mask, logits_to_keep)`: the teacher's logits at the positions that
  predict the last `logits_to_keep` tokens, without gradient and in eval mode (no dropout); or, for models whose
  output head is a plain linear layer (`linear_head`), `completion_head_inputs(...)`: the final hidden states and
  head weights those logits are projected from, so that the loss can project them a chunk of tokens at a time;
- `update(student)`: what happens after each optimizer step;
- `state_tensors()`: the named tensors that must be saved with a checkpoint to rebuild the teacher exactly.

Modes (docs/teachers.md):

- `ema`: a full copy of the initial weights, moved toward the student after each step;
- `frozen`: the initial weights (a copy, or the base model with the adapter disabled for a PEFT student);
- `lora_ema`: a second LoRA adapter on the student's own base model, EMA-updated from the student's adapter;
- `trust_region`: logits `(1 - r) z_ref + r z_theta` of the initial and the current weights, no weights of its own.

Sharded training (docs/distributed.md): the EMA updates each process's local shards in place (`sdpo_rl.sharding`).
That holds for `lora_ema`, whose adapter lives in the sharded student; a full copy of the weights (`ema`, or
`frozen`/`trust_region` without PEFT) is not sharded and is refused under ZeRO-3 and FSDP.

Checkpoints: `sdpo_rl.teacher.checkpoint` saves and restores `state_tensors()`.
"""

from __future__ import annotations

from torch import nn

from ..config import SDPOConfig
from ..sharding import parameter_sharding
from .adapter import AdapterDisabledTeacher, LoraEMATeacher
from .base import TEACHER_ADAPTER_NAME, Teacher, is_peft_model
from .copied import CopiedWeightsTeacher, detached_copy
from .ema import FloatEMA, ema_update_
from .trust_region import TrustRegionTeacher

__all__ = [
    "TEACHER_ADAPTER_NAME",
    "AdapterDisabledTeacher",
    "CopiedWeightsTeacher",
    "FloatEMA",
    "LoraEMATeacher",
    "Teacher",
    "TrustRegionTeacher",
    "build_teacher",
    "detached_copy",
    "ema_update_",
    "is_peft_model",
]


def _require_lora(student: nn.Module) -> None:
    if not is_peft_model(student):
        raise ValueError(
            "SDPOConfig.teacher_mode='lora_ema' needs a PEFT LoRA model (pass a PeftModel, or "
            f"peft_config=LoraConfig(...) to SDPOTrainer), got {type(student).__name__}. For a full model use "
            "teacher_mode='ema'."
        )
    peft_type = str(getattr(student.peft_config[student.active_adapter], "peft_type", ""))
    if "LORA" not in peft_type.upper():
        raise ValueError(
            f"SDPOConfig.teacher_mode='lora_ema' needs a LoRA adapter, got peft_type={peft_type!r}. "
            "Use teacher_mode='frozen' or 'trust_region' with other PEFT methods."
        )


def build_teacher(config: SDPOConfig, student: nn.Module) -> Teacher:
    """The teacher for `config.teacher_mode`, built from the unwrapped student before training starts."""
    mode, rate = config.teacher_mode, config.teacher_update_rate
    peft = is_peft_model(student)
    if parameter_sharding() == "FSDP1":
        raise ValueError(
            "SDPOTrainer supports FSDP2 only: every teacher but a full copy runs the unwrapped student, whose "
            "parameters FSDP1 leaves sharded outside its own forward. Set fsdp_version: 2 in the accelerate config "
            "(docs/distributed.md)."
        )

    def initial_weights() -> Teacher:
        return AdapterDisabledTeacher() if peft else CopiedWeightsTeacher(student, rate=0.0)

    if mode == "frozen":
        return initial_weights()
    if mode == "trust_region":
        return TrustRegionTeacher(initial_weights(), rate)
    if mode == "lora_ema":
        _require_lora(student)
        return LoraEMATeacher(student, rate)
    if mode == "ema":
        if peft:
            raise ValueError(
                "SDPOConfig.teacher_mode='ema' copies the whole model, which a PEFT student does not need: use "
                "teacher_mode='lora_ema' (an EMA teacher adapter on the shared base model), 'frozen' or "
                "'trust_region'."
            )
        return CopiedWeightsTeacher(student, rate=rate)
    raise ValueError(f"SDPOConfig.teacher_mode={mode!r} has no teacher implementation.")
