"""Teacher modes, the hybrid loss and checkpoints that keep the teacher (CPU, tiny models)."""

import os
from contextlib import ExitStack

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import (
    COMPLETION,
    GROUP_OF_ROW,
    PROMPT,
    ParityReward,
    embedded_positions,
    grouped_batch,
    grpo_args,
    make_dataset,
    make_model,
    make_tokenizer,
)
from transformers import TrainerCallback
from trl import GRPOTrainer

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.forward import completion_logits
from sdpo_rl.teacher import TEACHER_ADAPTER_NAME, build_teacher

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def lora_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return get_peft_model(make_model(tokenizer, seed=seed), LoraConfig(**LORA))


def build(tmp_path, sdpo_config, model=None, tokenizer=None, reward=None, **args):
    tokenizer = tokenizer or make_tokenizer()
    return SDPOTrainer(
        model=model if model is not None else make_model(tokenizer),
        args=grpo_args(tmp_path, **args),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[reward or ParityReward()],
        train_dataset=make_dataset(),
    )


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


@pytest.mark.parametrize("mode", ["ema", "frozen", "trust_region"])
def test_full_model_modes_train(tmp_path, mode):
    trainer = build(tmp_path, SDPOConfig(teacher_mode=mode))
    before = trainable(trainer.model)
    trainer.train()
    after = trainable(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert len(logged(trainer, "self_distillation/distillation_loss")) == 2


@pytest.mark.parametrize("mode", ["lora_ema", "frozen", "trust_region"])
def test_peft_modes_train_without_copying_the_model(tmp_path, mode, tokenizer):
    trainer = build(tmp_path, SDPOConfig(teacher_mode=mode), model=lora_model(tokenizer), tokenizer=tokenizer)
    before = trainable(trainer.model)
    trainer.train()
    after = trainable(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert not hasattr(trainer.teacher, "model") or not isinstance(trainer.teacher.model, torch.nn.Module)


@pytest.mark.parametrize(
    "mode, peft", [("ema", False), ("frozen", False), ("trust_region", False), ("lora_ema", True), ("frozen", True)]
)
def test_each_teacher_runs_equal_prompts_once_with_the_full_forwards_values(mode, peft, tokenizer):
    student = lora_model(tokenizer) if peft else make_model(tokenizer)
    teacher = build_teacher(SDPOConfig(teacher_mode=mode), student)
    ids, mask = grouped_batch(len(tokenizer))
    models = [student] + [m.model for m in (teacher, getattr(teacher, "reference", None)) if hasattr(m, "model")]

    def head_inputs(share_prompts):
        with ExitStack() as stack:
            counts = [stack.enter_context(embedded_positions(model)) for model in models]
            inputs = teacher.completion_head_inputs(student, ids, mask, COMPLETION, share_prompts=share_prompts)
        return inputs, sum(map(sum, counts))

    (full, full_positions), (shared, shared_positions) = head_inputs(False), head_inputs(True)
    assert all(a is b for a, b in zip(shared.weight, full.weight, strict=True))
    for shared_hidden, full_hidden in zip(shared.hidden, full.hidden, strict=True):  # float32 rounding: test_forward
        torch.testing.assert_close(shared_hidden, full_hidden, rtol=1e-5, atol=1e-6)
    forwards, rows = len(full.hidden), len(GROUP_OF_ROW)
    assert full_positions == forwards * rows * (PROMPT + COMPLETION)
    assert shared_positions == forwards * (3 * PROMPT + rows * (COMPLETION - 1))


def test_ema_on_a_peft_model_points_to_lora_ema(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="lora_ema"):
        build(tmp_path, SDPOConfig(teacher_mode="ema"), model=lora_model(tokenizer), tokenizer=tokenizer)


def test_lora_ema_on_a_full_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="needs a PEFT LoRA model"):
        build(tmp_path, SDPOConfig(teacher_mode="lora_ema"))


def test_lora_ema_teacher_moves_toward_the_student_at_the_rate_and_gets_no_gradient(tmp_path, tokenizer):
    rate = 0.25
    trainer = build(
        tmp_path,
        SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=rate),
        model=lora_model(tokenizer),
        tokenizer=tokenizer,
        max_steps=1,
    )
    teacher_tensors = trainer.teacher.state_tensors()
    student = dict(trainer.model.named_parameters())
    for name, tensor in teacher_tensors.items():
        assert torch.equal(tensor, student[name]), "the teacher adapter starts as a copy of the student's"
        assert not tensor.requires_grad
    teacher_before = {n: t.detach().clone() for n, t in teacher_tensors.items()}

    trainer.train()

    moved = 0
    for name, tensor in trainer.teacher.state_tensors().items():
        assert tensor.grad is None and not tensor.requires_grad
        expected = (1 - rate) * teacher_before[name] + rate * student[name].detach()
        # The EMA accumulates in its own order (a float32 master, `lerp_`): float32 rounding of these ~1e-2 weights.
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
        moved += not torch.equal(tensor, teacher_before[name])
    assert moved > 0
    assert all(p.requires_grad for n, p in student.items() if ".default." in n), "student adapter stays trainable"


def test_lora_ema_teacher_logits_come_from_the_teacher_adapter(tmp_path, tokenizer):
    trainer = build(tmp_path, SDPOConfig(teacher_mode="lora_ema"), model=lora_model(tokenizer), tokenizer=tokenizer)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B.default" in name:
                param.add_(0.5)  # the student moves, the teacher adapter (B = 0) does not
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    teacher = trainer.teacher.completion_logits(trainer.model, ids, mask, 3)
    with torch.no_grad(), trainer.model.disable_adapter():
        base = completion_logits(trainer.model, ids, mask, 3)
        assert trainer.model.active_adapter == "default"
    student = completion_logits(trainer.model, ids, mask, 3)
    torch.testing.assert_close(teacher, base)
    assert not torch.allclose(teacher, student)


def test_trust_region_logits_equal_the_formula(tmp_path):
    rate = 0.3
    trainer = build(tmp_path, SDPOConfig(teacher_mode="trust_region", teacher_update_rate=rate))
    reference = make_model(make_tokenizer())  # the same initial weights (same seed)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.mul_(1.1)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        z_ref = completion_logits(reference, ids, mask, 3)
        z_theta = completion_logits(trainer.model, ids, mask, 3)
    teacher = trainer.teacher.completion_logits(trainer.model, ids, mask, 3)
    # The teacher mixes the two forwards itself (another path than this sum): float32 rounding of logits of scale ~1.
    torch.testing.assert_close(teacher, (1 - rate) * z_ref + rate * z_theta, rtol=1e-5, atol=1e-6)


def one_batch_losses(tmp_path, sdpo_config, **args):
    """The loss of one fixed batch under `sdpo_config`, plus the batch and trainer for comparisons."""
    trainer = build(tmp_path, sdpo_config, gradient_checkpointing=False, **args)
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(4)])
    trainer.current_gradient_accumulation_steps = 1
    return trainer, batch, trainer._compute_loss(trainer.model, batch)


def test_grpo_weight_zero_is_pure_sdpo_and_in_between_blends(tmp_path):
    sdpo, batch, sdpo_loss = one_batch_losses(tmp_path / "a", SDPOConfig())
    sdpo.sdpo_config.grpo_weight = 0.25  # same trainer and batch, so only the blend changes
    blended = sdpo._compute_loss(sdpo.model, batch)
    grpo_loss = GRPOTrainer._compute_loss(sdpo, sdpo.model, batch)
    torch.testing.assert_close(blended, 0.25 * grpo_loss + 0.75 * sdpo_loss)
    assert sdpo_loss.item() != 0.0


def test_hybrid_logs_both_components(tmp_path):
    trainer = build(tmp_path, SDPOConfig(grpo_weight=0.5), beta=0.0)
    trainer.train()
    assert len(logged(trainer, "self_distillation/grpo_loss")) == 2
    assert len(logged(trainer, "self_distillation/distillation_loss")) == 2


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def final_weights(trainer):
    student = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    teacher = {n: t.detach().clone() for n, t in trainer.teacher.state_tensors().items()}
    return student, teacher


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ema", "lora_ema"])
def test_resume_is_bit_identical(tmp_path, mode, tokenizer):

    def run(output_dir, stop_at, resume=None):
        model = lora_model(tokenizer) if mode == "lora_ema" else make_model(tokenizer)
        trainer = build(
            output_dir,
            SDPOConfig(teacher_mode=mode, teacher_update_rate=0.3),
            model=model,
            tokenizer=tokenizer,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
        )
        trainer.add_callback(StopAt(stop_at))  # an interruption that leaves the 4-step schedule unchanged
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight", 4)
    expected_student, expected_teacher = final_weights(straight)

    run(tmp_path / "interrupted", 2)
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert (checkpoint / "teacher" / "teacher.safetensors").exists()
    resumed = run(tmp_path / "interrupted", 4, resume=str(checkpoint))
    student, teacher = final_weights(resumed)

    assert teacher.keys() == expected_teacher.keys()
    for name in expected_student:
        assert torch.equal(student[name], expected_student[name]), name
    for name in expected_teacher:
        assert torch.equal(teacher[name], expected_teacher[name]), name
    initial = final_weights(
        build(
            tmp_path / "fresh",
            SDPOConfig(teacher_mode=mode),
            model=(lora_model(tokenizer) if mode == "lora_ema" else make_model(tokenizer)),
            tokenizer=tokenizer,
        )
    )[1]
    assert any(not torch.equal(teacher[n], initial[n]) for n in teacher), "the teacher must have moved"


def test_resume_needs_the_teacher_folder(tmp_path):
    trainer = build(tmp_path, SDPOConfig(), max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-1"
    for name in os.listdir(checkpoint / "teacher"):
        os.remove(checkpoint / "teacher" / name)
    os.rmdir(checkpoint / "teacher")
    again = build(tmp_path, SDPOConfig(), max_steps=2, save_strategy="no")
    with pytest.raises(FileNotFoundError, match="teacher/"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_resume_with_another_teacher_mode_is_refused(tmp_path):
    trainer = build(tmp_path, SDPOConfig(teacher_mode="ema"), max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    again = build(tmp_path, SDPOConfig(teacher_mode="frozen"), max_steps=2, save_strategy="no")
    with pytest.raises(ValueError, match="teacher_mode='ema'"):
        again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_save_model_writes_the_student_adapter_only(tmp_path, tokenizer):
    trainer = build(
        tmp_path, SDPOConfig(teacher_mode="lora_ema"), model=lora_model(tokenizer), tokenizer=tokenizer, max_steps=1
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / TEACHER_ADAPTER_NAME).exists()
    assert TEACHER_ADAPTER_NAME in trainer.model.peft_config, "saving must not remove the teacher adapter"
    reloaded = PeftModel.from_pretrained(make_model(tokenizer), str(tmp_path / "final"))
    assert list(reloaded.peft_config) == ["default"]
    student = dict(trainer.model.named_parameters())
    for name, param in reloaded.named_parameters():
        if ".default." in name:
            torch.testing.assert_close(param, student[name])
