"""Tests for sdpo_rl.loss: the reference's golden vectors plus invariants of the divergence, IS and aggregation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdpo_rl.loss import (
    LossSettings,
    aggregate,
    importance_weight,
    per_token_divergence,
    sampled_token_logps,
    self_distillation_loss,
)

GOLDEN_DIR = Path(__file__).parent / "data" / "golden" / "sdpo_loss"
GOLDEN_CASES = json.loads((GOLDEN_DIR / "manifest.json").read_text())["cases"]

DEFAULTS = dict(
    alpha=0.5,
    distillation_topk=None,
    distillation_add_tail=True,
    full_logit_distillation=True,
    is_clip=None,
    loss_agg_mode="token-mean",
)
DEFAULT_SETTINGS = LossSettings(**DEFAULTS)


def make_batch(batch=3, steps=5, vocab=11, seed=0, scale=2.0):
    """Random student/teacher logits [B, T, V], sampled ids [B, T] and a right-padded completion mask [B, T]."""
    gen = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, steps, vocab, generator=gen)
    teacher = scale * torch.randn(batch, steps, vocab, generator=gen)
    ids = torch.randint(vocab, (batch, steps), generator=gen)
    lengths = torch.tensor([steps, steps - 2, 1][:batch])
    mask = (torch.arange(steps) < lengths[:, None]).long()
    return student, teacher, ids, mask


def loss_of(student, teacher, ids, mask, sd_mask=None, old=None, per_token_weight=None, **overrides):
    settings = LossSettings(**{**DEFAULTS, **overrides})
    return self_distillation_loss(
        student, teacher, ids, mask, sd_mask, old, settings=settings, per_token_weight=per_token_weight
    )


def loss_and_grad(student, *args, **kwargs):
    student = student.detach().clone().requires_grad_(True)
    loss = loss_of(student, *args, **kwargs)
    loss.backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
def test_matches_reference_golden(case):
    data = load_file(GOLDEN_DIR / case["file"])
    student = data["student_logits"].requires_grad_(True)
    loss = self_distillation_loss(
        student,
        data["teacher_logits"],
        data["completion_ids"],
        data["completion_mask"],
        data["self_distillation_mask"],
        data["old_per_token_logps"],
        settings=LossSettings(**{name: case[name] for name in DEFAULTS}),
    )
    loss.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    expected = case["expected_loss"]
    assert expected == pytest.approx(data["expected_loss"].item(), rel=1e-12)
    if expected == 0.0:
        assert abs(loss.item()) <= 1e-7
    else:
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(student.grad.double(), data["expected_grad_student_logits"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("alpha", "direction"), [(0.0, "forward"), (1.0, "reverse")])
def test_kl_endpoints_match_torch_kl_div(alpha, direction):
    student, teacher, ids, _ = make_batch()
    mask = torch.ones_like(ids)
    s, q = student.log_softmax(-1), teacher.log_softmax(-1)
    # F.kl_div(input, target, log_target=True) is KL(target || input).
    forward = F.kl_div(s, q, reduction="none", log_target=True).sum(-1).mean()
    reverse = F.kl_div(q, s, reduction="none", log_target=True).sum(-1).mean()
    assert abs(forward.item() - reverse.item()) > 0.05  # so that the two directions cannot be confused
    expected = forward if direction == "forward" else reverse
    loss = loss_of(student, teacher, ids, mask, alpha=alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_jsd_is_symmetric_and_bounded_by_log2():
    student, teacher, ids, mask = make_batch(seed=1)
    forward = loss_of(student, teacher, ids, mask, alpha=0.5)
    swapped = loss_of(teacher, student, ids, mask, alpha=0.5)
    assert forward.item() > 0.05
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-5)

    # Near-disjoint peaks push the JSD towards its supremum log 2 without exceeding it.
    vocab = 11
    peaked_student = 60.0 * F.one_hot(torch.arange(vocab).repeat(2, 1), vocab).float()
    peaked_teacher = peaked_student.roll(1, dims=-1)
    per_token = per_token_divergence(
        peaked_student,
        peaked_teacher,
        torch.zeros(2, vocab, dtype=torch.long),
        settings=LossSettings(**{**DEFAULTS, "alpha": 0.5, "distillation_topk": None}),
    )
    assert per_token.shape == (2, vocab)
    assert (per_token <= math.log(2) + 1e-6).all()
    assert (per_token >= math.log(2) - 1e-4).all()
    random_tokens = per_token_divergence(student, teacher, ids, settings=DEFAULT_SETTINGS)
    assert (random_tokens <= math.log(2) + 1e-6).all() and (random_tokens > 0).all()


@pytest.mark.parametrize("alpha", [0.25, 0.8])
def test_generalised_jsd_matches_probability_space_formula(alpha):
    student, teacher, ids, _ = make_batch(seed=12)
    p, r = student.double().softmax(-1), teacher.double().softmax(-1)
    m = (1 - alpha) * p + alpha * r
    expected = ((1 - alpha) * (p * (p / m).log()).sum(-1) + alpha * (r * (r / m).log()).sum(-1)).mean()
    loss = loss_of(student, teacher, ids, torch.ones_like(ids), alpha=alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_topk_of_whole_vocab_equals_full_vocab(add_tail, alpha):
    student, teacher, ids, mask = make_batch(seed=2)
    vocab = student.shape[-1]
    full_loss, full_grad = loss_and_grad(student, teacher, ids, mask, alpha=alpha, distillation_topk=None)
    assert full_loss.item() > 0.05
    for k in (vocab, vocab + 7):  # K beyond V is clamped to V
        loss, grad = loss_and_grad(
            student, teacher, ids, mask, alpha=alpha, distillation_topk=k, distillation_add_tail=add_tail
        )
        assert loss.item() == pytest.approx(full_loss.item(), rel=1e-5)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)


def test_topk_changes_the_loss():
    student, teacher, ids, mask = make_batch(seed=2)
    full = loss_of(student, teacher, ids, mask, distillation_topk=None)
    with_tail = loss_of(student, teacher, ids, mask, distillation_topk=3, distillation_add_tail=True)
    renorm = loss_of(student, teacher, ids, mask, distillation_topk=3, distillation_add_tail=False)
    assert abs(full.item() - with_tail.item()) > 1e-3
    assert abs(full.item() - renorm.item()) > 1e-3
    assert abs(with_tail.item() - renorm.item()) > 1e-3


def test_tail_bucket_by_hand_with_mass_floored_at_1e_minus_7():
    # Student: all mass on tokens 0 and 1, so its tail (~1e-13) is floored at 1e-7; teacher: uniform over 6 tokens.
    student = torch.tensor([[[0.0, 0.0, -30.0, -30.0, -30.0, -30.0]]], requires_grad=True)
    teacher = torch.zeros(1, 1, 6)
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    loss = loss_of(student, teacher, ids, mask, alpha=0.0, distillation_topk=2, distillation_add_tail=True)
    # Forward KL(q || s) over the buckets {0, 1, tail}: q = (1/6, 1/6, 4/6), s = (1/2, 1/2, 1e-7).
    expected = 2 * (1 / 6) * math.log((1 / 6) / 0.5) + (4 / 6) * math.log((4 / 6) / -math.expm1(-1e-7))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("full_logit_distillation", [True, False])
def test_all_masked_gives_exact_zero_without_nan(loss_agg_mode, full_logit_distillation):
    student, teacher, ids, mask = make_batch(seed=3)
    student[0, 0, 0], student[1, 2, 3], teacher[2, 1, 4] = float("inf"), float("nan"), float("-inf")
    old = torch.full(ids.shape, float("nan"))
    student = student.requires_grad_(True)
    loss = loss_of(
        student,
        teacher,
        ids,
        mask,
        torch.zeros(3),
        old,
        alpha=1.0,
        distillation_topk=4,
        full_logit_distillation=full_logit_distillation,
        is_clip=2.0,
        loss_agg_mode=loss_agg_mode,
        per_token_weight=torch.full(ids.shape, float("nan")),
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("full_logit_distillation", [True, False])
def test_non_finite_padding_does_not_leak(full_logit_distillation):
    student, teacher, ids, mask = make_batch(seed=4)
    kwargs = dict(alpha=1.0, distillation_topk=5, full_logit_distillation=full_logit_distillation, is_clip=2.0)
    old = sampled_token_logps(student, ids) - 0.3
    clean_loss, clean_grad = loss_and_grad(student, teacher, ids, mask, None, old, **kwargs)
    padding = mask == 0
    assert padding.any()
    dirty_student, dirty_teacher = student.clone(), teacher.clone()
    dirty_student[padding] = float("inf")
    dirty_teacher[padding] = float("nan")
    dirty_ids = ids.masked_fill(padding, -100)
    dirty_old = old.masked_fill(padding, float("nan"))
    dirty_weight = torch.ones_like(old).masked_fill(padding, float("inf"))
    loss, grad = loss_and_grad(
        dirty_student, dirty_teacher, dirty_ids, mask, None, dirty_old, per_token_weight=dirty_weight, **kwargs
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(clean_loss.item(), rel=1e-6)
    torch.testing.assert_close(grad, clean_grad, atol=1e-7, rtol=0)
    assert torch.equal(grad[padding], torch.zeros_like(grad[padding]))


@pytest.mark.parametrize(
    "settings",
    [dict(alpha=0.5, distillation_topk=4), dict(alpha=1.0, full_logit_distillation=False)],
    ids=["jsd_topk", "sampled_token"],
)
def test_on_policy_old_logps_equal_no_old_logps(settings):
    student, teacher, ids, mask = make_batch(seed=5)
    old = sampled_token_logps(student, ids)
    on_policy_loss, on_policy_grad = loss_and_grad(student, teacher, ids, mask, None, old, is_clip=2.0, **settings)
    no_is_loss, no_is_grad = loss_and_grad(student, teacher, ids, mask, None, None, is_clip=2.0, **settings)
    assert on_policy_loss.item() == pytest.approx(no_is_loss.item(), rel=1e-6)
    torch.testing.assert_close(on_policy_grad, no_is_grad, atol=1e-7, rtol=0)


@pytest.mark.parametrize(("log_ratio", "expected_ratio"), [(5.0, 2.0), (math.log(1.5), 1.5), (-math.log(4.0), 0.25)])
def test_importance_ratio_scales_and_is_clipped(log_ratio, expected_ratio):
    student, teacher, ids, mask = make_batch(seed=6)
    old = sampled_token_logps(student, ids) - log_ratio
    base_loss, base_grad = loss_and_grad(student, teacher, ids, mask, distillation_topk=4)
    loss, grad = loss_and_grad(student, teacher, ids, mask, None, old, distillation_topk=4, is_clip=2.0)
    assert base_loss.item() > 0.05
    assert loss.item() == pytest.approx(expected_ratio * base_loss.item(), rel=1e-5)
    # The ratio is a constant for backward.
    torch.testing.assert_close(grad, expected_ratio * base_grad, atol=1e-6, rtol=1e-5)
    no_clip = loss_of(student, teacher, ids, mask, None, old, distillation_topk=4, is_clip=None)
    assert no_clip.item() == pytest.approx(base_loss.item(), rel=1e-6)


def test_importance_weight_is_detached_clamped_and_capped():
    student_logps = torch.tensor([[-1.0, -2.0, -3.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -1.0, -2.5, -100.0]])
    weight = importance_weight(student_logps, old, is_clip=2.0)
    assert not weight.requires_grad
    torch.testing.assert_close(weight, torch.tensor([[1.0, math.exp(-1.0), math.exp(-0.5), 2.0]]))
    # The log-ratio is clamped to [-20, 20] before exp, so a huge cap still yields exp(20), not inf.
    assert importance_weight(student_logps, old, is_clip=1e30)[0, 3].item() == pytest.approx(math.exp(20.0), rel=1e-6)


def test_per_token_weight_multiplies():
    student, teacher, ids, mask = make_batch(seed=7)
    base = loss_of(student, teacher, ids, mask)
    assert loss_of(student, teacher, ids, mask, per_token_weight=torch.full(ids.shape, 3.0)).item() == pytest.approx(
        3.0 * base.item(), rel=1e-5
    )
    weight = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    per_token = per_token_divergence(student, teacher, ids, settings=DEFAULT_SETTINGS)
    expected = (per_token * weight * mask).sum() / mask.sum()
    assert loss_of(student, teacher, ids, mask, per_token_weight=weight).item() == pytest.approx(expected.item(), 1e-5)


def test_teacher_gets_no_gradient():
    student, teacher, ids, mask = make_batch(seed=8)
    student, teacher = student.requires_grad_(True), teacher.requires_grad_(True)
    old = sampled_token_logps(student, ids).detach() - 0.2
    loss_of(student, teacher, ids, mask, None, old, distillation_topk=4, is_clip=2.0).backward()
    assert teacher.grad is None
    assert student.grad.abs().max().item() > 1e-4
    per_token = per_token_divergence(student, teacher, ids, settings=DEFAULT_SETTINGS)
    per_token.sum().backward()
    assert teacher.grad is None


@pytest.mark.parametrize(
    "settings",
    [
        dict(alpha=0.0),
        dict(alpha=0.5, distillation_topk=4, distillation_add_tail=True),
        dict(alpha=0.3, distillation_topk=4, distillation_add_tail=False),
        dict(alpha=1.0),
        dict(alpha=1.0, full_logit_distillation=False),
    ],
)
def test_divergence_is_zero_when_teacher_equals_student(settings):
    student, _, ids, mask = make_batch(seed=9)
    loss, grad = loss_and_grad(student, student.clone(), ids, mask, **settings)
    assert abs(loss.item()) <= 1e-6
    assert grad.abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("loss_agg_mode", "expected"),
    [
        ("token-mean", (1 + 2 + 4 + 5 + 6) / 5),
        ("seq-mean-token-mean", ((1 + 2) / 2 + (4 + 5 + 6) / 3) / 2),
        ("seq-mean-token-sum", ((1 + 2) + (4 + 5 + 6)) / 2),
    ],
)
def test_aggregate_by_hand(loss_agg_mode, expected):
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    assert aggregate(per_token, mask, loss_agg_mode).item() == pytest.approx(expected, rel=1e-6)
    assert aggregate(per_token, torch.zeros_like(mask), loss_agg_mode).item() == 0.0


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_aggregates_the_masked_per_token_divergence(loss_agg_mode):
    student, teacher, ids, mask = make_batch(seed=10)
    sd_mask = torch.tensor([1.0, 0.0, 1.0])
    per_token = per_token_divergence(student, teacher, ids, settings=DEFAULT_SETTINGS)
    rows = [0, 2]
    sums = [(per_token[i] * mask[i]).sum().item() for i in rows]
    counts = [mask[i].sum().item() for i in rows]
    expected = {
        "token-mean": sum(sums) / sum(counts),
        "seq-mean-token-mean": sum(s / c for s, c in zip(sums, counts, strict=True)) / 2,
        "seq-mean-token-sum": sum(sums) / 2,
    }[loss_agg_mode]
    loss = loss_of(student, teacher, ids, mask, sd_mask, loss_agg_mode=loss_agg_mode)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (dict(loss_agg_mode="seq-sum"), ["loss_agg_mode", "seq-sum", "token-mean"]),
        (dict(alpha=1.5), ["alpha", "1.5", "[0, 1]"]),
        (dict(alpha=-0.1), ["alpha", "-0.1"]),
        (dict(alpha=0.5, full_logit_distillation=False), ["alpha", "0.5", "full_logit_distillation"]),
        (dict(distillation_topk=0), ["distillation_topk", "0", ">= 1"]),
        (dict(is_clip=0.0), ["is_clip", "0.0", "> 0"]),
        (dict(is_clip=-2.0), ["is_clip", "-2.0"]),
        (dict(distillation_topk=True), ["distillation_topk", "True", ">= 1"]),
        (dict(distillation_add_tail=1), ["distillation_add_tail", "1", "True or False"]),
    ],
)
def test_bad_settings_raise(overrides, needles):
    student, teacher, ids, mask = make_batch()
    with pytest.raises(ValueError) as info:
        loss_of(student, teacher, ids, mask, **overrides)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize(
    "bad",
    ["teacher_logits", "completion_ids", "completion_mask", "self_distillation_mask", "old", "per_token_weight"],
)
def test_shape_mismatch_names_both_shapes(bad):
    student, teacher, ids, mask = make_batch()
    args = dict(teacher=teacher, ids=ids, mask=mask, sd_mask=torch.ones(3), old=torch.zeros(3, 5))
    weight = torch.ones(3, 5)
    wrong = {
        "teacher_logits": ("teacher", torch.zeros(3, 5, 12)),
        "completion_ids": ("ids", ids[:, :4]),
        "completion_mask": ("mask", mask[:2]),
        "self_distillation_mask": ("sd_mask", torch.ones(2)),
        "old": ("old", torch.zeros(3, 6)),
        "per_token_weight": ("weight", torch.ones(5, 3)),
    }
    key, value = wrong[bad]
    if key == "weight":
        weight = value
    else:
        args[key] = value
    name = "old_per_token_logps" if bad == "old" else bad
    with pytest.raises(ValueError, match=name) as info:
        loss_of(student, per_token_weight=weight, is_clip=2.0, **args)
    assert str(tuple(value.shape)) in str(info.value)
    assert "(3, 5" in str(info.value)


def test_bf16_inputs_give_float32_result():
    student, teacher, ids, mask = make_batch(seed=11)
    student_bf16 = student.bfloat16().requires_grad_(True)
    old = sampled_token_logps(student, ids) - 0.1
    settings = dict(distillation_topk=4, is_clip=2.0)
    loss = loss_of(student_bf16, teacher.bfloat16(), ids, mask.bool(), None, old.bfloat16(), **settings)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and loss.item() > 0.05
    assert student_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(student_bf16.grad.float()).all()
    upcast = loss_of(
        student_bf16.detach().float(), teacher.bfloat16().float(), ids, mask, None, old.bfloat16(), **settings
    )
    assert loss.item() == pytest.approx(upcast.item(), rel=1e-6)
