"""Property-based tests of the distillation loss: any shapes, alphas, K, masks and temperatures."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdpo_rl.loss import LossSettings, divergence, per_token_divergence, self_distillation_loss
from sdpo_rl.loss.chunked import self_distillation_loss_from_hidden

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
alphas = st.sampled_from([0.0, 0.25, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)


@st.composite
def loss_inputs(draw):
    """Random logits (including extreme scales), masks, old log-probs and settings for `self_distillation_loss`."""
    batch, length, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(2, 12))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.01, 1.0, 30.0]))
    temperature = draw(st.sampled_from([0.3, 1.0, 2.0]))
    full_logit = draw(st.booleans())

    def logits():
        return torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * scale / temperature

    return dict(
        student_logits=logits(),
        teacher_logits=logits(),
        completion_ids=torch.randint(vocab, (batch, length), generator=generator),
        completion_mask=(torch.rand(batch, length, generator=generator) < draw(st.floats(0.0, 1.0))).double(),
        self_distillation_mask=(torch.rand(batch, generator=generator) < 0.7).double(),
        old_per_token_logps=-torch.rand(batch, length, generator=generator, dtype=torch.float64) * 5
        if draw(st.booleans())
        else None,
        settings=LossSettings(
            alpha=draw(alphas) if full_logit else 1.0,
            distillation_topk=draw(st.none() | st.integers(1, 15)),
            distillation_add_tail=draw(st.booleans()),
            full_logit_distillation=full_logit,
            is_clip=draw(st.none() | st.sampled_from([1.0, 2.0, 10.0])),
            loss_agg_mode=draw(st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])),
        ),
    )


@PROPERTY_SETTINGS
@given(inputs=loss_inputs())
def test_loss_and_gradient_are_finite(inputs):
    student = inputs["student_logits"].clone().requires_grad_(True)
    loss = self_distillation_loss(**{**inputs, "student_logits": student})
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()
    if inputs["settings"].full_logit_distillation:
        # A divergence is >= 0; where it is exactly 0 (e.g. a renormalised top-1 support), float64 rounding of the
        # mixture can leave -1e-16, hence the same bound as the divergence test below.
        assert loss >= -1e-12


def log_distributions(draw, shape):
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 20.0]))
    return [torch.log_softmax(torch.randn(shape, generator=generator, dtype=torch.float64) * scale, -1) for _ in "sq"]


@PROPERTY_SETTINGS
@given(data=st.data(), alpha=alphas, vocab=st.integers(2, 50))
def test_divergence_is_non_negative_and_zero_on_equal_inputs(data, alpha, vocab):
    s, q = log_distributions(data.draw, (4, vocab))
    assert (divergence(s, q, alpha) >= -1e-12).all()
    assert divergence(s, s, alpha).abs().max() < 1e-12


@PROPERTY_SETTINGS
@given(data=st.data(), vocab=st.integers(2, 50))
def test_jsd_is_symmetric_and_bounded_by_log_2(data, vocab):
    s, q = log_distributions(data.draw, (4, vocab))
    forward, backward = divergence(s, q, 0.5), divergence(q, s, 0.5)
    torch.testing.assert_close(forward, backward, rtol=1e-9, atol=1e-12)
    assert (forward <= math.log(2) + 1e-12).all()


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    alpha=alphas,
    topk=st.none() | st.integers(1, 20),
    add_tail=st.booleans(),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_teacher_equal_to_student_gives_zero_per_token_divergence(data, alpha, topk, add_tail, temperature):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    logits = torch.randn(2, 3, 16, generator=generator, dtype=torch.float64) / temperature
    divergences = per_token_divergence(
        logits,
        logits.clone(),
        torch.zeros(2, 3, dtype=torch.long),
        settings=LossSettings(
            alpha, topk, add_tail, full_logit_distillation=True, is_clip=None, loss_agg_mode="token-mean"
        ),
    )
    assert divergences.abs().max() < 1e-12


@PROPERTY_SETTINGS
@given(inputs=loss_inputs(), hidden_size=st.integers(1, 6), chunk_size=st.integers(1, 7), temperature=st.floats(0.3, 3))
def test_chunked_loss_from_hidden_states_equals_the_loss_from_logits(inputs, hidden_size, chunk_size, temperature):
    generator = torch.Generator().manual_seed(hidden_size * 1000 + chunk_size)
    batch, length, vocab = inputs["student_logits"].shape
    student_hidden, teacher_hidden = (
        torch.randn(batch, length, hidden_size, generator=generator, dtype=torch.float64) for _ in "st"
    )
    student_head, teacher_head = (
        torch.randn(vocab, hidden_size, generator=generator, dtype=torch.float64) for _ in "st"
    )
    student_hidden.requires_grad_(True)
    options = {k: v for k, v in inputs.items() if k not in ("student_logits", "teacher_logits")}
    chunked = self_distillation_loss_from_hidden(
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        temperature=temperature,
        chunk_size=chunk_size,
        **options,
    )
    (chunked_grad,) = torch.autograd.grad(chunked, student_hidden) if chunked.requires_grad else (None,)
    reference = self_distillation_loss(
        student_hidden @ student_head.T / temperature, teacher_hidden @ teacher_head.T / temperature, **options
    )
    torch.testing.assert_close(chunked, reference, rtol=1e-6, atol=1e-9)
    if chunked_grad is not None and reference.requires_grad:
        (reference_grad,) = torch.autograd.grad(reference, student_hidden)
        torch.testing.assert_close(chunked_grad, reference_grad, rtol=1e-6, atol=1e-9)
