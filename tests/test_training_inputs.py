"""Training-time inputs are checked with errors that name what is at fault; bad steps change nothing (issue #9)."""

import logging
import math

import pytest
import torch
from tiny import ParityReward, grpo_args, make_dataset, make_model, make_tokenizer

from sdpo_rl import SDPOConfig, SDPOTrainer


def build(tmp_path, reward=None, dataset=None, tokenizer=None, trainer_class=SDPOTrainer, **args):
    tokenizer = tokenizer or make_tokenizer()
    return trainer_class(
        model=make_model(tokenizer),
        args=grpo_args(tmp_path, **args),
        sdpo_config=SDPOConfig(teacher_update_rate=0.5),
        processing_class=tokenizer,
        reward_funcs=[reward or ParityReward()],
        train_dataset=dataset if dataset is not None else make_dataset(),
    )


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def test_none_and_nan_rewards_are_failures_and_the_loss_stays_finite(tmp_path):
    def partial_judge(completion_ids, **kwargs):
        """Scores only every third completion; NaN or None for the others."""
        return [
            (1.0 if ids and ids[0] % 2 == 0 else 0.0) if i % 3 == 0 else (None if i % 2 else math.nan)
            for i, ids in enumerate(completion_ids)
        ]

    trainer = build(tmp_path, reward=partial_judge)
    trainer.train()
    assert all(math.isfinite(loss) for loss in logged(trainer, "loss"))
    assert all(fraction <= 1 / 3 + 1e-6 for fraction in logged(trainer, "self_distillation/success_sample_fraction"))


@pytest.mark.parametrize(
    "bad_feedback, message",
    [(lambda n: ["x"] * (n + 1), "has 5 entries but 4 completions"), (lambda n: [3] * n, r"\[0\] is int")],
)
def test_bad_last_feedback_names_the_reward_function(tmp_path, bad_feedback, message):
    class Judge:
        __name__ = "my_judge"

        def __call__(self, completions, **kwargs):
            self.last_feedback = bad_feedback(len(completions))
            return [0.0] * len(completions)

    trainer = build(tmp_path, reward=Judge())
    with pytest.raises((ValueError, TypeError), match=rf"'my_judge'.*{message}"):
        trainer.train()


def test_prompt_not_ending_with_a_user_turn_names_the_column_and_row(tmp_path):
    dataset = make_dataset().map(
        lambda row, index: {"prompt": row["prompt"] + [{"role": "assistant", "content": "Sure."}] * (index == 2)},
        with_indices=True,
    )
    trainer = build(tmp_path, dataset=dataset, per_device_train_batch_size=8, num_generations=2, shuffle_dataset=False)
    with pytest.raises(ValueError, match=r"column 'prompt'.*row 4 of this batch.*role 'assistant'"):
        trainer.train()


def test_conversational_prompts_without_a_chat_template_fail_at_construction(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        build(tmp_path, tokenizer=tokenizer)


class NaNOnFirstStep(SDPOTrainer):
    """Makes the first optimizer step's loss NaN."""

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss * math.nan if self.state.global_step == 0 else loss


def test_nonfinite_step_changes_neither_student_nor_teacher_and_is_reported(tmp_path, caplog):
    trainer = build(tmp_path, trainer_class=NaNOnFirstStep, max_steps=1)
    student = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    teacher = {name: p.detach().clone() for name, p in trainer.teacher.model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="sdpo_rl.trainer"):
        trainer.train()
    assert all(torch.equal(p, student[name]) for name, p in trainer.model.named_parameters())
    assert all(torch.equal(p, teacher[name]) for name, p in trainer.teacher.model.named_parameters())
    assert logged(trainer, "self_distillation/nonfinite_step") == [1.0]
    assert "step 1 has a non-finite gradient norm" in caplog.text


def test_a_finite_step_after_a_nonfinite_one_trains_again(tmp_path):
    trainer = build(tmp_path, trainer_class=NaNOnFirstStep, max_steps=2)
    student = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert logged(trainer, "self_distillation/nonfinite_step") == [1.0, 0.0]
    assert any(not torch.equal(p, student[name]) for name, p in trainer.model.named_parameters())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_vllm_importance_sampling_ratio_weights_the_distillation_loss(tmp_path):
    """TRL's vLLM correction (per sequence [B, 1] or per token [B, T]) multiplies the per-token SDPO loss."""
    trainer = build(tmp_path)
    dataset = make_dataset()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([dataset[i // 4] for i in range(8)])
    assert batch["self_distillation_mask"].sum() > 0
    trainer.model.eval()  # the per-batch normaliser: nothing depends on the training loop's accumulation state

    def loss_with(ratio):
        inputs = batch if ratio is None else {**batch, "importance_sampling_ratio": ratio}
        return trainer._compute_loss(trainer.model, inputs).detach()

    base = loss_with(None)
    assert base > 0
    torch.testing.assert_close(loss_with(torch.full((8, 1), 2.0)), 2 * base)
    torch.testing.assert_close(loss_with(torch.full(batch["completion_mask"].shape, 0.5)), 0.5 * base)
    assert loss_with(torch.zeros(8, 1)) == 0


@pytest.mark.parametrize("shared_prompts", [False, True])
def test_tool_outputs_are_attended_to_but_not_distilled(tmp_path, monkeypatch, shared_prompts):
    """With tools, TRL's `tool_mask` marks tool-output tokens: both forwards attend to them, the loss skips them. With
    prompts shared the student and the teacher each run their distinct prompts, then the completions less their last
    token (which predicts nothing) with the mask less its last column."""
    from trl import GRPOTrainer

    trl_batch = GRPOTrainer._generate_and_score_completions

    def with_tool_output(self, inputs):
        batch = trl_batch(self, inputs)
        tool_mask = torch.ones_like(batch["completion_mask"])
        tool_mask[:, 1:3] = 0  # tokens 1-2 of every completion came from a tool
        return {**batch, "tool_mask": tool_mask}

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", with_tool_output)
    trainer = build(tmp_path, per_device_train_batch_size=8, gradient_checkpointing=False)
    monkeypatch.setattr(trainer, "_shares_prompts", lambda model, training_forward=True: shared_prompts)
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([make_dataset()[i // 4] for i in range(8)])
    distilled = batch["self_distillation_mask"].unsqueeze(1)
    assert distilled.sum() > 0
    assert batch["num_self_distillation_items"] == (batch["completion_mask"] * batch["tool_mask"] * distilled).sum()

    attention = []
    for model in (trainer.model, trainer.teacher.model):
        model.register_forward_pre_hook(
            lambda module, args, kwargs: attention.append(kwargs["attention_mask"]), with_kwargs=True
        )
    trainer._compute_loss(trainer.model, batch)
    rows = distilled.squeeze(1).nonzero().squeeze(1)
    width = batch["completion_mask"].size(1)
    if shared_prompts:  # student, then teacher: the prompts, then the completions (mask less its last column)
        student_prompts, student_completions, teacher_prompts, teacher_completions = attention
        assert student_prompts.size(1) == batch["prompt_mask"].size(1)
        assert teacher_prompts.size(0) < len(rows)  # rows with equal teacher prompts ran theirs once
        for completions in (student_completions, teacher_completions):
            assert completions.size(0) == len(rows)
            torch.testing.assert_close(completions[:, -(width - 1) :], batch["completion_mask"][rows, :-1])
    else:
        assert len(attention) == 2  # student and teacher
        for mask in attention:
            torch.testing.assert_close(mask[:, -width:], batch["completion_mask"][rows])


class VLLMStandIn(SDPOTrainer):
    """Takes GRPOTrainer's vLLM path with fixed completions and made-up sampler log-probabilities.

    The first token of each completion is given log-probability -100 (its ratio π_old/π_vLLM is far above 3), the
    others -5 (a ratio below 1 for a model near uniform over 300 tokens).
    """

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        completion_ids = [self._tokenizer.encode(f"Paris {i}") for i in range(len(prompt_ids))]
        return completion_ids, [[-100.0] + [-5.0] * (len(ids) - 1) for ids in completion_ids]


def vllm_batch(tmp_path, **args):
    trainer = build(tmp_path, trainer_class=VLLMStandIn, **args)
    trainer.use_vllm = True  # no vLLM here: generation is replaced, TRL's correction code runs as under vLLM
    dataset = make_dataset()
    return trainer._generate_and_score_completions([dataset[i // 4] for i in range(8)])


def test_the_documented_vllm_settings_truncate_each_token_ratio_at_two_as_the_reference(tmp_path):
    """docs/distributed.md's settings give verl's token-level truncated ratio; TRL's default masks whole sequences."""
    batch = vllm_batch(tmp_path, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0)
    ratio, mask = batch["importance_sampling_ratio"], batch["completion_mask"].bool()
    expected = torch.exp(batch["old_per_token_logps"] - batch["sampling_per_token_logps"]).clamp(max=2.0)
    assert ratio.shape == mask.shape
    torch.testing.assert_close(ratio[mask], expected[mask])
    assert torch.all(ratio[:, 0] == 2.0)
    assert torch.all((ratio[:, 1:][mask[:, 1:]] > 0) & (ratio[:, 1:][mask[:, 1:]] < 1))

    default = vllm_batch(tmp_path)["importance_sampling_ratio"]
    assert default.shape == (8, 1) and torch.all(default == 0)


@pytest.mark.parametrize("column", ["feedback", "privileged_context"])
def test_dataset_feedback_column_or_privileged_context_reaches_the_teacher(tmp_path, column):
    """A `feedback` column, or TRL's name for it, `privileged_context`, is the teacher's feedback (docs/rewards.md);
    the student's prompts never hold it."""
    dataset = make_dataset().map(lambda row: {column: f"Hint: it is not {row['answer']}ville."})

    def never_right(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = build(tmp_path, reward=never_right, dataset=dataset, max_steps=1)
    trainer.train()
    prompts = [p for p in trainer._logs["extra"]["teacher_prompt"] if p]
    assert prompts and all("feedback from your unsuccessful earlier attempt" in p for p in prompts)
    assert any("Hint: it is not Parisville." in p for p in prompts)
    assert trainer._logs["prompt"] and not any("Hint" in str(p) for p in trainer._logs["prompt"])
    assert logged(trainer, "self_distillation/success_sample_fraction") == [0.0]
    assert logged(trainer, "self_distillation/feedback_used_fraction") == [1.0]
