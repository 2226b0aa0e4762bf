"""The EMA teacher accumulates in float32 whatever the model's dtype, also when training casts or shards it after
the teacher was built, and its checkpoint restores it exactly."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import make_model, make_tokenizer
from torch import nn

from sdpo_rl import SDPOConfig
from sdpo_rl.teacher import TEACHER_ADAPTER_NAME, CopiedWeightsTeacher, Teacher, build_teacher
from sdpo_rl.teacher.checkpoint import load_teacher, save_teacher

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


# ---- masters made at the first update, from the weights training uses (DeepSpeed's bf16 cast, ZeRO-3 shards) ------

DRIFT = 1e-4  # how far each student adapter value moves per step
DRIFT_STEPS = 300


def cast_after_construction(fill: float | None = None) -> tuple[PeftModel, Teacher]:
    """A tiny LoRA student and its `lora_ema` teacher, built in float32 and then cast to bfloat16, as DeepSpeed's bf16
    casts the whole model in `accelerator.prepare` (PEFT keeps a new adapter in float32 until then); with `fill`,
    every adapter value starts at it."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    student = get_peft_model(make_model(tokenizer), config)
    if fill is not None:
        move_student(student, fill)
    teacher = build_teacher(SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=RATE), student)
    student.to(torch.bfloat16)
    return student, teacher


def move_student(student: PeftModel, value: float) -> None:
    """Set every value of the student's adapter, where training keeps it (a ZeRO-3 shard or the weight)."""
    with torch.no_grad():
        for name, param in student.named_parameters():
            if ".default." in name:
                getattr(param, "ds_tensor", param.data).fill_(value)


def teacher_weights(teacher: Teacher, student: PeftModel) -> dict[str, torch.Tensor]:
    """The teacher adapter's parameters, keyed like its `state_tensors()`."""
    params = dict(student.named_parameters())
    return {name: params[name.replace(".default.", f".{TEACHER_ADAPTER_NAME}.")] for name in teacher.state_tensors()}


def test_lora_ema_cast_to_bfloat16_after_construction_keeps_the_exact_ema():
    student, teacher = cast_after_construction()
    params = dict(student.named_parameters())
    initial = {name: t.double() for name, t in teacher.state_tensors().items()}
    exact = dict(initial)
    generator = torch.Generator().manual_seed(0)
    target = {name: params[name].detach().double() for name in initial}
    steps = {name: DRIFT * torch.randn(t.shape, generator=generator, dtype=torch.float64) for name, t in target.items()}
    for _ in range(DRIFT_STEPS):
        with torch.no_grad():  # an optimizer step: DeepSpeed writes its float32 master into the bf16 weight
            for name in target:
                target[name] += steps[name]
                params[name].copy_(target[name])
        teacher.update(student)
        exact = {name: torch.lerp(e, params[name].detach().double(), RATE) for name, e in exact.items()}

    state = teacher.state_tensors()
    moved = sum(float(((state[n].double() - initial[n]) * (exact[n] - initial[n])).sum()) for n in exact)
    covered = moved / sum(float(((exact[n] - initial[n]) ** 2).sum()) for n in exact)
    # A float32 accumulation is exact to about 1e-7 of a weight per step; a bf16 one covers about 0.16.
    assert abs(covered - 1.0) < 1e-3, covered
    weights = teacher_weights(teacher, student)
    assert all(torch.equal(weights[n], state[n].to(torch.bfloat16)) for n in state)


def shard_like_zero3(student: PeftModel) -> None:
    """Give every adapter parameter (student's and teacher's) a ZeRO-3-like local shard: the first half of its values.

    Like DeepSpeed's (not installed here), the parameter becomes an empty placeholder and the shard is `ds_tensor`.
    """
    for name, param in student.named_parameters():
        if "lora_" in name:
            param.ds_tensor = param.data.flatten()[: param.numel() // 2].clone()
            param.data = torch.empty(0, dtype=param.dtype)


def test_lora_ema_masters_are_made_from_the_shards_seen_at_the_first_update():
    student, teacher = cast_after_construction(fill=1.0)
    shard_like_zero3(student)
    move_student(student, 1.0 + GAP)
    for _ in range(STEPS):
        teacher.update(student)

    for name, weight in teacher_weights(teacher, student).items():
        master = teacher.ema.master[name]
        assert master.dtype == torch.float32 and master.shape == weight.ds_tensor.shape, name
        assert torch.allclose(master.double(), torch.full_like(master, exact_ema(), dtype=torch.float64), atol=1e-6)
        assert torch.equal(weight.ds_tensor, master.to(torch.bfloat16)), name


def test_a_master_made_before_sharding_is_made_again_from_the_shard():
    student, teacher = cast_after_construction(fill=1.0)
    teacher.update(student)  # masters of the whole tensors
    shard_like_zero3(student)
    move_student(student, 1.0 + GAP)
    teacher.update(student)
    for name, weight in teacher_weights(teacher, student).items():
        assert teacher.ema.master[name].shape == weight.ds_tensor.shape, name


def test_lora_ema_restored_after_a_bfloat16_cast_keeps_the_saved_float32_masters(tmp_path):
    """On resume the teacher is loaded after `accelerator.prepare` cast it: the masters take the saved values."""
    sides = [cast_after_construction(fill=1.0) for _ in range(2)]
    (student, teacher), (fresh, restored) = sides
    move_student(student, 1.0 + GAP)
    for _ in range(3):
        teacher.update(student)
    save_teacher(teacher, str(tmp_path), "lora_ema")
    load_teacher(restored, str(tmp_path), "lora_ema")
    saved, loaded = teacher.state_tensors(), restored.state_tensors()
    assert all(loaded[n].dtype == torch.float32 and torch.equal(loaded[n], saved[n]) for n in saved)
    # Both continue identically: the master, not the rounded weight, carries the state.
    move_student(fresh, 1.0 + GAP)
    for side_student, side_teacher in sides:
        side_teacher.update(side_student)
    saved, loaded = teacher.state_tensors(), restored.state_tensors()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
