"""End-to-end tests of SDPOTrainer on a tiny offline Qwen2 (CPU)."""

import copy
import glob
import os
from functools import partial

import pandas as pd
import pytest
import torch
from tiny import (
    ParityReward,
    assert_close_to_scale,
    embedded_positions,
    grpo_args,
    make_dataset,
    make_model,
    make_tokenizer,
)
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

import sdpo_rl.cpu_fast_path as cpu_fast_path_module
import sdpo_rl.distillation as distillation_module
from sdpo_rl import SDPOConfig, SDPOTrainer


def build(tmp_path, sdpo_config=None, dataset=None, reward=None, model=None, tokenizer=None, eval_dataset=None, **args):
    tokenizer = tokenizer or make_tokenizer()
    model = model if model is not None else make_model(tokenizer)
    return SDPOTrainer(
        model=model,
        args=grpo_args(tmp_path, **args),
        sdpo_config=sdpo_config if sdpo_config is not None else SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[reward or ParityReward()],
        train_dataset=dataset if dataset is not None else make_dataset(),
        eval_dataset=eval_dataset,
    )


def logged(trainer, name):
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def max_change(before, model):
    return max((p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters())


def test_quick_start_trains_logs_metrics_and_well_formed_teacher_prompts(tmp_path):
    trainer = build(tmp_path, log_completions=True)
    initial = snapshot(trainer.model)
    trainer.train()

    assert max_change(initial, trainer.model) > 0
    for name in (
        "success_group_fraction",
        "success_sample_fraction",
        "feedback_available_fraction",
        "feedback_used_fraction",
        "reprompt_sample_fraction",
        "distillation_loss",
        "teacher_prompt_length_mean",
    ):
        values = logged(trainer, f"self_distillation/{name}")
        assert len(values) == 2, name
    assert all(0 < v <= 1 for v in logged(trainer, "self_distillation/reprompt_sample_fraction"))

    prompts = [p for p in trainer._logs["extra"]["teacher_prompt"] if p]
    assert prompts, "no teacher prompt was logged"
    for text in prompts:
        assert text.count("<|im_start|>user\n") == 1
        assert text.startswith("<|im_start|>system\nAnswer with just the city name.<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n")
        assert "What is the capital of" in text

    tables = sorted(glob.glob(os.path.join(tmp_path, "completions", "*.parquet")))
    assert tables
    table = pd.read_parquet(tables[-1])
    assert "teacher_prompt" in table.columns
    assert (table["teacher_prompt"] != "").any()


def test_standard_prompts_train(tmp_path):
    trainer = build(tmp_path, dataset=make_dataset(conversational=False))
    initial = snapshot(trainer.model)
    trainer.train()
    assert max_change(initial, trainer.model) > 0
    assert logged(trainer, "self_distillation/reprompt_sample_fraction")


@pytest.mark.slow
def test_accumulation_iterations_and_eval(tmp_path):
    trainer = build(
        tmp_path,
        gradient_accumulation_steps=2,
        num_iterations=2,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=4,
        num_generations_eval=2,
        eval_dataset=make_dataset(n=4),
    )
    initial = snapshot(trainer.model)
    trainer.train()
    assert max_change(initial, trainer.model) > 0
    assert logged(trainer, "eval_self_distillation/distillation_loss")
    assert all(torch.isfinite(torch.tensor(logged(trainer, "loss"))))


@pytest.mark.slow
def test_ema_teacher_moves_between_initial_and_student_frozen_does_not(tmp_path):
    ema = build(tmp_path / "ema", max_steps=3, sdpo_config=SDPOConfig(teacher_update_rate=0.5))
    initial = snapshot(ema.model)
    ema.train()
    teacher = dict(ema.teacher.model.named_parameters())
    student = dict(ema.model.named_parameters())
    assert max(float((teacher[n] - initial[n]).abs().max()) for n in initial) > 0
    assert max(float((teacher[n] - student[n]).abs().max()) for n in initial) > 0

    frozen = build(tmp_path / "frozen", max_steps=3, sdpo_config=SDPOConfig(teacher_mode="frozen"))
    initial = snapshot(frozen.model)
    frozen.train()
    teacher = dict(frozen.teacher.model.named_parameters())
    assert all(torch.equal(teacher[n], initial[n]) for n in initial)
    assert max_change(initial, frozen.model) > 0


def test_teacher_copy_does_not_run_the_student(tmp_path):
    """GRPOTrainer patches model.forward; the teacher copy must run its own weights, not the student's."""
    trainer = build(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.5)
    student = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
    teacher = trainer.teacher.completion_logits(trainer.model, ids, mask, logits_to_keep=3)
    assert not torch.allclose(student, teacher)
    assert not any(p.requires_grad for p in trainer.teacher.model.parameters())
    assert not trainer.teacher.model.training


def grads_of(trainer, batches, accumulation):
    trainer.model.zero_grad()
    trainer.current_gradient_accumulation_steps = accumulation
    trainer.args.steps_per_generation = accumulation
    for batch in batches:
        trainer._compute_loss(trainer.model, batch).backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "sdpo_config",
    [
        SDPOConfig(loss_agg_mode="token-mean"),
        SDPOConfig(loss_agg_mode="seq-mean-token-mean"),
        SDPOConfig(loss_agg_mode="seq-mean-token-sum"),
        SDPOConfig(sample_routing=True),
        SDPOConfig(grpo_weight=0.5),
    ],
    ids=["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "routing", "hybrid"],
)
def test_gradient_accumulation_equals_one_big_batch(tmp_path, sdpo_config):
    trainer = build(
        tmp_path,
        per_device_train_batch_size=8,
        max_completion_length=8,
        sdpo_config=sdpo_config,
        gradient_checkpointing=False,
    )
    trainer.model.train()
    inputs = [trainer.train_dataset[i] for i in range(2) for _ in range(4)]
    batch = trainer._generate_and_score_completions(inputs)
    mask = batch["self_distillation_mask"]
    assert 0 < mask.sum() < len(mask), "the test needs a batch with and without teacher signal"

    whole = grads_of(trainer, [batch], accumulation=1)
    halves = grads_of(trainer, split_tensor_dict(batch, 2), accumulation=2)
    assert whole.keys() == halves.keys() and whole
    # Two summation orders of the same float32 gradient, not bitwise: rtol 1e-4 is ~800 float32 spacings; the
    # largest difference on an AMD EPYC was 1% of this tolerance (on Intel it passes too).
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("sdpo_config", [SDPOConfig(enabled=False), SDPOConfig(grpo_weight=1.0)], ids=["off", "w1"])
def test_disabled_or_pure_grpo_weight_is_exactly_grpo(tmp_path, monkeypatch, sdpo_config):
    """Without a distillation term every step is TRL's own code, so the weights and losses are GRPOTrainer's to the
    bit on any CPU: neither the CPU scoring (`completion_hidden`) nor the shared prefill runs (each rounds otherwise
    than TRL's forward, differently from one CPU to another)."""

    def not_trls(*args, **kwargs):
        raise AssertionError("SDPOTrainer left TRL's code path without a distillation term")

    monkeypatch.setattr(cpu_fast_path_module, "completion_hidden", not_trls)
    monkeypatch.setattr(distillation_module, "completion_hidden", not_trls)
    monkeypatch.setattr(cpu_fast_path_module, "prompts_prefilled_once", not_trls)
    tokenizer = make_tokenizer()
    sdpo = build(tmp_path / "a", sdpo_config=sdpo_config, tokenizer=tokenizer)
    sdpo.train()
    grpo = GRPOTrainer(
        model=make_model(tokenizer),
        args=grpo_args(tmp_path / "b"),
        processing_class=tokenizer,
        reward_funcs=[ParityReward()],
        train_dataset=make_dataset(),
    )
    grpo.train()
    assert sdpo.teacher is None
    for (name, a), (_, b) in zip(sdpo.model.named_parameters(), grpo.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert logged(sdpo, "loss") == logged(grpo, "loss")
    assert not logged(sdpo, "self_distillation/distillation_loss")


class _ProjectedRows:
    """Stands in for `ChunkedLogProbFunction` in `sdpo_rl.cpu_fast_path` and counts the rows the head projects."""

    def __init__(self, kernel):
        self.kernel, self.rows = kernel, []

    def apply(self, hidden, *args):
        self.rows.append(hidden.size(0))
        return self.kernel.apply(hidden, *args)


@pytest.mark.parametrize(
    "compute_entropy, batch_size, precision",
    [
        (True, None, {}),
        (False, 3, {}),
        (True, None, dict(bf16=True)),
        (True, 3, dict(bf16=True, cast_lm_head_to_fp32=True)),
    ],
    ids=["entropy", "chunked", "bf16", "bf16-head-fp32"],
)
def test_cpu_scoring_projects_only_completion_tokens_with_trls_values(
    tmp_path, monkeypatch, compute_entropy, batch_size, precision
):
    """On a CPU, with a distillation term (routing here; without one the trainer runs TRL's code), TRL's fused head
    projects every position; ours the completion tokens only, with TRL's log-probs, entropies and gradients, in
    `batch_size` chunks as TRL's, and its precision settings. Each prompt runs once per row here, as in TRL's
    forward; sharing it across its group is the next test's."""
    trainer = build(
        tmp_path,
        sdpo_config=SDPOConfig(sample_routing=True),
        max_completion_length=8,
        gradient_checkpointing=False,
        **precision,
    )
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    batch["completion_mask"][0, -3:] = batch["completion_mask"][5, -6:] = 0  # as if they had ended early
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    weights = torch.randn(2, *batch["completion_ids"].shape)

    def scored(method):
        logps, entropies, _ = method(trainer.model, ids, mask, length, batch_size, compute_entropy)
        trainer.model.zero_grad()
        ((logps * weights[0]).sum() + (0 if entropies is None else (entropies * weights[1]).sum())).backward()
        return logps, entropies, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(trainer, "_shares_prompts", lambda model, training_forward=True: False)
    projected = _ProjectedRows(cpu_fast_path_module.ChunkedLogProbFunction)
    monkeypatch.setattr(cpu_fast_path_module, "ChunkedLogProbFunction", projected)
    ours = scored(trainer._get_per_token_logps_and_entropies)
    trls = scored(partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer))
    assert sum(projected.rows) == batch["completion_mask"].sum() and len(projected.rows) == (3 if batch_size else 1)
    torch.testing.assert_close(ours[0], trls[0])
    assert (ours[1] is None) == (trls[1] is None) == (not compute_entropy)
    if compute_entropy:
        torch.testing.assert_close(ours[1], trls[1])
    assert ours[2].keys() == trls[2].keys() and ours[2]
    # The backbone's gradients sum the head's differently blocked products: float32 rounding, ~80 spacings allowed;
    # the largest difference on an AMD EPYC was 7% of this tolerance (the log-probs and entropies matched exactly).
    for name in ours[2]:
        torch.testing.assert_close(ours[2][name], trls[2][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_cpu_scoring_runs_each_groups_prompt_once(tmp_path, gradient_checkpointing):
    """Without gradient checkpointing (which turns the key/value cache off) the 4 rows of a group share one forward of
    their prompt, with TRL's log-probs and gradients up to rounding (`assert_close_to_scale`)."""
    trainer = build(
        tmp_path,
        sdpo_config=SDPOConfig(sample_routing=True),
        max_completion_length=8,
        gradient_checkpointing=gradient_checkpointing,
    )
    if gradient_checkpointing:  # as `train()` does
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    length = batch["completion_ids"].size(1)
    weights = torch.randn(batch["completion_ids"].shape)

    def scored(method):
        with embedded_positions(trainer.model) as embedded:
            logps = method(trainer.model, ids, mask, length)[0]
        trainer.model.zero_grad()
        (logps * weights).sum().backward()
        return logps, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, sum(embedded)

    ours = scored(trainer._get_per_token_logps_and_entropies)
    trls = scored(partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer))
    assert trainer._shares_prompts(trainer.model) is not gradient_checkpointing
    prompt_length = batch["prompt_ids"].size(1)
    shared_positions = 2 * prompt_length + 8 * (length - 1)
    assert trls[2] == 8 * (prompt_length + length)
    assert ours[2] == (trls[2] if gradient_checkpointing else shared_positions)
    torch.testing.assert_close(ours[0], trls[0])
    for name, gradient in trls[1].items():
        assert_close_to_scale(ours[1][name], gradient)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_generation_prefills_each_groups_prompt_once(tmp_path, monkeypatch, gradient_checkpointing):
    """TRL samples the same completions with the 4 rows of a group prefilling their prompt once, under gradient
    checkpointing too (TRL turns it off while generating, then back on); the model's own `generate` is back after."""
    trainer = build(
        tmp_path, sdpo_config=SDPOConfig(sample_routing=True), gradient_checkpointing=gradient_checkpointing
    )
    if gradient_checkpointing:  # as `train()` does
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    prompts = [trainer.train_dataset[i]["prompt"] for i in range(2) for _ in range(4)]
    prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)

    def sampled(shared):
        monkeypatch.setattr(trainer, "_shares_prompts", lambda model, training_forward=True: shared)
        torch.manual_seed(0)
        with embedded_positions(trainer.model) as embedded:
            completion_ids, _ = trainer._generate_single_turn(prompt_ids, images, multimodal_fields, 4)
        return completion_ids, sum(embedded)

    (full, full_positions), (shared, shared_positions) = sampled(False), sampled(True)
    assert shared == full
    prompt_length = max(len(ids) for ids in prompt_ids)  # left-padded to the longest
    assert shared_positions == full_positions - 8 * prompt_length + 2 * (prompt_length - 1) + 8
    assert "generate" not in vars(trainer.model)
    checkpointing = [getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()]
    assert any(checkpointing) is gradient_checkpointing


def test_scoring_goes_to_trl_for_a_head_that_is_not_plain_linear(tmp_path, monkeypatch):
    trainer = build(tmp_path, sdpo_config=SDPOConfig(sample_routing=True))
    calls = []
    monkeypatch.setattr(cpu_fast_path_module, "linear_head", lambda model: None)
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", lambda *args, **kwargs: calls.append(1))
    ids = torch.ones(2, 5, dtype=torch.long)
    trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 2)
    assert calls == [1]


def test_callers_objects_are_not_mutated(tmp_path):
    tokenizer = make_tokenizer()
    args = grpo_args(tmp_path)
    config = SDPOConfig()
    args_before, config_before = copy.deepcopy(args.to_dict()), copy.deepcopy(config)
    sides = (tokenizer.padding_side, tokenizer.truncation_side)
    trainer = SDPOTrainer(
        model=make_model(tokenizer),
        args=args,
        sdpo_config=config,
        processing_class=tokenizer,
        reward_funcs=[ParityReward()],
        train_dataset=make_dataset(),
    )
    trainer.train()
    assert args.to_dict() == args_before
    assert config == config_before
    assert (tokenizer.padding_side, tokenizer.truncation_side) == sides


def test_beta_is_rejected_while_sdpo_is_on(tmp_path):
    with pytest.raises(ValueError, match=r"GRPOConfig.beta=0.1"):
        build(tmp_path, beta=0.1)


def test_sdpo_config_type_is_checked(tmp_path):
    with pytest.raises(TypeError, match="SDPOConfig"):
        build(tmp_path, sdpo_config={"alpha": 0.5})


def test_async_scored_rewards_keep_feedback_on_their_completions(tmp_path):
    import asyncio

    from sdpo_rl import Scored

    async def first_token_judge(completions, completion_ids, **kwargs):
        await asyncio.sleep(0)
        return [
            Scored(1.0) if ids and ids[0] % 2 == 0 else Scored(0.0, f"Attempt <<{completion[0]['content']}>> failed.")
            for completion, ids in zip(completions, completion_ids, strict=True)
        ]

    trainer = build(tmp_path, reward=first_token_judge, max_steps=1, log_completions=True)
    trainer.train()
    logs = trainer._logs
    rows = list(zip(logs["completion"], logs["extra"]["teacher_prompt"], strict=True))
    with_feedback = [(c, p) for c, p in rows if "feedback from your unsuccessful" in p]
    assert with_feedback
    for completion, prompt in with_feedback:
        assert f"Attempt <<{completion[0]['content']}>> failed." in prompt


def test_no_teacher_signal_gives_zero_loss_and_no_update(tmp_path):
    def never_right(completions, **kwargs):
        return [0.0] * len(completions)

    trainer = build(tmp_path, reward=never_right, max_steps=1)
    initial = snapshot(trainer.model)
    trainer.train()
    assert logged(trainer, "self_distillation/reprompt_sample_fraction") == [0.0]
    assert logged(trainer, "loss") == [0.0]
    assert max_change(initial, trainer.model) == 0.0


def test_model_given_as_a_path(tmp_path):
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(tmp_path / "model")
    trainer = build(tmp_path / "out", model=str(tmp_path / "model"), tokenizer=tokenizer, max_steps=1)
    trainer.train()
    assert logged(trainer, "self_distillation/distillation_loss")


@pytest.mark.slow
def test_collapse_warning_is_logged_once(tmp_path, caplog):
    class FadingReward:
        """Successes in the first five steps only: reward and demonstrations then fall together."""

        __name__ = "fading_reward"

        def __init__(self):
            self.calls = 0

        def __call__(self, completions, **kwargs):
            self.calls += 1
            return [1.0 if self.calls <= 5 and i % 2 == 0 else 0.0 for i in range(len(completions))]

    trainer = build(tmp_path, reward=FadingReward(), max_steps=11, dataset=make_dataset(n=64))
    with caplog.at_level("WARNING", logger="sdpo_rl.trainer"):
        trainer.train()
    warnings = [r for r in caplog.records if "SDPO may be collapsing" in r.getMessage()]
    assert len(warnings) == 1
    assert "reward fell" in warnings[0].getMessage() and "grpo_weight=0.8" in warnings[0].getMessage()


def test_teacher_runs_only_on_completions_with_a_teacher_signal(tmp_path):
    trainer = build(tmp_path, per_device_train_batch_size=8, gradient_checkpointing=False)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    with_signal = int(batch["self_distillation_mask"].sum())
    assert 0 < with_signal < 8, "the test needs a batch with and without teacher signal"
    teacher_batch_sizes = []
    trainer.teacher.model.register_forward_pre_hook(
        lambda module, args, kwargs: teacher_batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    trainer.current_gradient_accumulation_steps = 1

    trainer._compute_loss(trainer.model, batch)
    *prompt_pass, completion_pass = teacher_batch_sizes  # on a CPU the teacher's distinct prompts run first, once
    assert completion_pass == with_signal and len(prompt_pass) <= 1 and all(n < with_signal for n in prompt_pass)

    teacher_batch_sizes.clear()
    no_signal = {**batch, "self_distillation_mask": torch.zeros_like(batch["self_distillation_mask"])}
    loss = trainer._compute_loss(trainer.model, no_signal)
    assert teacher_batch_sizes == [] and loss.item() == 0.0


def test_feedback_available_fraction_is_zero_when_the_teacher_reads_no_feedback(tmp_path):
    reads = build(tmp_path / "reads", max_steps=1)
    ignores = build(tmp_path / "ignores", sdpo_config=SDPOConfig(include_environment_feedback=False), max_steps=1)
    for trainer in (reads, ignores):
        trainer.train()
    assert logged(reads, "self_distillation/feedback_available_fraction")[0] > 0  # ParityReward explains failures
    assert logged(ignores, "self_distillation/feedback_available_fraction") == [0.0]
