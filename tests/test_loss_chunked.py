"""The chunked loss from hidden states (`self_distillation_loss_from_hidden`) equals the loss from logits."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo_rl import SDPOConfig, SDPOTrainer, cpu_fast_path, distillation, hybrid
from sdpo_rl.loss import LOSS_AGG_MODES, LossSettings, sampled_token_logps, self_distillation_loss, token_entropy
from sdpo_rl.loss import chunked as loss_chunked
from sdpo_rl.loss.chunked import (
    CHUNK_BYTES,
    PolicyGradient,
    default_chunk_size,
    self_distillation_loss_from_hidden,
)

GOLDEN_DIR = Path(__file__).parent / "data" / "golden" / "sdpo_loss"
GOLDEN_CASES = json.loads((GOLDEN_DIR / "manifest.json").read_text())["cases"]
# The device `reference` and `chunked` compute on (benchmarks/gpu_check.sh sets cuda); results come back to the CPU.
DEVICE = torch.device(os.environ.get("SDPO_TEST_DEVICE", "cpu"))
CHUNK_SIZES = (1, 4, 5, 64)  # 4 and 5 divide neither T = 7 nor the number of distilled tokens
SETTINGS = {
    "jsd_full_vocab": dict(alpha=0.5, distillation_topk=None, distillation_add_tail=True, full_logit_distillation=True),
    "jsd_top5_tail": dict(alpha=0.5, distillation_topk=5, distillation_add_tail=True, full_logit_distillation=True),
    "reverse_top3_renorm": dict(
        alpha=1.0, distillation_topk=3, distillation_add_tail=False, full_logit_distillation=True
    ),
    "forward_kl": dict(alpha=0.0, distillation_topk=None, distillation_add_tail=True, full_logit_distillation=True),
    "sampled_token": dict(alpha=1.0, distillation_topk=None, distillation_add_tail=True, full_logit_distillation=False),
}


def golden_options(case):
    return {"settings": LossSettings(**{field.name: case[field.name] for field in dataclasses.fields(LossSettings)})}


def settings(name, is_clip=None, loss_agg_mode="token-mean"):
    """The `SETTINGS[name]` divergence with the given IS clip and aggregation."""
    return LossSettings(**SETTINGS[name], is_clip=is_clip, loss_agg_mode=loss_agg_mode)


def leaf(tensor):
    return tensor.detach().to(DEVICE).clone().requires_grad_(True)


def on_device(values):
    """The tensors among ``values`` (a tuple or a dict's values) moved to DEVICE."""
    move = lambda value: value.to(DEVICE) if isinstance(value, torch.Tensor) else value  # noqa: E731
    return {k: move(v) for k, v in values.items()} if isinstance(values, dict) else tuple(map(move, values))


def on_cpu(*tensors):
    return tuple(tensor.cpu() for tensor in tensors)


def reference(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *args, temperature=1.0, logit_scale=1.0, **options
):
    """The loss from materialised logits, and its gradients w.r.t. the student's hidden states and head weight."""
    hidden, weight = leaf(student_hidden), leaf(student_weight)
    teacher_hidden, teacher_weight, *args = on_device((teacher_hidden, teacher_weight, *args))
    student_logits = logit_scale * (hidden @ weight.T) / temperature
    teacher_logits = logit_scale * (teacher_hidden @ teacher_weight.T) / temperature
    loss = self_distillation_loss(student_logits, teacher_logits, *args, **on_device(options))
    return on_cpu(loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def chunked(student_hidden, student_weight, *args, **options):
    """The chunked loss and its gradients w.r.t. the student's hidden states and head weight."""
    hidden, weight = leaf(student_hidden), leaf(student_weight)
    loss = self_distillation_loss_from_hidden(hidden, weight, *on_device(args), **on_device(options))
    return on_cpu(loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def assert_same(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


def random_batch(batch=3, steps=7, hidden=6, vocab=11, seed=0):
    """Hidden states and heads of student and teacher, ids, a right-padded mask, old logps and per-token weights.

    In float64: the two paths round differently, and float32 rounding (up to ~1e-6 on these gradients, for either
    path against float64) would hide any real difference at the tolerance of `assert_same`. The golden tests check
    float32 against the reference's float64 values.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    lengths = torch.tensor([steps, steps - 3, 1, steps][:batch])
    return dict(
        student_hidden=randn(batch, steps, hidden),
        student_weight=randn(vocab, hidden),
        teacher_hidden=randn(batch, steps, hidden),
        teacher_weight=randn(vocab, hidden),
        completion_ids=torch.randint(vocab, (batch, steps), generator=gen),
        completion_mask=(torch.arange(steps) < lengths[:, None]).long(),
        old_per_token_logps=randn(batch, steps, scale=0.5) - 2.5,
        per_token_weight=randn(batch, steps, scale=0.1).exp(),
    )


def positional(batch, self_distillation_mask=None):
    return (
        batch["student_hidden"],
        batch["student_weight"],
        batch["teacher_hidden"],
        batch["teacher_weight"],
        batch["completion_ids"],
        batch["completion_mask"],
        self_distillation_mask,
        batch["old_per_token_logps"],
    )


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
def test_golden_cases_through_an_identity_head(case, chunk_size):
    """hidden = logits and head = identity reproduce the golden logits, so the golden loss and gradient apply."""
    data = load_file(GOLDEN_DIR / case["file"])
    vocab = data["student_logits"].shape[-1]
    identity = torch.eye(vocab)
    args = (
        data["student_logits"],
        identity,
        data["teacher_logits"],
        identity,
        data["completion_ids"],
        data["completion_mask"],
        data["self_distillation_mask"],
        data["old_per_token_logps"],
    )
    loss, grad_hidden, grad_weight = chunked(*args, chunk_size=chunk_size, **golden_options(case))

    assert loss.item() == pytest.approx(case["expected_loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad_hidden.double(), data["expected_grad_student_logits"], atol=1e-6, rtol=0)
    assert_same((loss, grad_hidden, grad_weight), reference(*args, **golden_options(case)))


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", SETTINGS)
def test_equals_the_loss_from_logits(name, loss_agg_mode, chunk_size):
    batch = random_batch()
    args = positional(batch, self_distillation_mask=torch.tensor([1.0, 0.0, 1.0]))
    options = dict(
        settings=settings(name, is_clip=2.0, loss_agg_mode=loss_agg_mode),
        per_token_weight=batch["per_token_weight"],
        temperature=0.7,
    )
    expected = reference(*args, **options)
    assert expected[0].abs() > 1e-3 and expected[2].abs().max() > 1e-3, "the case must have a loss and a gradient"
    assert_same(chunked(*args, chunk_size=chunk_size, **options), expected)


@pytest.mark.parametrize("logit_scale", [0.0625, 0.25, 3.0])  # Cohere's, Granite's 1 / 4, HyperCLOVA X-like
@pytest.mark.parametrize("name", SETTINGS)
def test_a_logit_scale_equals_the_loss_from_scaled_logits(name, logit_scale):
    """The loss and gradients of the logits ``logit_scale * hidden @ weight.T / temperature``, and the entropies."""
    batch = random_batch(seed=3)
    args = positional(batch, self_distillation_mask=torch.tensor([1.0, 0.0, 1.0]))
    options = dict(settings=settings(name, is_clip=2.0), temperature=0.7, logit_scale=logit_scale)
    expected = reference(*args, **options)
    assert expected[0].abs() > 1e-4 and expected[2].abs().max() > 1e-4, "the case must have a loss and a gradient"
    assert_same(chunked(*args, chunk_size=4, **options), expected)

    _, student_entropy, teacher_entropy = self_distillation_loss_from_hidden(*args, **options, return_entropy=True)
    active = (batch["completion_mask"] * torch.tensor([1, 0, 1])[:, None]) > 0
    for entropy, hidden, weight in [(student_entropy, *args[:2]), (teacher_entropy, *args[2:4])]:
        logits = logit_scale * (hidden @ weight.T) / 0.7
        torch.testing.assert_close(entropy[active], token_entropy(logits)[active].float())


@pytest.mark.parametrize("logit_scale", [0.0, float("nan"), "2"])
def test_a_logit_scale_that_is_not_a_finite_non_zero_number_is_refused(logit_scale):
    with pytest.raises(ValueError, match=r"logit_scale=.* must be a finite non-zero number"):
        self_distillation_loss_from_hidden(
            *positional(random_batch())[:6], settings=settings("jsd_top5_tail"), logit_scale=logit_scale
        )


def soft_capped(hidden, weight, softcap, coefficient=1.0):
    return coefficient * softcap * torch.tanh(hidden @ weight.T / softcap)


@pytest.mark.parametrize("second_loss", [False, True])
@pytest.mark.parametrize("name", SETTINGS)
def test_a_soft_cap_and_teacher_coefficients_equal_the_loss_from_capped_logits(name, second_loss):
    """Gemma 2's logits ``c tanh(z / c)``, the teacher's three capped terms with coefficients (the hindsight
    contrast's shape): the loss, the student's gradients (with a second loss on its log-probs folded into the pass or
    not) and the entropies, as from the logits. A cap of 2 saturates these logits (std ~2.4), so a missing cap, a
    cap applied after the mixture or a gradient without the cap's slope all fail."""
    batch, other, third = random_batch(seed=3), random_batch(seed=4), random_batch(seed=5)
    softcap, coefficients, temperature = 2.0, (1.0, 1.5, -1.5), 0.7
    teacher_terms = (batch["teacher_hidden"], other["teacher_hidden"], third["teacher_hidden"])
    teacher_weights = (batch["teacher_weight"], other["teacher_weight"], third["teacher_weight"])
    sd_mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    ids, mask = batch["completion_ids"], batch["completion_mask"]
    loss_settings = settings(name, is_clip=2.0)
    logp_weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    hidden, weight = leaf(batch["student_hidden"]), leaf(batch["student_weight"])
    student_logits = soft_capped(hidden, weight, softcap) / temperature
    teacher_logits = sum(
        soft_capped(h, w, softcap, c) for h, w, c in zip(teacher_terms, teacher_weights, coefficients, strict=True)
    )
    teacher_logits = teacher_logits / temperature
    loss = self_distillation_loss(
        student_logits, teacher_logits, ids, mask, sd_mask, batch["old_per_token_logps"], settings=loss_settings
    )
    distilled = (mask * sd_mask[:, None]).bool()
    logps = torch.where(distilled, sampled_token_logps(student_logits, ids), 0.0)
    total = loss + (logp_weights * logps).sum() if second_loss else loss
    expected = (loss.detach(), *torch.autograd.grad(total, (hidden, weight)))
    assert expected[0].abs() > 1e-4 and expected[2].abs().max() > 1e-4, "the case must have a loss and a gradient"

    hidden, weight = leaf(batch["student_hidden"]), leaf(batch["student_weight"])
    outputs = self_distillation_loss_from_hidden(
        hidden,
        weight,
        teacher_terms,
        teacher_weights,
        ids,
        mask,
        sd_mask,
        batch["old_per_token_logps"],
        settings=loss_settings,
        temperature=temperature,
        logit_softcap=softcap,
        teacher_coefficients=coefficients,
        chunk_size=4,
        return_entropy=True,
        policy_gradient=PolicyGradient(None) if second_loss else None,
    )
    chunked_loss, student_entropy, teacher_entropy, *chunked_logps = outputs
    total = chunked_loss + (logp_weights * chunked_logps[0]).sum() if second_loss else chunked_loss
    assert_same((chunked_loss.detach(), *torch.autograd.grad(total, (hidden, weight))), expected)
    torch.testing.assert_close(student_entropy[distilled], token_entropy(student_logits)[distilled].float())
    torch.testing.assert_close(teacher_entropy[distilled], token_entropy(teacher_logits)[distilled].float())


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (dict(logit_softcap=0.0), r"logit_softcap=0.0 must be None \(no soft-capping\) or a finite positive number"),
        (dict(logit_softcap=float("inf")), "logit_softcap=inf must be"),
        (dict(teacher_coefficients=(1.0, 2.0)), r"teacher_coefficients=\(1.0, 2.0\) must be None or 1 finite number"),
        (dict(teacher_coefficients=(float("nan"),)), "teacher_coefficients=.* must be None or 1 finite number"),
    ],
)
def test_a_soft_cap_or_teacher_coefficients_out_of_range_are_refused(option, needle):
    with pytest.raises(ValueError, match=needle):
        self_distillation_loss_from_hidden(
            *positional(random_batch())[:6], settings=settings("jsd_top5_tail"), **option
        )


@pytest.mark.parametrize("name", ["jsd_top5_tail", "reverse_top3_renorm", "sampled_token"])
def test_a_sparse_support_streams_the_teacher_in_blocks(monkeypatch, name):
    """With a top-K or sampled-token support the teacher is normalised by a pass over blocks of tokens x vocabulary
    and read at the support only; small blocks (several per row and column) change nothing."""
    monkeypatch.setattr(loss_chunked, "TEACHER_PASS_SHAPE", (2, 3))
    monkeypatch.setattr(loss_chunked, "GATHER_ROWS", 3)
    monkeypatch.setattr(loss_chunked, "ENTROPY_COLUMNS", 4)
    batch, other = random_batch(seed=13), random_batch(seed=14)
    batch["teacher_hidden"] = batch["teacher_hidden"] * 4  # spread logits: the running maximum moves between blocks
    options = dict(settings=settings(name, is_clip=2.0), temperature=0.7)
    args = positional(batch)
    assert_same(chunked(*args, chunk_size=4, **options), reference(*args, **options))

    teacher = (
        (0.7 * batch["teacher_hidden"], 0.3 * other["teacher_hidden"]),
        (batch["teacher_weight"], other["teacher_weight"]),
    )
    _, student_entropy, teacher_entropy = self_distillation_loss_from_hidden(
        batch["student_hidden"],
        batch["student_weight"],
        *teacher,
        *args[4:6],
        chunk_size=4,
        return_entropy=True,
        **options,
    )
    mixed_logits = (
        0.7 * batch["teacher_hidden"] @ batch["teacher_weight"].T
        + 0.3 * other["teacher_hidden"] @ other["teacher_weight"].T
    )
    distilled = batch["completion_mask"].bool()
    torch.testing.assert_close(teacher_entropy, torch.where(distilled, token_entropy(mixed_logits / 0.7), 0.0))
    student_logits = batch["student_hidden"] @ batch["student_weight"].T
    torch.testing.assert_close(student_entropy, torch.where(distilled, token_entropy(student_logits / 0.7), 0.0))


@pytest.mark.parametrize("normalizer", [17.0, torch.tensor(5.0)])
def test_normalizer_replaces_the_count(normalizer):
    batch = random_batch(seed=1)
    options = dict(settings=settings("jsd_top5_tail"), normalizer=normalizer)
    assert_same(chunked(*positional(batch), chunk_size=3, **options), reference(*positional(batch), **options))


def test_entropies_are_those_of_the_logits_where_distilled_and_zero_elsewhere():
    batch = random_batch(seed=2)
    sd_mask = torch.tensor([1.0, 1.0, 0.0])
    options = dict(settings=settings("jsd_top5_tail", is_clip=2.0), temperature=0.5)
    loss, student_entropy, teacher_entropy = self_distillation_loss_from_hidden(
        *positional(batch, sd_mask), chunk_size=4, return_entropy=True, **options
    )
    distilled = (batch["completion_mask"] * sd_mask[:, None]).bool()
    for entropy, hidden, weight in (
        (student_entropy, batch["student_hidden"], batch["student_weight"]),
        (teacher_entropy, batch["teacher_hidden"], batch["teacher_weight"]),
    ):
        expected = torch.where(distilled, token_entropy(hidden @ weight.T / 0.5), 0.0)
        torch.testing.assert_close(entropy, expected)
        assert entropy[distilled].min() > 0 and not entropy.requires_grad
    torch.testing.assert_close(loss, self_distillation_loss_from_hidden(*positional(batch, sd_mask), **options))


def test_teacher_as_a_sum_of_heads_is_a_mixture_of_logits():
    """The trust-region teacher's logits (1 - r) z_ref + r z_theta, given as two (hidden, weight) terms."""
    batch, other = random_batch(seed=3), random_batch(seed=4)
    rate = 0.3
    options = dict(settings=settings("jsd_top5_tail"))
    mixed_logits = torch.lerp(
        batch["teacher_hidden"] @ batch["teacher_weight"].T, other["teacher_hidden"] @ other["teacher_weight"].T, rate
    )
    loss = self_distillation_loss_from_hidden(
        batch["student_hidden"],
        batch["student_weight"],
        ((1 - rate) * batch["teacher_hidden"], rate * other["teacher_hidden"]),
        (batch["teacher_weight"], other["teacher_weight"]),
        batch["completion_ids"],
        batch["completion_mask"],
        chunk_size=4,
        **options,
    )
    student_logits = batch["student_hidden"] @ batch["student_weight"].T
    expected = self_distillation_loss(
        student_logits, mixed_logits, batch["completion_ids"], batch["completion_mask"], **options
    )
    torch.testing.assert_close(loss, expected)


def test_teacher_gets_no_gradient_and_no_grad_mode_gives_the_same_loss():
    batch = random_batch(seed=5)
    teacher_hidden, teacher_weight = leaf(batch["teacher_hidden"]), leaf(batch["teacher_weight"])
    args = (batch["student_hidden"], batch["student_weight"], teacher_hidden, teacher_weight)
    rest = (batch["completion_ids"], batch["completion_mask"])
    options = dict(settings=settings("jsd_full_vocab"), chunk_size=2)
    with torch.no_grad():
        without_grad = self_distillation_loss_from_hidden(*args, *rest, **options)
    loss, _, _ = chunked(*args, *rest, **options)
    torch.testing.assert_close(without_grad, loss)
    assert not without_grad.requires_grad
    student_hidden = leaf(batch["student_hidden"])
    self_distillation_loss_from_hidden(student_hidden, *args[1:], *rest, **options).backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert student_hidden.grad.abs().max() > 0


def test_nothing_distilled_gives_zero_loss_and_zero_gradients_even_with_non_finite_padding():
    batch = random_batch(seed=6)
    batch["student_hidden"][:, -1] = float("inf")
    batch["teacher_hidden"][:, -1] = float("nan")
    options = dict(settings=settings("jsd_top5_tail", is_clip=2.0, loss_agg_mode="seq-mean-token-mean"))
    all_masked = chunked(*positional(batch, torch.zeros(3)), chunk_size=2, **options)
    assert all_masked[0].item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in all_masked[1:])

    batch["completion_mask"][:, -1] = 0  # the non-finite column is padding: it cannot reach loss or gradients
    loss, grad_hidden, grad_weight = chunked(*positional(batch), chunk_size=2, **options)
    assert loss.isfinite() and loss > 0
    assert grad_hidden.isfinite().all() and grad_weight.isfinite().all() and grad_weight.abs().max() > 0


def test_bfloat16_inputs_give_a_float32_loss_close_to_float32():
    batch = random_batch(seed=7)
    options = dict(settings=settings("jsd_top5_tail"))
    half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}
    loss, grad_hidden, grad_weight = chunked(*positional(half), chunk_size=4, **options)
    assert loss.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    upcast = {k: v.float() if v.is_floating_point() else v for k, v in half.items()}
    expected = reference(*positional(upcast), **options)
    assert loss.item() == pytest.approx(expected[0].item(), rel=2e-2)


def test_ambient_autocast_does_not_lower_the_projection_precision():
    batch = random_batch(seed=9)
    options = dict(settings=settings("jsd_top5_tail"), chunk_size=4)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        under_autocast = chunked(*positional(batch)[:6], **options)
    assert_same(under_autocast, chunked(*positional(batch)[:6], **options))


def blended_gradients(batch, sd_mask, options, second_loss, expected_gradient=None, use_chunks=True):
    """Gradients of ``0.3 * distillation + 0.7 * second_loss(student logps)`` (hidden, weight) and the logps, through
    the chunked loss with a `PolicyGradient` (returned too) or through materialised logits."""
    hidden, weight = leaf(batch["student_hidden"]), leaf(batch["student_weight"])
    args = (batch["teacher_hidden"], batch["teacher_weight"], batch["completion_ids"], batch["completion_mask"])
    if use_chunks:
        policy = PolicyGradient(expected_gradient)
        loss, logps = self_distillation_loss_from_hidden(
            hidden, weight, *args, sd_mask, policy_gradient=policy, **options
        )
    else:
        policy, temperature = None, options.get("temperature", 1.0)
        student_logits = hidden @ weight.T / temperature
        teacher_logits = args[0] @ args[1].T / temperature
        options = {k: v for k, v in options.items() if k not in ("chunk_size", "temperature")}
        loss = self_distillation_loss(student_logits, teacher_logits, *args[2:], sd_mask, **options)
        distilled = batch["completion_mask"] * sd_mask[:, None]
        logps = torch.where(distilled.bool(), sampled_token_logps(student_logits, batch["completion_ids"]), 0.0)
    total = 0.3 * loss + 0.7 * second_loss(logps)
    return (logps.detach(), *torch.autograd.grad(total, (hidden, weight))), policy


@pytest.mark.parametrize("name", ["jsd_full_vocab", "jsd_top5_tail", "sampled_token"])
def test_a_second_loss_on_the_logps_shares_the_pass_when_its_gradient_is_expected(name):
    """A loss linear in the log-probs (GRPO's on policy) with its gradient given: one pass, the exact gradients."""
    batch, sd_mask = random_batch(seed=10), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    coefficients = torch.randn(3, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = dict(settings=settings(name), chunk_size=4, temperature=0.7)
    second_loss = lambda logps: (coefficients * logps).sum()  # noqa: E731
    fused, policy = blended_gradients(batch, sd_mask, options, second_loss, 0.7 / 0.3 * coefficients)
    expected, _ = blended_gradients(batch, sd_mask, options, second_loss, use_chunks=False)
    assert_same(fused, expected)
    assert not policy.recomputed
    assert fused[0][1].abs().max() == 0 and fused[0][0].abs().min() > 0  # 0 where not distilled


@pytest.mark.parametrize("expected_gradient", [None, "wrong"])
def test_a_second_loss_with_another_gradient_is_recomputed_exactly(expected_gradient):
    batch, sd_mask = random_batch(seed=11), torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    options = dict(settings=settings("jsd_top5_tail", is_clip=2.0), chunk_size=3)
    second_loss = lambda logps: (logps.exp() * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum()  # noqa: E731
    guess = None if expected_gradient is None else torch.ones(3, 7, dtype=torch.float64)
    fused, policy = blended_gradients(batch, sd_mask, options, second_loss, guess)
    expected, _ = blended_gradients(batch, sd_mask, options, second_loss, use_chunks=False)
    assert_same(fused, expected)
    assert policy.recomputed


def test_logps_come_without_gradient_in_no_grad_mode():
    batch = random_batch(seed=12)
    with torch.no_grad():
        loss, logps = self_distillation_loss_from_hidden(
            *positional(batch)[:6], settings=settings("jsd_top5_tail"), policy_gradient=PolicyGradient(None)
        )
    logits = batch["student_hidden"] @ batch["student_weight"].T
    expected = sampled_token_logps(logits, batch["completion_ids"]) * batch["completion_mask"]
    torch.testing.assert_close(logps, expected)
    assert not logps.requires_grad and not loss.requires_grad


def test_gradient_scales_with_the_upstream_gradient():
    batch = random_batch(seed=8)
    options = dict(settings=settings("jsd_top5_tail"), chunk_size=3)
    hidden, weight = leaf(batch["student_hidden"]), leaf(batch["student_weight"])
    loss = self_distillation_loss_from_hidden(hidden, weight, *positional(batch)[2:6], **options)
    (2.5 * loss).backward()
    _, grad_hidden, grad_weight = chunked(*positional(batch)[:6], **options)
    torch.testing.assert_close(hidden.grad, 2.5 * grad_hidden)
    torch.testing.assert_close(weight.grad, 2.5 * grad_weight)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (dict(chunk_size=0), "chunk_size=0"),
        (dict(student_weight=torch.zeros(11, 5)), "student_lm_head_weight shape"),
        (dict(teacher_hidden=torch.zeros(3, 6, 6)), "teacher_hidden shape"),
        (dict(teacher_weight=(torch.zeros(11, 6), torch.zeros(11, 6))), "must pair up"),
        (dict(completion_ids=torch.zeros(3, 6, dtype=torch.long)), "completion_ids shape"),
    ],
)
def test_bad_arguments_raise(change, needle):
    batch = random_batch() | {k: v for k, v in change.items() if k != "chunk_size"}
    chunk_size = change.get("chunk_size", 4)
    options = dict(settings=settings("jsd_top5_tail"))
    with pytest.raises(ValueError, match=needle):
        self_distillation_loss_from_hidden(*positional(batch)[:6], chunk_size=chunk_size, **options)


TEACHER_SETUPS = {
    "ema": (SDPOConfig(teacher_update_rate=0.5), False),
    "trust_region": (SDPOConfig(teacher_mode="trust_region", teacher_update_rate=0.3), False),
    "peft_frozen": (SDPOConfig(teacher_mode="frozen"), True),
    "peft_lora_ema": (SDPOConfig(teacher_mode="lora_ema"), True),
    "peft_trust_region": (SDPOConfig(teacher_mode="trust_region", teacher_update_rate=0.3), True),
}


def trainer_for(tmp_path, sdpo_config, peft, model_type=None):
    """A trainer of the tiny Qwen2 model, or of a tiny model of `model_type` (`tiny_model`)."""
    from peft import LoraConfig, get_peft_model
    from tiny import ParityReward, grpo_args, make_dataset, make_model, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model(tokenizer) if model_type is None else tiny_model(tokenizer, model_type)
    if peft:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return SDPOTrainer(
        model=model,
        args=grpo_args(tmp_path, per_device_train_batch_size=8, temperature=0.8, gradient_checkpointing=False),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[ParityReward()],
        train_dataset=make_dataset(),
    )


# Tiny models of families whose logits are their head's projection times a config scale, or soft-capped (gemma2: a
# cap of 1 bends the tiny model's logits, up to ~4 once `assert_chunked_path_equals_logits_path` moves its weights).
TRANSFORMED_HEADS = {
    "cohere": dict(logit_scale=0.25),
    "cohere2": dict(logit_scale=0.25),
    "granite": dict(logits_scaling=4.0),
    "hyperclovax": dict(logits_scaling=3.0),
    "falcon_h1": dict(lm_head_multiplier=0.5),
    "gemma2": dict(final_logit_softcapping=1.0, head_dim=8),
}


SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
SIZES += ("num_key_value_heads", "tie_word_embeddings", "pad_token_id", "eos_token_id", "bos_token_id")


def tiny_model(tokenizer, model_type):
    """A model of `model_type` with random weights, sized as `tiny.make_model`'s, its head transformed as in
    `TRANSFORMED_HEADS`."""
    from tiny import make_model
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen = make_model(tokenizer)
    config = {size: getattr(qwen.config, size) for size in SIZES} | TRANSFORMED_HEADS[model_type]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    model.generation_config = qwen.generation_config
    return model


# falcon_h1 (Mamba layers, in plain PyTorch on CPU) takes about 25 s: in the slow tier.
SCALED_HEAD_TYPES = [pytest.param(t, marks=pytest.mark.slow) if t == "falcon_h1" else t for t in TRANSFORMED_HEADS]


@pytest.mark.parametrize("model_type", SCALED_HEAD_TYPES)
def test_a_transformed_head_takes_the_chunked_path_with_the_models_transform(model_type):
    """`logit_scale(model)` times the head's projection of `completion_hidden`, soft-capped by `logit_softcap(model)`,
    is the model's logits (in float64; the two are different computations, so to 1e-12 of the logits' scale, not
    bitwise)."""
    from tiny import make_tokenizer

    from sdpo_rl.forward import completion_hidden, completion_logits, linear_head, logit_scale, logit_softcap

    model = tiny_model(make_tokenizer(), model_type).double()
    head = linear_head(model)
    assert head is model.lm_head and (logit_scale(model) != 1.0) != (logit_softcap(model) is not None)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = completion_logits(model, ids, mask, 4)
        projected = completion_hidden(model, head, ids, mask, 4) @ head.weight.T
    if logit_softcap(model) is not None:
        projected = logit_softcap(model) * torch.tanh(projected / logit_softcap(model))
    torch.testing.assert_close(logit_scale(model) * projected, logits, rtol=0, atol=1e-12 * float(logits.abs().max()))


def loss_grads_and_entropies(trainer, batch):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    entropies = [trainer._metrics["train"][f"self_distillation/{side}_entropy"][-1] for side in ("student", "teacher")]
    return loss.detach(), grads, entropies


def assert_chunked_path_equals_logits_path(trainer, monkeypatch) -> None:
    """On a generated batch with the student moved away from its teacher (so that the loss is not zero): the loss,
    gradients and logged entropies, and the teacher's entropies, through the chunked loss as through the logits."""
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    assert 0 < batch["self_distillation_mask"].sum() < 8
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))

    head = distillation.linear_head(trainer.model)
    assert head is not None, "the tiny model's head must take the chunked path"
    chunked_loss, chunked_grads, chunked_entropies = loss_grads_and_entropies(trainer, batch)
    chunked_teacher_entropy = trainer._teacher_entropy(batch)
    for module in (distillation, hybrid, cpu_fast_path):  # every module of the trainer that looks the head up
        monkeypatch.setattr(module, "linear_head", lambda model: None)
    loss, grads, entropies = loss_grads_and_entropies(trainer, batch)

    assert loss.abs() > 1e-4
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=1e-7)
    assert chunked_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(chunked_grads[name], grads[name], rtol=1e-4, atol=1e-7)
    assert chunked_entropies == pytest.approx(entropies, rel=1e-5)
    teacher_entropy = trainer._teacher_entropy(batch)
    assert teacher_entropy.abs().max() > 0.1
    torch.testing.assert_close(chunked_teacher_entropy, teacher_entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("setup", TEACHER_SETUPS.values(), ids=TEACHER_SETUPS.keys())
def test_trainer_loss_from_hidden_states_equals_the_loss_from_logits(tmp_path, monkeypatch, setup):
    assert_chunked_path_equals_logits_path(trainer_for(tmp_path, *setup), monkeypatch)


TRANSFORMED_HEAD_SETUPS = {
    # the hybrid's one pass (the distillation and TRL's log-probs of the other tokens), a two-term teacher
    "hybrid_trust_region": SDPOConfig(teacher_mode="trust_region", teacher_update_rate=0.3, grpo_weight=0.5),
    # routing, the teacher's entropy weights and the hindsight contrast's three terms
    "srpo_contrast": SDPOConfig(sample_routing=True, teacher_entropy_weighting=1.0, hindsight_contrast=1.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", TRANSFORMED_HEAD_SETUPS)
@pytest.mark.parametrize("model_type", ["cohere", "granite", "gemma2"])
def test_trainer_loss_of_a_transformed_head_from_hidden_states_equals_the_loss_from_logits(
    tmp_path, monkeypatch, model_type, setup
):
    """Through a scaled or soft-capped head."""
    trainer = trainer_for(tmp_path, TRANSFORMED_HEAD_SETUPS[setup], False, model_type)
    assert_chunked_path_equals_logits_path(trainer, monkeypatch)


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(151_936, torch.float32), (8_192, torch.float32), (300, torch.float64)]
)
def test_default_chunk_keeps_one_chunk_of_logits_just_under_the_budget(vocab_size, dtype):
    chunk = default_chunk_size(vocab_size, dtype)
    assert chunk * vocab_size * dtype.itemsize < CHUNK_BYTES <= (chunk + 1) * vocab_size * dtype.itemsize


def test_only_a_plain_bias_free_linear_head_with_untransformed_logits_takes_the_chunked_path():
    from peft import LoraConfig, get_peft_model
    from tiny import make_model, make_tokenizer

    from sdpo_rl.forward import linear_head

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    assert linear_head(model) is model.lm_head
    assert linear_head(get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj"]))) is not None
    assert linear_head(get_peft_model(make_model(tokenizer), LoraConfig(r=4, target_modules=["lm_head"]))) is None
    assert linear_head(make_model(tokenizer, final_logit_softcapping=30.0)) is None, (
        "a cap of a family not in the table"
    )
    assert linear_head(tiny_model(tokenizer, "gemma2")) is not None, "gemma2's soft cap is applied by the loss"
    uncapped = tiny_model(tokenizer, "gemma2")
    uncapped.config.final_logit_softcapping = 0.0
    assert linear_head(uncapped) is None
    assert linear_head(make_model(tokenizer, logits_scaling=2.0)) is None, "a scale of a family not in the table"
    unscaled = tiny_model(tokenizer, "cohere")
    unscaled.config.logit_scale = 0.0
    assert linear_head(unscaled) is None
    with_bias = make_model(tokenizer)
    with_bias.lm_head = torch.nn.Linear(with_bias.config.hidden_size, len(tokenizer), bias=True)
    assert linear_head(with_bias) is None
