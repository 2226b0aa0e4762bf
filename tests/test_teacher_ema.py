"""The EMA teacher accumulates in float32 whatever the model's dtype, and its checkpoint restores it exactly."""

import torch
from torch import nn

from sdpo_rl.teacher import CopiedWeightsTeacher
from sdpo_rl.teacher_checkpoint import load_teacher, save_teacher

RATE = 0.05
STEPS = 20
# bfloat16 has 8 significant bits: at 1.0 its spacing is 2**-7, so a student 2**-6 away moves an EMA at rate 0.05 by
# 2**-6 / 20, far below half a spacing: rounded to bfloat16 after every step, the teacher would never move.
GAP = 2.0**-6


def student_at(value: float, dtype: torch.dtype) -> nn.Module:
    model = nn.Linear(4, 3, bias=False).to(dtype)
    nn.init.constant_(model.weight, value)
    return model


def exact_ema() -> float:
    """The EMA of a weight starting at 1.0 toward 1.0 + GAP after STEPS steps, in float64."""
    return 1.0 + GAP * (1.0 - (1.0 - RATE) ** STEPS)


def test_bfloat16_teacher_follows_the_student_like_a_float32_one():
    student = student_at(1.0, torch.bfloat16)
    teacher = CopiedWeightsTeacher(student, rate=RATE)
    with torch.no_grad():
        student.weight.fill_(1.0 + GAP)
    for _ in range(STEPS):
        teacher.update(student)

    weight = teacher.model.weight
    assert weight.dtype == torch.bfloat16  # the forward runs in the model's dtype
    master = teacher.state_tensors()["weight"]
    assert master.dtype == torch.float32
    assert torch.allclose(master.double(), torch.full_like(master, exact_ema(), dtype=torch.float64), atol=1e-6)
    assert torch.equal(weight, master.to(torch.bfloat16))
    assert (weight > 1.0).all()  # a bfloat16 accumulation leaves it at exactly 1.0


def test_float32_teacher_is_its_own_master():
    student = student_at(1.0, torch.float32)
    teacher = CopiedWeightsTeacher(student, rate=RATE)
    assert teacher.state_tensors()["weight"] is teacher.model.weight
    with torch.no_grad():
        student.weight.fill_(1.0 + GAP)
    for _ in range(STEPS):
        teacher.update(student)
    assert torch.allclose(teacher.model.weight.double(), torch.full((3, 4), exact_ema(), dtype=torch.float64))


def test_bfloat16_teacher_checkpoint_keeps_the_float32_master(tmp_path):
    student = student_at(1.0, torch.bfloat16)
    teacher = CopiedWeightsTeacher(student, rate=RATE)
    with torch.no_grad():
        student.weight.fill_(1.0 + GAP)
    for _ in range(3):
        teacher.update(student)
    save_teacher(teacher, str(tmp_path), "ema")

    restored = CopiedWeightsTeacher(student_at(1.0, torch.bfloat16), rate=RATE)
    load_teacher(restored, str(tmp_path), "ema")
    assert torch.equal(restored.state_tensors()["weight"], teacher.state_tensors()["weight"])
    assert torch.equal(restored.model.weight, teacher.model.weight)
    # Both continue identically: the master, not the rounded weight, carries the state.
    for side in (teacher, restored):
        side.update(student)
    assert torch.equal(restored.state_tensors()["weight"], teacher.state_tensors()["weight"])
