"""The teacher is restored on resume whatever restores the student: DeepSpeed never calls `_load_from_checkpoint`."""

import torch
from safetensors.torch import load_file
from test_teacher import build, lora_model
from tiny import make_tokenizer
from transformers import Trainer, TrainerCallback

import sdpo_rl.trainer as trainer_module
from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.teacher.checkpoint import load_teacher


class TeacherAtTrainBegin(TrainerCallback):
    """Keeps a copy of the teacher's state when training begins, after every restore."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.state = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {name: t.detach().clone() for name, t in self.teacher.state_tensors().items()}


def test_teacher_is_restored_when_the_student_is_loaded_without_load_from_checkpoint(tmp_path, monkeypatch):
    tokenizer = make_tokenizer()
    config = SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.3)
    first = build(
        tmp_path,
        config,
        model=lora_model(tokenizer),
        tokenizer=tokenizer,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    first.train()
    saved = load_file(tmp_path / "checkpoint-2" / "teacher" / "teacher.safetensors")

    # Under DeepSpeed, Trainer restores the student with `deepspeed_load_checkpoint`, after `accelerator.prepare`,
    # and never reaches SDPOTrainer._load_from_checkpoint: Trainer's own loader, which knows nothing of the teacher,
    # stands for it here.
    monkeypatch.setattr(SDPOTrainer, "_load_from_checkpoint", Trainer._load_from_checkpoint, raising=False)
    loads = []

    def counted_load_teacher(*args):
        loads.append(args)
        load_teacher(*args)

    monkeypatch.setattr(trainer_module, "load_teacher", counted_load_teacher)
    resumed = build(tmp_path, config, model=lora_model(tokenizer), tokenizer=tokenizer, max_steps=3)
    begin = TeacherAtTrainBegin(resumed.teacher)
    resumed.add_callback(begin)
    initial = {name: t.detach().clone() for name, t in resumed.teacher.state_tensors().items()}
    resumed.train(resume_from_checkpoint=True)  # the last checkpoint in output_dir, as Trainer resolves it

    assert len(loads) == 1
    assert begin.state.keys() == saved.keys()
    assert all(torch.equal(begin.state[name], saved[name]) for name in saved)
    assert any(not torch.equal(saved[name], initial[name]) for name in saved), "the saved teacher must have moved"
