"""Where a parameter's values live when training shards parameters over processes (DeepSpeed ZeRO-3, FSDP).

The EMA teacher updates each process's local shards in place, as the reference does with FSDP: two parameters of the
same shape are sharded alike (DeepSpeed ZeRO-3 splits every flattened parameter evenly over the processes, FSDP2
splits dim 0), so the elementwise update of the shards is the update of the whole tensors, with no communication.
"""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a PyTorch build without distributed support: nothing can be a DTensor
    DTensor = ()


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
