"""The stabilised variants: sample routing, teacher-entropy and pass-rate weights, hindsight contrast, one forward."""

import math
from functools import partial

import pytest
import torch
from tiny import ParityReward, assert_close_to_scale, grpo_args, make_dataset, make_model, make_tokenizer
from trl import GRPOTrainer

import sdpo_rl.hybrid as hybrid_module
import sdpo_rl.teacher_batch as teacher_batch_module
from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.forward import HeadInputs
from sdpo_rl.loss.chunked import PolicyGradient
from sdpo_rl.reprompt import select_teacher_signals
from sdpo_rl.stabilisers import (
    group_pass_rates,
    head_entropy,
    normalise_to_mean_one,
    pass_rate_weights,
    routed_to_distillation,
)

# ---- pure pieces ------------------------------------------------------------------------------------------------


def routes(rewards, feedback, num_generations=4):
    completions = [f"completion {i}" for i in range(len(rewards))]
    settings = SDPOConfig(success_reward_threshold=1.0).signal_settings()
    signals = select_teacher_signals(completions, rewards, feedback, num_generations, settings)
    return routed_to_distillation(rewards, [s.has_signal for s in signals], 1.0)


def test_routing_on_hand_made_groups():
    no_feedback = [""] * 4
    assert routes([1.0] * 4, no_feedback) == [False] * 4  # all correct: GRPO only (a peer's copy is not distilled)
    assert routes([0.0] * 4, no_feedback) == [False] * 4  # all failed, nothing to say: GRPO (zero advantage)
    assert routes([0.0] * 4, ["too long"] * 4) == [True] * 4  # all failed with feedback: distilled from feedback
    # A lone success gets GRPO; the failures with its demonstration are distilled; NaN is a failure.
    assert routes([0.0, 1.0, math.nan, 0.0], no_feedback) == [True, False, True, True]
    # Feedback on one failure only: that row is distilled, the silent failures are not.
    assert routes([0.0, 0.0, 0.0, 0.0], ["", "wrong", "", ""]) == [False, True, False, False]


def test_pass_rate_weights_have_mean_one_over_distilled_rows():
    rewards = [1.0, 0.0, 0.0, 0.0] + [1.0, 1.0, 0.0, 0.0] + [1.0] * 4
    assert group_pass_rates(rewards, 4, 1.0) == [0.25] * 4 + [0.5] * 4 + [1.0] * 4
    distilled = [False, True, True, True, False, False, True, True] + [False] * 4
    weights = pass_rate_weights(rewards, distilled, 4, 1.0)
    assert sum(w for w, d in zip(weights, distilled, strict=True) if d) == pytest.approx(sum(distilled))
    assert all(w == 0.0 for w, d in zip(weights, distilled, strict=True) if not d)
    # sqrt(p(1 - p)): 0.433 at p = 1/4, 0.5 at p = 1/2, in that ratio.
    assert weights[1] / weights[6] == pytest.approx(math.sqrt(0.25 * 0.75) / 0.5)


def test_equal_pass_rates_give_unit_weights_and_all_failed_groups_none():
    rewards = [1.0, 0.0, 0.0, 0.0] * 2
    distilled = [False, True, True, True] * 2
    assert pass_rate_weights(rewards, distilled, 4, 1.0) == pytest.approx([0.0, 1.0, 1.0, 1.0] * 2)
    assert pass_rate_weights([0.0] * 4, [True] * 4, 4, 1.0) == [0.0] * 4


def test_entropy_weights_normalise_to_mean_one_and_equal_entropies_give_ones():
    values = torch.tensor([[0.5, 2.0, 9.0], [1.5, 4.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    weights = normalise_to_mean_one(values, mask, (values * mask).sum(), mask.sum())
    assert weights[mask > 0].mean() == pytest.approx(1.0)
    assert (weights[mask == 0] == 0).all()
    flat = torch.full_like(values, 0.3)
    assert torch.equal(normalise_to_mean_one(flat, mask, (flat * mask).sum(), mask.sum()), mask)


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_head_entropy_matches_the_softmax_entropy_of_the_summed_logits(softcap):
    """Of ``sum_i c_i cap(h_i @ W_i.T) / temperature``; a cap of 1.5 saturates these logits."""
    torch.manual_seed(0)
    hidden = (torch.randn(5, 3), torch.randn(5, 2))
    weight = (torch.randn(7, 3), torch.randn(7, 2))
    cap = (lambda z: z) if softcap is None else (lambda z: softcap * torch.tanh(z / softcap))
    logits = (0.3 * cap(hidden[0] @ weight[0].T) - 2.0 * cap(hidden[1] @ weight[1].T)) / 0.7
    expected = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    entropy = head_entropy(HeadInputs(hidden, weight, (0.3, -2.0)), 0.7, chunk_size=2, softcap=softcap)
    torch.testing.assert_close(entropy, expected)


# ---- in the trainer ---------------------------------------------------------------------------------------------


def build(tmp_path, sdpo_config, **args):
    tokenizer = make_tokenizer()
    settings = dict(per_device_train_batch_size=8, max_completion_length=6, gradient_checkpointing=False)
    settings.update(args)
    return SDPOTrainer(
        model=make_model(tokenizer),
        args=grpo_args(tmp_path, **settings),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[ParityReward()],
        train_dataset=make_dataset(),
    )


def batch_of(trainer):
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which these tests do not run
    torch.manual_seed(0)
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])


def grads(trainer, loss):
    trainer.model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_routing_distills_only_failures_with_a_signal_and_logs_the_fractions(tmp_path):
    trainer = build(tmp_path, SDPOConfig(sample_routing=True))
    batch = batch_of(trainer)
    rewards = [1.0 if row[0] % 2 == 0 else 0.0 for row in batch["completion_ids"].tolist()]
    routed = batch["self_distillation_mask"].tolist()
    assert all(not (r == 1.0 and z) for r, z in zip(rewards, routed, strict=True))  # no success is distilled
    # Both routed losses share one denominator: every valid token of the generation batch.
    assert batch["num_self_distillation_items"] == batch["completion_mask"].sum()
    metrics = trainer._metrics["train"]
    assert metrics["self_distillation/routed_sdpo_fraction"][-1] == pytest.approx(sum(routed) / len(routed))
    assert metrics["self_distillation/routed_grpo_fraction"][-1] == pytest.approx(1 - sum(routed) / len(routed))


def test_routing_loss_is_grpo_on_the_other_rows_plus_distillation_on_the_routed_ones(tmp_path):
    trainer = build(tmp_path, SDPOConfig(sample_routing=True))
    trainer.model.train()
    batch = batch_of(trainer)
    assert 0 < batch["self_distillation_mask"].sum() < 8
    routed = batch["self_distillation_mask"].unsqueeze(1)
    grpo_only = GRPOTrainer._compute_loss(trainer, trainer.model, {**batch, "tool_mask": 1 - routed})
    expected = grpo_only + trainer._self_distillation_loss(trainer.model, batch).loss
    torch.testing.assert_close(trainer._compute_loss(trainer.model, batch), expected)


def test_routed_eval_loss_has_the_denominator_of_training(tmp_path):
    """With routing, evaluation divides the distillation sum by the token count that training and TRL's GRPO loss
    share (every valid token of the batch), not by the distilled tokens alone (issue #26, item 8)."""
    trainer = build(tmp_path, SDPOConfig(sample_routing=True))
    trainer.model.train()
    batch = batch_of(trainer)
    distilled = batch["self_distillation_mask"].unsqueeze(1) * batch["completion_mask"]
    assert 0 < distilled.sum() < batch["num_self_distillation_items"]
    training = trainer._self_distillation_loss(trainer.model, batch).loss
    trainer.model.eval()  # the tiny model has no dropout: the same forward in both modes
    evaluation = trainer._self_distillation_loss(trainer.model, batch).loss
    assert training > 0
    torch.testing.assert_close(evaluation, training, rtol=1e-6, atol=0)  # the loss is small: no absolute slack


@pytest.mark.parametrize(
    "sdpo_config, grpo_settings, off_policy, shared_prompts",
    [
        (SDPOConfig(grpo_weight=0.5), {}, False, False),
        (SDPOConfig(grpo_weight=0.3), dict(loss_type="grpo"), False, False),
        (SDPOConfig(sample_routing=True), {}, False, False),
        (SDPOConfig(grpo_weight=0.5), {}, True, False),
        (SDPOConfig(grpo_weight=0.5), dict(top_entropy_quantile=0.5), False, False),
        (SDPOConfig(grpo_weight=0.5), {}, False, True),
    ],
)
def test_one_forward_gives_the_gradients_of_two_forwards(
    tmp_path, monkeypatch, sdpo_config, grpo_settings, off_policy, shared_prompts
):
    """The hybrid's one pass (one student forward, one head projection per token) against TRL's loss and the
    distillation loss computed apart. On policy without an entropy mask, TRL's gradient is known in advance and the pass
    runs once; otherwise the distilled tokens' chunks run again in backward. With `shared_prompts` the forward runs
    each group's prompt once, then the completions: two backbone calls, gradients equal to their scale
    (`assert_close_to_scale`)."""
    trainer = build(tmp_path, sdpo_config, **grpo_settings)
    monkeypatch.setattr(trainer, "_shares_prompts", lambda model, training_forward=True: shared_prompts)
    trainer.model.train()
    batch = batch_of(trainer)
    if off_policy:  # old log-probs 0.1 below the current ones: ratios of e^0.1, some clipped
        with torch.no_grad():
            current, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                trainer,
                trainer.model,
                torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
                batch["completion_ids"].size(1),
            )
        batch["old_per_token_logps"] = current - 0.1
    policies = []
    monkeypatch.setattr(
        hybrid_module, "PolicyGradient", lambda *args: policies.append(PolicyGradient(*args)) or policies[-1]
    )
    calls = []
    handle = trainer.model.model.register_forward_hook(lambda *args: calls.append(1))
    one_forward = grads(trainer, trainer._compute_loss(trainer.model, batch))
    handle.remove()
    assert len(calls) == (2 if shared_prompts else 1)  # the backbone ran once for both terms
    recomputed = off_policy or "top_entropy_quantile" in grpo_settings
    assert policies and all(policy.recomputed == recomputed for policy in policies)

    grpo_inputs = batch
    if sdpo_config.sample_routing:
        grpo_inputs = {**batch, "tool_mask": 1 - batch["self_distillation_mask"].unsqueeze(1)}
    weight = 1.0 if sdpo_config.sample_routing else sdpo_config.grpo_weight
    trls_scoring = partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer)  # every position, TRL's forward
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", trls_scoring)
    grpo_loss = GRPOTrainer._compute_loss(trainer, trainer.model, grpo_inputs)
    distillation_loss = trainer._self_distillation_loss(trainer.model, batch).loss
    two_forwards = grads(trainer, weight * grpo_loss + (1.0 - weight if weight < 1 else 1.0) * distillation_loss)
    assert one_forward.keys() == two_forwards.keys() and one_forward
    for name, gradient in two_forwards.items():
        if shared_prompts:
            assert_close_to_scale(one_forward[name], gradient)
        else:
            torch.testing.assert_close(one_forward[name], gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "sapo", "cispo", "vespo"])
@pytest.mark.parametrize("training", [True, False])
def test_the_expected_grpo_gradient_is_trls_on_policy(tmp_path, loss_type, training):
    settings = dict(loss_type=loss_type, gradient_accumulation_steps=2, steps_per_generation=2)
    trainer = build(tmp_path, SDPOConfig(grpo_weight=0.5), **settings)
    batch = batch_of(trainer)
    assert batch.get("old_per_token_logps") is None  # on policy: TRL's ratio is 1
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train(training)
    logps = torch.randn(batch["completion_ids"].shape).requires_grad_()
    with trainer.scored_completions(logps, torch.zeros_like(logps)):
        loss = GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    actual = torch.autograd.grad(loss, logps)[0]
    assert actual.abs().max() > 0
    torch.testing.assert_close(trainer._expected_grpo_logp_gradient(batch), actual)


def test_scored_completions_are_handed_over_only_inside_their_block(tmp_path):
    """The one-pass hybrid's hand-off to TRL's scoring holds inside `scored_completions` only, even when the block
    fails: after it, scoring runs a forward again."""
    trainer = build(tmp_path, SDPOConfig(grpo_weight=0.5))
    ids = torch.ones(2, 5, dtype=torch.long)
    logps, entropies = torch.randn(2, 2), torch.randn(2, 2)
    with pytest.raises(RuntimeError, match="inside"), trainer.scored_completions(logps, entropies):
        handed = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 2)
        assert handed[0] is logps and handed[1] is entropies
        raise RuntimeError("inside")
    scored, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 2)
    assert scored is not logps and scored.shape == (2, 2) and (scored < 0).all()


@pytest.mark.parametrize(
    "sdpo_config", [SDPOConfig(teacher_entropy_weighting=1.0), SDPOConfig(pass_rate_weighting=True)]
)
def test_weights_have_mean_one_over_the_distilled_tokens(tmp_path, sdpo_config):
    trainer = build(tmp_path, sdpo_config)
    batch = batch_of(trainer)
    distilled = batch["self_distillation_mask"].unsqueeze(1) * batch["completion_mask"]
    weight = batch["self_distillation_weight"]
    if sdpo_config.teacher_entropy_weighting is not None or weight.sum() > 0:
        assert weight[distilled > 0].mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (weight[distilled == 0] == 0).all()


def test_equal_teacher_entropies_leave_the_loss_unchanged(tmp_path, monkeypatch):
    plain = build(tmp_path / "plain", SDPOConfig())
    weighted = build(tmp_path / "weighted", SDPOConfig(teacher_entropy_weighting=1.0))
    monkeypatch.setattr(
        SDPOTrainer, "_teacher_entropy", lambda self, batch: torch.full(batch["completion_ids"].shape, 2.0)
    )
    batches = [batch_of(trainer) for trainer in (plain, weighted)]
    for trainer in (plain, weighted):
        trainer.model.eval()
    losses = [t._compute_loss(t.model, b) for t, b in zip((plain, weighted), batches, strict=True)]
    assert losses[0] > 0
    torch.testing.assert_close(losses[1], losses[0])


def test_entropy_weights_favour_confident_teacher_tokens(tmp_path):
    trainer = build(tmp_path, SDPOConfig(teacher_entropy_weighting=1.0))
    batch = batch_of(trainer)
    distilled = (batch["self_distillation_mask"].unsqueeze(1) * batch["completion_mask"]) > 0
    entropy = trainer._teacher_entropy(batch)[distilled]
    weight = batch["self_distillation_weight"][distilled]
    order = entropy.argsort()
    assert (weight[order].diff() <= 1e-6).all()  # higher teacher entropy, lower weight
    torch.testing.assert_close(weight / weight[0], torch.exp(-(entropy - entropy[0])))


def test_hindsight_contrast_is_zero_when_the_hindsight_has_no_effect(tmp_path, monkeypatch):
    trainer = build(tmp_path, SDPOConfig(hindsight_contrast=1.0))
    trainer.model.eval()
    batch = batch_of(trainer)
    assert batch["self_distillation_mask"].sum() > 0
    with_hindsight = trainer._compute_loss(trainer.model, batch).item()

    # The frame keeps the hindsight.
    monkeypatch.setattr(teacher_batch_module, "without_hindsight", lambda signal: signal)
    same = batch_of(trainer)
    assert torch.equal(same["frame_prompt_ids"], same["teacher_prompt_ids"])
    without_effect = trainer._compute_loss(trainer.model, same).item()
    # The tiny random model reads its context weakly: the contrast is small but far above float32 noise.
    assert with_hindsight > 1e-7
    assert abs(without_effect) < 1e-8


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(entropy_coef=0.01), "GRPOConfig.entropy_coef=0.01"),
        (dict(top_entropy_quantile=0.5), "GRPOConfig.top_entropy_quantile=0.5"),
        (dict(use_adaptive_entropy=True), "GRPOConfig.use_adaptive_entropy=True"),
    ],
)
def test_pure_sdpo_refuses_grpo_loss_settings_it_would_ignore(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        build(tmp_path, SDPOConfig(), **args)
    build(tmp_path, SDPOConfig(grpo_weight=0.5), **args)  # the hybrid keeps TRL's loss, which applies them


def test_routing_needs_a_token_normalised_grpo_loss(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='grpo'.*'dapo'"):
        build(tmp_path, SDPOConfig(sample_routing=True), loss_type="grpo")


def test_image_datasets_are_refused_at_construction(tmp_path):
    tokenizer = make_tokenizer()
    dataset = make_dataset().map(lambda row: {"image": None})
    with pytest.raises(ValueError, match=r"train_dataset has an image column \(image\)"):
        SDPOTrainer(
            model=make_model(tokenizer),
            args=grpo_args(tmp_path),
            processing_class=tokenizer,
            reward_funcs=[ParityReward()],
            train_dataset=dataset,
        )


def test_moe_balancing_loss_is_refused_in_pure_sdpo(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, moe=True)

    def trainer(sdpo_config, **args):
        return SDPOTrainer(
            model=model,
            args=grpo_args(tmp_path, **args),
            sdpo_config=sdpo_config,
            processing_class=tokenizer,
            reward_funcs=[ParityReward()],
            train_dataset=make_dataset(),
        )

    with pytest.raises(ValueError, match=r"Mixture-of-Experts.*router_aux_loss_coef=0.01"):
        trainer(SDPOConfig())
    trainer(SDPOConfig(), router_aux_loss_coef=0.0)


@pytest.mark.parametrize("reward", [1.0, 0.0], ids=["every-completion-succeeds", "every-completion-fails-silently"])
def test_a_batch_with_nothing_to_distill_trains(tmp_path, reward):
    tokenizer = make_tokenizer()
    trainer = SDPOTrainer(
        model=make_model(tokenizer),
        args=grpo_args(tmp_path, max_steps=1, gradient_checkpointing=False),
        sdpo_config=SDPOConfig(sample_routing=True, teacher_entropy_weighting=1.0, pass_rate_weighting=True),
        processing_class=tokenizer,
        reward_funcs=[lambda completions, **kwargs: [reward] * len(completions)],
        train_dataset=make_dataset(),
    )
    trainer.train()
    routed = [e["self_distillation/routed_sdpo_fraction"] for e in trainer.state.log_history if "loss" in e]
    assert routed == [0.0]
