"""Teacher strategies: where the teacher's logits come from and how the teacher follows the student.

Every teacher answers three questions behind one small interface:

- `completion_logits(student, input_ids, attention_mask, logits_to_keep)`: the teacher's logits at the positions that
  predict the last `logits_to_keep` tokens, without gradient and in eval mode (no dropout); or, for models whose
  output head is a plain linear layer (`linear_head`), `completion_head_inputs(...)`: the final hidden states and
  head weights those logits are projected from, so that the loss can project them a chunk of tokens at a time;
- `update(student)`: what happens after each optimizer step;
- `state_tensors()`: the named tensors that must be saved with a checkpoint to rebuild the teacher exactly.

Modes (spec section 4, docs/teachers.md):

- `ema`: a full copy of the initial weights, moved toward the student after each step;
- `frozen`: the initial weights (a copy, or the base model with the adapter disabled for a PEFT student);
- `lora_ema`: a second LoRA adapter on the student's own base model, EMA-updated from the student's adapter;
- `trust_region`: logits `(1 - r) z_ref + r z_theta` of the initial and the current weights, no weights of its own.

Sharded training (docs/distributed.md). The EMA updates each process's local shards in place, as the reference does
with FSDP: two parameters of the same shape are sharded alike (DeepSpeed ZeRO-3 splits every flattened parameter
evenly over the processes, FSDP2 splits dim 0), so the elementwise update of the shards is the update of the whole
tensors, with no communication. That holds for `lora_ema`, whose adapter lives in the sharded student; a full copy of
the weights (`ema`, or `frozen`/`trust_region` without PEFT) is not sharded and is refused under ZeRO-3 and FSDP.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import SDPOConfig

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a PyTorch build without distributed support: nothing can be a DTensor
    DTensor = ()

TEACHER_ADAPTER_NAME = "sdpo_teacher"
TEACHER_WEIGHTS_FILE = "teacher.safetensors"
TEACHER_INFO_FILE = "teacher.json"
# Config fields of models whose logits are a transform of the head's projection (soft-capping, scaling), as read by
# TRL's fused LM head: the loss from hidden states would miss the transform, so these models use the logits.
_LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


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


@dataclass(frozen=True)
class HeadInputs:
    """Logits given as ``sum_i hidden[i] @ weight[i].T``: hidden states ``[B, T, H_i]``, head weights ``[V, H_i]``.

    One term for a model's own head; two for the trust-region teacher's mixture of two models' logits.
    """

    hidden: tuple[torch.Tensor, ...]
    weight: tuple[torch.Tensor, ...]


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output head if `model`'s logits are exactly a bias-free `nn.Linear` of its final hidden states, else None.

    None as well for a head that is a subclass or wrapper (PEFT LoRA or `modules_to_save`, quantised layers), a
    sharded head weight (its full value exists only inside the model's forward), and models whose config transforms
    the projection (`_LOGIT_TRANSFORM_FIELDS`).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or is_sharded(head.weight):
        return None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, field, None) not in (None, 1.0) for field in _LOGIT_TRANSFORM_FIELDS):
        return None
    return head


def completion_hidden(
    model: nn.Module, head: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """Final hidden states ``[B, logits_to_keep, H]`` whose projection by `head` is `completion_logits`.

    Runs `model`'s own forward, so that its wrappers (DDP, PEFT, gradient checkpointing) still apply, with a pre-hook
    on `head` that keeps the head's input and hands it an empty slice instead: no position is projected.
    """
    inputs = []

    def keep_input(module, args):
        inputs.append(args[0])
        return (args[0][:, :0], *args[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, use_cache=False)
    finally:
        handle.remove()
    if len(inputs) != 1:
        raise RuntimeError(f"The output head ran {len(inputs)} times in one forward of {type(model).__name__}.")
    return inputs[0][:, -(logits_to_keep + 1) : -1]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def no_grad_logits(model: nn.Module, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
    """`completion_logits` of `model` in eval mode, without gradient."""
    with torch.no_grad(), eval_mode(model):
        return completion_logits(model, input_ids, attention_mask, logits_to_keep)


def no_grad_head_inputs(model: nn.Module, input_ids, attention_mask, logits_to_keep: int) -> HeadInputs:
    """`completion_hidden` of `model` in eval mode, without gradient, with its head's weight."""
    head = linear_head(model)
    if head is None:
        raise ValueError(f"The output head of {type(model).__name__} is not a plain linear layer: use its logits.")
    with torch.no_grad(), eval_mode(model):
        hidden = completion_hidden(model, head, input_ids, attention_mask, logits_to_keep)
    return HeadInputs((hidden,), (head.weight,))


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


def _fsdp1_flattened(param: torch.Tensor) -> bool:
    return getattr(param, "_fsdp_flattened", False)


def is_sharded(param: torch.Tensor) -> bool:
    """Whether only a shard of `param` lives on this process (DeepSpeed ZeRO-3, FSDP2 DTensor, FSDP1 flat)."""
    return hasattr(param, "ds_tensor") or isinstance(param.data, DTensor) or _fsdp1_flattened(param)


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """The part of `param` this process holds, as a plain tensor sharing its storage: all of it unless sharded.

    DeepSpeed ZeRO-3 keeps the shard in `param.ds_tensor` (`param.data` is an empty placeholder outside forward);
    an FSDP2 parameter is a DTensor whose shard is `to_local()`.
    """
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor
    return param.data.to_local() if isinstance(param.data, DTensor) else param.data


def parameter_sharding() -> str | None:
    """How this accelerate run shards parameters over processes: "DeepSpeed ZeRO-3", "FSDP1", "FSDP2" or None."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:  # no accelerate run configured (a teacher built outside a trainer)
        return None
    state = AcceleratorState()
    if state.distributed_type == DistributedType.FSDP:
        return "FSDP2" if state.is_fsdp2 else "FSDP1"
    if state.distributed_type == DistributedType.DEEPSPEED and state.deepspeed_plugin.zero_stage == 3:
        return "DeepSpeed ZeRO-3"
    return None


def paired_shards(
    teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The local shards of each (teacher, student) pair of parameters, matched by name.

    Parameters are looked up when called, not kept: FSDP2 replaces a module's parameters when it shards it, so kept
    ones would be stale. Raises when the names differ or a pair's shards do not line up (one side sharded, or FSDP1's
    flattening, where the shards of two parameters hold unrelated elements).
    """
    if teacher.keys() != student.keys():
        raise RuntimeError("The teacher does not have the same parameters as the student.")
    pairs = []
    for name, teacher_param in teacher.items():
        teacher_shard, student_shard = local_shard(teacher_param), local_shard(student[name])
        flattened = _fsdp1_flattened(teacher_param) or _fsdp1_flattened(student[name])
        if teacher_shard.shape != student_shard.shape or flattened:
            raise ValueError(
                f"The teacher's and the student's local shards of {name} do not line up (shapes "
                f"{tuple(teacher_shard.shape)} and {tuple(student_shard.shape)}, sharded: {is_sharded(teacher_param)} "
                f"and {is_sharded(student[name])}), so the EMA cannot update them in place. Under DeepSpeed ZeRO-3 or "
                "FSDP2 use a PEFT student with teacher_mode='lora_ema', 'frozen' or 'trust_region'; FSDP1 is not "
                "supported (set fsdp_version: 2). See docs/distributed.md."
            )
        pairs.append((teacher_shard, student_shard))
    return pairs


@torch.no_grad()
def ema_update_(pairs: list[tuple[torch.Tensor, torch.Tensor]], rate: float) -> None:
    """theta_T <- (1 - rate) theta_T + rate theta_S for every (teacher, student) pair, in place, in one fused op."""
    teacher = [t for t, _ in pairs]
    student = [s.to(t.dtype) for t, s in pairs]
    torch._foreach_lerp_(teacher, student, rate)


class Teacher:
    """Interface of a teacher; see the module docstring."""

    def completion_logits(
        self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> torch.Tensor:
        raise NotImplementedError

    def completion_head_inputs(
        self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
    ) -> HeadInputs:
        """What `completion_logits` are projected from, for a student whose head is a `linear_head`."""
        raise NotImplementedError

    def update(self, student: nn.Module) -> None:
        """Called after every optimizer step whose gradient norm was finite; most teachers do nothing."""

    def to(self, device: torch.device) -> None:
        """Move the teacher's own weights, if it has any, to the student's training device."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors that rebuild this teacher exactly when loaded back into a fresh one."""
        return {}


class CopiedWeightsTeacher(Teacher):
    """A separate copy of the student's initial weights, EMA-updated at `rate` (rate 0 = frozen).

    Memory: one more full set of weights (no gradients, no optimizer state).
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
        self.rate = rate
        paired_shards(dict(self.model.named_parameters()), dict(student.named_parameters()))

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        return no_grad_logits(self.model, input_ids, attention_mask, logits_to_keep)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep):
        return no_grad_head_inputs(self.model, input_ids, attention_mask, logits_to_keep)

    def update(self, student: nn.Module) -> None:
        if self.rate > 0.0:
            ema_update_(paired_shards(dict(self.model.named_parameters()), dict(student.named_parameters())), self.rate)

    def to(self, device: torch.device) -> None:
        # Under DeepSpeed or FSDP the trainer leaves the student on the CPU until training starts, so the copy made at
        # construction is there too; `Module.to` moves nothing when it is already in place.
        self.model.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.named_parameters())


class AdapterDisabledTeacher(Teacher):
    """The initial weights of a PEFT student: its base model with the adapter disabled; nothing is copied."""

    def completion_logits(self, student, input_ids, attention_mask, logits_to_keep):
        with student.disable_adapter():
            return no_grad_logits(student, input_ids, attention_mask, logits_to_keep)

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep):
        with student.disable_adapter():
            return no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep)


class LoraEMATeacher(Teacher):
    """A second LoRA adapter on the student's base model, EMA-updated from the student's adapter.

    The EMA is taken factor by factor: A_T <- (1 - r) A_T + r A_S and B_T <- (1 - r) B_T + r B_S. That is not the EMA
    of the weight update B·A: the teacher's update B_T·A_T contains cross terms of old and new factors. It starts
    exact (the teacher's factors are a copy) and the gap is second order in how far the factors moved within the
    EMA's horizon; see docs/teachers.md.
    """

    def __init__(self, student: nn.Module, rate: float):
        self.rate = rate
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

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep):
        with self._active(student):
            return no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep)

    def update(self, student: nn.Module) -> None:
        ema_update_(paired_shards(*self._adapter_parameters(student)), self.rate)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self._adapter_parameters(self.student)[0]


class TrustRegionTeacher(Teacher):
    """Teacher logits `(1 - r) z_ref + r z_theta` on the teacher prompt (spec section 4).

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

    def completion_head_inputs(self, student, input_ids, attention_mask, logits_to_keep):
        """The mixture as two terms: ``(1 - r) h_ref @ W_ref.T + r h_theta @ W_theta.T``."""
        reference = self.reference.completion_head_inputs(student, input_ids, attention_mask, logits_to_keep)
        current = no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep)
        return HeadInputs(
            hidden=tuple((1.0 - self.rate) * h for h in reference.hidden)
            + tuple(self.rate * h for h in current.hidden),
            weight=reference.weight + current.weight,
        )

    def to(self, device: torch.device) -> None:
        self.reference.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.reference.state_tensors()


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
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(saved[name])
