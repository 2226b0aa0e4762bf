"""Teacher strategies: where the teacher's logits come from and how the teacher follows the student.

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

Checkpoints: `sdpo_rl.teacher_checkpoint` saves and restores `state_tensors()`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import SDPOConfig
from .forward import HeadInputs, no_grad_head_inputs, no_grad_logits
from .sharding import is_sharded, local_shard, paired_shards, parameter_sharding

TEACHER_ADAPTER_NAME = "sdpo_teacher"


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


@torch.no_grad()
def ema_update_(pairs: list[tuple[torch.Tensor, torch.Tensor]], rate: float) -> None:
    """theta_T <- (1 - rate) theta_T + rate theta_S for every (teacher, student) pair, in place, in one fused op."""
    teacher = [t for t, _ in pairs]
    student = [s.to(t.dtype) for t, s in pairs]
    torch._foreach_lerp_(teacher, student, rate)


def _below_float32(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32


class FloatEMA:
    """The EMA of the teacher's weights toward the student's, accumulated in float32 whatever the weights' dtype.

    In bfloat16 most EMA steps round away: at rate 0.05, ``r (theta_S - theta_T)`` is below half a bfloat16 ulp of
    ``theta_T`` unless the student moved by more than about 8% of a weight's magnitude, so a bf16 teacher barely
    follows the student. A teacher whose weights are below float32 therefore keeps a float32 master copy of each
    local shard, takes the step there, and runs its forward with the master's rounded value; float32 weights are their
    own master (no extra memory).

    The masters are made when first needed (the first step, or a checkpoint's restore), from the local shard as it is
    then, not when the teacher is built: `accelerator.prepare` may still cast the weights (DeepSpeed's bf16 casts a
    float32 adapter, which then needs a master) or shard them (a master of the whole tensor would not match the
    shard). A master whose shape no longer matches its shard is made again. Parameters are looked up by name at every
    call (FSDP2 replaces them).
    """

    def __init__(self, rate: float):
        self.rate = rate
        self.master: dict[str, torch.Tensor] = {}

    def _accumulators(self, teacher_params: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(accumulator, teacher shard) per parameter: the float32 master where the shard is below float32, else the
        shard; a missing master is made from the shard, one on another device follows it."""
        pairs = []
        for name, param in teacher_params.items():
            shard = local_shard(param)
            master = self.master.get(name)
            if master is not None and master.shape != shard.shape:
                master = None  # the shard changed since the master was made
            if master is None and _below_float32(shard):
                master = shard.detach().float().clone()
            elif master is not None and master.device != shard.device:
                master = master.to(shard.device)  # the teacher was moved to the training device
            if master is not None:
                self.master[name] = master
            pairs.append((shard if master is None else master, shard))
        return pairs

    @torch.no_grad()
    def step(self, teacher_params: dict[str, torch.Tensor], student_params: dict[str, torch.Tensor]) -> None:
        """One EMA step of every teacher parameter toward the student's parameter of the same name."""
        students = [student for _, student in paired_shards(teacher_params, student_params)]
        accumulators = self._accumulators(teacher_params)
        ema_update_([(acc, student) for (acc, _), student in zip(accumulators, students, strict=True)], self.rate)
        self._round_into(accumulators)

    @staticmethod
    def _round_into(accumulators: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for accumulator, shard in accumulators:
            if accumulator is not shard:
                shard.copy_(accumulator)

    def state(self, teacher_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the float32 master where there is one (a sharded parameter stays as it is)."""
        return {
            name: self.master[name] if name in self.master and not is_sharded(param) else param
            for name, param in teacher_params.items()
        }

    @torch.no_grad()
    def restore(self, teacher_params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's `state` into the masters (made for the weights as they are now) and the weights."""
        accumulators = self._accumulators(teacher_params)
        for name, tensor in self.state(teacher_params).items():
            tensor.copy_(saved[name])
        self._round_into(accumulators)


class Teacher:
    """Interface of a teacher; see the module docstring."""

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
        """The mixture as two terms: ``(1 - r) h_ref @ W_ref.T + r h_theta @ W_theta.T``."""
        reference = self.reference.completion_head_inputs(
            student, input_ids, attention_mask, logits_to_keep, share_prompts
        )
        current = no_grad_head_inputs(student, input_ids, attention_mask, logits_to_keep, share_prompts)
        return HeadInputs(
            hidden=tuple((1.0 - self.rate) * h for h in reference.hidden)
            + tuple(self.rate * h for h in current.hidden),
            weight=reference.weight + current.weight,
        )

    def to(self, device: torch.device) -> None:
        self.reference.to(device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.reference.state_tensors()


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
