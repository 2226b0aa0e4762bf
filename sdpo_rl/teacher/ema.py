"""The EMA of teacher weights: `theta_T <- (1 - r) theta_T + r theta_S`, with a float32 master copy for weights below
float32 (`FloatEMA`). Sharded training: the EMA updates each process's local shards in place (`sdpo_rl.sharding`).
"""

from __future__ import annotations

import torch

from ..sharding import is_sharded, local_shard, paired_shards


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
