"""The SDPO loss from final hidden states and output heads, a chunk of tokens at a time (docs/how-it-works.md
section 4).

:func:`self_distillation_loss_from_hidden` computes :func:`sdpo_rl.loss.self_distillation_loss` of the logits
``hidden @ weight.T / temperature`` without ever holding the ``[B, T, V]`` logits: only the distilled tokens are
projected, ``chunk_size`` of them at a time, through :func:`sdpo_rl.loss.per_token_loss`, and each chunk's gradient
is finished before the next chunk is projected. Notation as in :mod:`sdpo_rl.loss`, plus ``H`` the hidden size and
``N`` the number of distilled tokens. A model's transform of its head's projection (a scale, Gemma 2's soft cap) is
applied to each projected term; the soft cap's gradient is taken from the probabilities
(`_capped_softmax_backward_`).

With the full vocabulary as support, a chunk projects both models into two ``[chunk, V]`` buffers (`_chunk_step`).
With a sparse support (the default top-K, or the sampled token), the teacher is only read at the support: one pass
over all tokens computes its log-normaliser (`_teacher_pass`), and a chunk needs one buffer.

With a :class:`PolicyGradient` the same pass also returns the student's log-probabilities of the completion tokens,
for a second loss on them (TRL's GRPO loss in the hybrid), and folds that loss's gradient into each chunk's: the two
losses share one projection of the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch.autograd.function import once_differentiable

from .self_distillation import (
    LossSettings,
    aggregate,
    check_token_shapes,
    distillation_mask,
    loss_dtype,
    support_indices,
    support_loss,
)

# `self_distillation_loss_from_hidden` projects as many tokens at a time as keep one [chunk, V] tensor under this size
# (62 tokens with a 151,936-token vocabulary in float32); a chunk's loss and gradient hold one or two of them. Just
# above 32 MiB, glibc's largest heap block, each is mapped on allocation and returned when freed, so the resident
# memory is what is alive; smaller ones are carved from the heap, which fragments (measured: up to twice the peak).
CHUNK_BYTES = 36 * 2**20
# Vocabulary columns `project_logits` computes at a time on the CPU.
CPU_PROJECTION_COLUMNS = 32_768
# (tokens, vocabulary columns) `_teacher_pass` projects at a time: a 4 MiB float32 buffer.
TEACHER_PASS_SHAPE = (256, 4096)
# Tokens whose support's head rows `_logits_at` gathers at a time (8 x 100 x 896 float32: under 3 MiB).
GATHER_ROWS = 8
# Vocabulary columns `_exp_with_entropy_` exponentiates (and `_capped_softmax_backward_` soft-caps) at a time (1 MiB
# temporary at 62 tokens).
ENTROPY_COLUMNS = 4096


def _check_hidden_shapes(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: tuple[torch.Tensor, ...],
    teacher_weight: tuple[torch.Tensor, ...],
    **others: torch.Tensor | None,
) -> None:
    """Hidden states ``[B, T, H_i]`` with head weights ``[V, H_i]``; ``self_distillation_mask`` ``[B]``; every other
    tensor ``[B, T]``."""
    shape = tuple(student_hidden.shape)
    if len(shape) != 3:
        raise ValueError(f"student_hidden shape {shape} must be [B, T, H]")
    if len(teacher_hidden) != len(teacher_weight) or not teacher_hidden:
        raise ValueError(
            f"teacher_hidden ({len(teacher_hidden)} tensors) and teacher_lm_head_weight ({len(teacher_weight)}) must "
            "pair up, at least one of each"
        )
    vocab = student_weight.shape[0]
    for name, hidden, weight in [("student", student_hidden, student_weight)] + [
        ("teacher", h, w) for h, w in zip(teacher_hidden, teacher_weight, strict=True)
    ]:
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != shape[:2]:
            raise ValueError(f"{name}_hidden shape {tuple(hidden.shape)} must be [B, T, H] = {shape[:2]} + [H]")
        if tuple(weight.shape) != (vocab, hidden.shape[-1]):
            raise ValueError(
                f"{name}_lm_head_weight shape {tuple(weight.shape)} != [V, H] = {(vocab, hidden.shape[-1])}"
            )
    check_token_shapes(shape[:2], f"student_hidden {shape}", **others)


@dataclass(frozen=True)
class _DistilledTokens:
    """What the loss needs of the ``N`` distilled tokens besides the student's hidden states: ``[N, ...]`` each."""

    teacher_hidden: tuple[torch.Tensor, ...]  # each [N, H_i]
    completion_ids: torch.Tensor
    old_per_token_logps: torch.Tensor | None
    per_token_weight: torch.Tensor | None
    loss_weight: torch.Tensor  # c_t: the weight of each token's loss in the aggregated loss
    logp_gradient: torch.Tensor | None  # g_t: the gradient w.r.t. the student's log-prob of the token (PolicyGradient)
    # With a sparse support (top-K or the sampled token): the teacher's log-normaliser and entropy, from `_teacher_pass`
    teacher_log_normaliser: torch.Tensor | None = None
    teacher_entropy: torch.Tensor | None = None

    def rows(self, rows: slice) -> _DistilledTokens:
        return _DistilledTokens(
            *(
                tuple(h[rows] for h in value) if isinstance(value, tuple) else None if value is None else value[rows]
                for value in (getattr(self, field.name) for field in fields(self))
            )
        )


@dataclass
class PolicyGradient:
    """A second loss on the student's log-probabilities of the distilled tokens, sharing the chunk pass.

    ``expected`` (``[B, T]``) is that loss's gradient w.r.t. each log-probability, relative to this loss's weight in
    the caller's total: ``d total / d logp_t`` divided by ``d total / d loss``. The pass adds it to each chunk's
    gradient, so the head is projected once for both losses. If the gradient that arrives in backward differs (by
    more than a relative 1e-5), the chunks are projected again with it, so the result is always the true gradient;
    ``recomputed`` then says so. ``expected=None`` always recomputes.
    """

    expected: torch.Tensor | None
    recomputed: bool = False


@dataclass(frozen=True)
class _ChunkSettings:
    teacher_weight: tuple[torch.Tensor, ...]  # each [V, H_i]
    teacher_coefficients: tuple[float, ...]  # the teacher's logits: sum_i c_i cap(h_i @ W_i.T)
    softcap: float | None  # cap(z) = softcap * tanh(z / softcap), student and teacher; None: cap(z) = z
    temperature: float  # the logits are divided by it: the sampling temperature over the logit scale
    chunk_size: int
    dtype: torch.dtype  # of the logits and the loss
    return_entropy: bool
    grad_enabled: bool
    loss: LossSettings


@dataclass(frozen=True)
class _ChunkBuffers:
    """The ``[chunk, V]`` tensors every chunk reuses (see `_chunk_step`): a fresh block that large is mapped and
    page-faulted each time. The teacher's only with the full vocabulary as support."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor | None

    @classmethod
    def allocate(cls, rows: int, vocab_size: int, like: torch.Tensor, dtype: torch.dtype, sparse: bool):
        student = like.new_empty(rows, vocab_size, dtype=dtype)
        return cls(student, None if sparse else like.new_empty(rows, vocab_size, dtype=dtype))

    def rows(self, count: int) -> _ChunkBuffers:
        teacher = None if self.teacher_logits is None else self.teacher_logits[:count]
        return _ChunkBuffers(self.student_logits[:count], teacher)


def project_logits(
    hidden: Sequence[torch.Tensor],
    weight: Sequence[torch.Tensor],
    out: torch.Tensor,
    coefficients: Sequence[float] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``out = sum_i c_i cap(hidden_i @ weight_i.T)``, returned: ``[n, H_i]`` and ``[V, H_i]`` pairs into ``[n, V]``.

    ``c_i`` are the `coefficients` (None: all 1) and ``cap(z) = softcap * tanh(z / softcap)`` (None: ``cap(z) = z``),
    the models' soft-capping, applied to each term, in ``out``'s dtype; each product runs in its weight's dtype, as
    the head would. On the CPU a slice of the vocabulary at a time: MKL gives a product of so few rows a workspace
    the size of its output (measured: one more ``[chunk, V]`` at the peak), and a slice's is a fraction of that.
    """
    coefficients = (1.0,) * len(hidden) if coefficients is None else coefficients
    columns = CPU_PROJECTION_COLUMNS if out.device.type == "cpu" else out.shape[1]
    for start in range(0, out.shape[1], columns):
        part = slice(start, start + columns)
        for i, (h, w, c) in enumerate(zip(hidden, weight, coefficients, strict=True)):
            h, w, o = h.to(w.dtype), w[part], out[:, part]
            if softcap is not None:
                term = _soft_cap_((h @ w.T).to(o.dtype), softcap, c)
                o.copy_(term) if i == 0 else o.add_(term)
                continue
            if c != 1.0:
                h = c * h  # linear: the coefficient scales the hidden states
            if w.dtype != out.dtype:
                product = h @ w.T
                o.copy_(product) if i == 0 else o.add_(product)
            elif i == 0:
                torch.mm(h, w.T, out=o)
            else:
                o.addmm_(h, w.T)
    return out


def _soft_cap_(logits: torch.Tensor, softcap: float | None, coefficient: float = 1.0) -> torch.Tensor:
    """``coefficient * softcap * tanh(logits / softcap)`` in place (``coefficient * logits`` for no softcap)."""
    if softcap is not None:
        logits.div_(softcap).tanh_()
        coefficient = coefficient * softcap
    return logits if coefficient == 1.0 else logits.mul_(coefficient)


def _aggregation_weights(mask: torch.Tensor, loss_agg_mode: str, normalizer: torch.Tensor | float | None):
    """``c = d aggregate / d l``: ``[B, T]``, the weight of each token's loss in the loss (aggregate() is linear)."""
    return torch.func.grad(lambda losses: aggregate(losses, mask, loss_agg_mode, normalizer))(torch.zeros_like(mask))


class _ChunkedHeadLoss(torch.autograd.Function):
    """``sum_t c_t l_t`` over ``N`` tokens whose student logits are ``hidden @ weight.T``, projected chunk by chunk.

    The loss is linear in the per-token losses, so a chunk's gradient w.r.t. the student's hidden states and head
    weight is final as soon as the chunk is done: it is computed in the forward pass and only scaled in backward. No
    logits are kept and none is projected twice; the weight's gradient is accumulated in place (float32 or wider).
    Returns the loss, the ``[N]`` student and teacher entropies (None without ``return_entropy``) and the ``[N]``
    student log-probabilities of the tokens (None without a `PolicyGradient`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens: _DistilledTokens, settings: _ChunkSettings, policy: PolicyGradient | None):
        grad_enabled = settings.grad_enabled and any(ctx.needs_input_grad[:2])
        gradients = _zero_gradients(ctx.needs_input_grad, hidden, weight) if grad_enabled else (None, None)
        if _sparse_support(settings.loss):
            tokens = replace(tokens, **_teacher_pass(tokens.teacher_hidden, settings))
        loss, student_entropy, teacher_entropy, logps = _chunk_pass(hidden, weight, tokens, settings, *gradients)
        ctx.gradients = gradients
        ctx.weight_dtype = weight.dtype
        if policy is not None and grad_enabled:
            ctx.policy, ctx.tokens, ctx.settings = policy, tokens, settings
            ctx.save_for_backward(hidden, weight)
        if settings.return_entropy:
            ctx.mark_non_differentiable(student_entropy, teacher_entropy)
        else:
            student_entropy = teacher_entropy = None
        return loss, student_entropy, teacher_entropy, None if policy is None else logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _student_entropy_grad, _teacher_entropy_grad, grad_logps):
        grad_hidden, grad_weight = ctx.gradients
        del ctx.gradients  # scaled in place below: a second backward must fail, not scale them again
        policy = getattr(ctx, "policy", None)
        if policy is not None and not _matches(grad_logps, ctx.tokens.logp_gradient, grad_loss):
            policy.recomputed = True
            hidden, weight = ctx.saved_tensors
            for gradient in (grad_hidden, grad_weight):
                if gradient is not None:
                    gradient.zero_()
            tokens = replace(ctx.tokens, loss_weight=ctx.tokens.loss_weight * grad_loss, logp_gradient=grad_logps)
            _chunk_pass(hidden, weight, tokens, replace(ctx.settings, return_entropy=False), grad_hidden, grad_weight)
        elif grad_hidden is not None or grad_weight is not None:
            for gradient in (grad_hidden, grad_weight):
                if gradient is not None:
                    gradient.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _zero_gradients(needs_input_grad, hidden, weight) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Zeroed gradient accumulators for the student's hidden states and head weight (float32 or wider), if wanted."""
    return (
        torch.zeros_like(hidden) if needs_input_grad[0] else None,
        torch.zeros_like(weight, dtype=loss_dtype(weight)) if needs_input_grad[1] else None,
    )


def _matches(actual: torch.Tensor, expected: torch.Tensor | None, scale: torch.Tensor) -> bool:
    """Whether the log-probabilities' gradient that arrived is ``scale * expected`` (relative 1e-5)."""
    if expected is None:
        return False
    expected = expected * scale
    if expected.numel() == 0:
        return True
    tolerance = 1e-5 * expected.abs().max().clamp(min=torch.finfo(expected.dtype).tiny)
    return bool(((actual - expected).abs() <= tolerance).all())


def _chunk_pass(hidden, weight, tokens: _DistilledTokens, settings: _ChunkSettings, grad_hidden, grad_weight):
    """All chunks of `_ChunkedHeadLoss`: ``(loss, [N] student entropy, [N] teacher entropy, [N] student logps)``.

    Adds the gradients into ``grad_hidden`` and ``grad_weight`` where given; the entropies are empty without
    ``settings.return_entropy``.
    """
    loss = hidden.new_zeros((), dtype=settings.dtype)
    no_tokens = hidden.new_zeros(0, dtype=torch.float32)
    entropies = [(no_tokens, no_tokens)]  # (student, teacher) per chunk
    logps = hidden.new_empty(hidden.shape[0], dtype=settings.dtype)
    buffer_rows = min(settings.chunk_size, hidden.shape[0])
    sparse = _sparse_support(settings.loss)
    buffers = _ChunkBuffers.allocate(buffer_rows, weight.shape[0], hidden, settings.dtype, sparse)
    for start in range(0, hidden.shape[0], settings.chunk_size):
        rows = slice(start, start + settings.chunk_size)
        chunk_loss, chunk_entropies = _chunk_step(
            hidden[rows],
            weight,
            tokens.rows(rows),
            settings,
            buffers.rows(hidden[rows].shape[0]),
            None if grad_hidden is None else grad_hidden[rows],
            grad_weight,
            logps[rows],
        )
        loss += chunk_loss
        entropies += chunk_entropies
    student_entropy, teacher_entropy = (torch.cat(side) for side in zip(*entropies, strict=True))
    return loss, student_entropy, teacher_entropy, logps


def _chunk_step(
    hidden,
    weight,
    chunk: _DistilledTokens,
    settings: _ChunkSettings,
    buffers: _ChunkBuffers,
    grad_hidden,
    grad_weight,
    logps_out,
):
    """One chunk: its ``sum_t c_t l_t`` and ``[n]`` (student, teacher) entropies in a list (empty if not wanted).

    Writes the student's log-probabilities of the chunk's tokens into ``logps_out`` and adds the chunk's gradients
    into ``grad_hidden`` (its rows) and ``grad_weight`` when they are given. The ``[n, V]`` buffers are the only
    tensors that size (the full-vocabulary divergence's autograd adds its own). The student's holds its logits, then
    its log-probabilities. With the full vocabulary as support, the teacher's holds its logits, its
    log-probabilities, then the student's probabilities and finally the gradient w.r.t. the student's logits; with a
    sparse support there is no teacher buffer, and the student's takes those last two.
    """
    student = buffers.student_logits
    project_logits([hidden], [weight], student, softcap=settings.softcap)
    if settings.temperature != 1.0:
        student.div_(settings.temperature)
    indices = support_indices(student, chunk.completion_ids, settings.loss)
    first_logit = student[:, :1].clone() if settings.softcap is not None else None
    torch.log_softmax(student, dim=-1, out=student)
    # [n, 1]: the soft cap's gradient recovers the logits from the probabilities with it
    log_normaliser = None if first_logit is None else first_logit.sub_(student[:, :1])
    q = _teacher_log_probs(chunk, settings, buffers.teacher_logits, indices)

    # The loss reads the log-probabilities at the support only: its gradient w.r.t. them is [n, N], and autograd
    # never sees a [n, V] tensor (unless N = V).
    student_logps = torch.gather(student, -1, chunk.completion_ids.unsqueeze(-1), out=logps_out.unsqueeze(-1))
    student_logps = student_logps.squeeze(-1)
    s = student if indices is None else student.gather(-1, indices)
    wants_grad = grad_hidden is not None or grad_weight is not None
    with torch.enable_grad():
        s = s.detach().requires_grad_(wants_grad)
        per_token = support_loss(s, q, student_logps, chunk.old_per_token_logps, chunk.per_token_weight, settings.loss)
        chunk_loss = (chunk.loss_weight * per_token).sum()
    grad_s = torch.autograd.grad(chunk_loss, s)[0] if wants_grad else None

    if not (wants_grad or settings.return_entropy):
        return chunk_loss.detach(), []
    probs, entropies = _probabilities(student, buffers.teacher_logits, chunk, settings)
    if wants_grad:
        grad_logits = _logits_gradient(probs, grad_s, indices, chunk, settings, log_normaliser)
        _add_gradients(grad_logits, hidden, weight, grad_hidden, grad_weight)
    return chunk_loss.detach(), entropies


def _teacher_log_probs(chunk: _DistilledTokens, settings: _ChunkSettings, buffer, indices) -> torch.Tensor:
    """The teacher's log-probabilities at the support ``[n, N]`` (``indices``), or ``[n, V]`` in ``buffer`` when the
    support is the whole vocabulary.

    With a sparse support there is no buffer: its logits are computed at the support only, from its hidden states
    and the gathered rows of its head, and normalised by the log-normaliser `_teacher_pass` computed for every token.
    """
    terms = (chunk.teacher_hidden, settings.teacher_weight)
    if buffer is None:
        logits = _logits_at(*terms, indices, settings.dtype, settings.teacher_coefficients, settings.softcap)
        return logits.div_(settings.temperature).sub_(chunk.teacher_log_normaliser.unsqueeze(-1))
    project_logits(*terms, buffer, settings.teacher_coefficients, settings.softcap)
    if settings.temperature != 1.0:
        buffer.div_(settings.temperature)
    torch.log_softmax(buffer, dim=-1, out=buffer)
    return buffer if indices is None else buffer.gather(-1, indices)


def _probabilities(student: torch.Tensor, teacher: torch.Tensor | None, chunk: _DistilledTokens, settings):
    """The student's probabilities ``[n, V]`` from its log-probabilities, in the teacher's buffer if there is one
    (its log-probabilities are no longer needed), else in place; and the chunk's entropies, if wanted."""
    if teacher is None:
        if not settings.return_entropy:
            return student.exp_(), []
        return student, [(_exp_with_entropy_(student), chunk.teacher_entropy.float())]
    teacher_entropy = _entropy_in_place(teacher) if settings.return_entropy else None
    probs = torch.exp(student, out=teacher)
    entropies = [(_dot_rows(probs, student).neg_().float(), teacher_entropy)] if settings.return_entropy else []
    return probs, entropies


def _logits_gradient(probs, grad_s, indices, chunk: _DistilledTokens, settings: _ChunkSettings, log_normaliser):
    """Turn ``probs`` ``[n, V]`` into the gradient w.r.t. the chunk's head projection, from the loss's gradient
    ``grad_s`` w.r.t. the student's log-probabilities at ``indices`` (and the `PolicyGradient`'s at the sampled
    tokens), through the temperature and the soft cap (``log_normaliser`` ``[n, 1]``: the student's)."""
    if chunk.logp_gradient is not None:  # the second loss's gradient w.r.t. the sampled tokens' log-probs
        ids, grad_logp = chunk.completion_ids.unsqueeze(-1), chunk.logp_gradient.unsqueeze(-1).to(grad_s.dtype)
        if indices is None:
            grad_s = grad_s.scatter_add(-1, ids, grad_logp)
        else:
            indices, grad_s = torch.cat([indices, ids], dim=-1), torch.cat([grad_s, grad_logp], dim=-1)
    if settings.softcap is None:
        return _softmax_backward_(probs, grad_s, indices, settings.temperature)
    return _capped_softmax_backward_(probs, grad_s, indices, settings.temperature, settings.softcap, log_normaliser)


def _add_gradients(grad_logits, hidden, weight, grad_hidden, grad_weight) -> None:
    """Add the gradients w.r.t. the hidden states (their rows) and the head weight, from the projection's."""
    if grad_hidden is not None:
        grad_hidden.copy_(grad_logits.to(weight.dtype) @ weight)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), hidden.to(grad_weight.dtype))


def _sparse_support(settings: LossSettings) -> bool:
    """Whether the loss reads the log-probabilities at a few tokens per position (top-K or the sampled token)."""
    return not settings.full_logit_distillation or settings.distillation_topk is not None


def _logits_at(hidden, weight, indices: torch.Tensor, dtype, coefficients: Sequence[float], softcap: float | None):
    """`project_logits` at ``indices`` only: ``[n, H_i]``, ``[V, H_i]``, ``[n, K]`` -> ``[n, K]``.

    A few rows at a time, so that the gathered head rows (``[rows, K, H_i]``) stay small.
    """
    out = indices.new_zeros(indices.shape, dtype=dtype)
    for start in range(0, indices.shape[0], GATHER_ROWS):
        rows = slice(start, start + GATHER_ROWS)
        for h, w, c in zip(hidden, weight, coefficients, strict=True):
            product = torch.bmm(w[indices[rows]], h[rows].to(w.dtype).unsqueeze(-1)).squeeze(-1)
            out[rows] += _soft_cap_(product.to(dtype), softcap, c)
    return out


def _teacher_pass(teacher_hidden: tuple[torch.Tensor, ...], settings: _ChunkSettings) -> dict[str, torch.Tensor]:
    """The teacher's log-normaliser ``logsumexp_v z_v / temperature`` of every token (and, with ``return_entropy``,
    its entropy), as ``teacher_log_normaliser`` and ``teacher_entropy`` ``[N]``.

    Many tokens against a slice of the vocabulary at a time (`TEACHER_PASS_SHAPE`), with running sums rescaled as
    the running maximum grows: the teacher's head is read a few times in all, not once per chunk, and its products
    have enough rows to run at full speed. With ``m`` the running maximum, it keeps ``S = sum e^(z - m)`` and
    ``U = sum e^(z - m) (z - m)``; then ``logsumexp = m + log S`` and the entropy is ``log S - U / S``.
    """
    tokens, vocab = teacher_hidden[0].shape[0], settings.teacher_weight[0].shape[0]
    block_rows, block_columns = TEACHER_PASS_SHAPE
    buffer = teacher_hidden[0].new_empty(min(block_rows, tokens), min(block_columns, vocab), dtype=settings.dtype)
    normaliser = teacher_hidden[0].new_empty(tokens, dtype=settings.dtype)
    entropy = teacher_hidden[0].new_empty(tokens, dtype=settings.dtype) if settings.return_entropy else None
    for start in range(0, tokens, block_rows):
        rows = slice(start, start + block_rows)
        hidden = [h[rows] for h in teacher_hidden]
        n = hidden[0].shape[0]
        maximum = buffer.new_full((n,), torch.finfo(settings.dtype).min)
        total, spread = buffer.new_zeros(n), buffer.new_zeros(n)
        for first in range(0, vocab, block_columns):
            columns = slice(first, first + block_columns)
            logits = project_logits(
                hidden,
                [w[columns] for w in settings.teacher_weight],
                buffer[:n, : min(block_columns, vocab - first)],
                settings.teacher_coefficients,
                settings.softcap,
            )
            if settings.temperature != 1.0:
                logits.div_(settings.temperature)
            new_maximum = torch.maximum(maximum, logits.amax(-1))
            shift = maximum - new_maximum
            rescale = shift.exp()
            shifted = logits.sub_(new_maximum.unsqueeze(-1))
            if entropy is None:
                total = rescale * total + shifted.exp_().sum(-1)
            else:
                exponentials = shifted.exp()
                spread = rescale * (spread + shift * total) + shifted.mul_(exponentials).sum(-1)
                total = rescale * total + exponentials.sum(-1)
            maximum = new_maximum
        normaliser[rows] = maximum + total.log()
        if entropy is not None:
            entropy[rows] = total.log() - spread / total
    return dict(teacher_log_normaliser=normaliser, teacher_entropy=entropy)


def _exp_with_entropy_(log_probs: torch.Tensor) -> torch.Tensor:
    """Turn log-probabilities ``[n, V]`` into probabilities in place; return their entropies ``[n]`` float32.

    A slice of columns at a time, with one small temporary: ``-sum_v p_v log p_v`` comes with the exponential the
    gradient needs anyway.
    """
    entropy = log_probs.new_zeros(log_probs.shape[0])
    for start in range(0, log_probs.shape[1], ENTROPY_COLUMNS):
        part = log_probs[:, start : start + ENTROPY_COLUMNS]
        probs = part.exp()
        entropy -= part.mul_(probs).sum(-1)
        part.copy_(probs)
    return entropy.float()


def _entropy_in_place(log_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log p_v`` of log-probabilities ``[n, V]`` -> ``[n]`` float32, computed in their storage."""
    return torch.special.entr(log_probs.exp_(), out=log_probs).sum(-1).float()


def _dot_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_v a[i, v] * b[i, v]``: ``[n, V]`` twice -> ``[n]``, as a batched product (no ``[n, V]`` temporary)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _softmax_backward_(
    probs: torch.Tensor, grad_support: torch.Tensor, indices: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """The gradient w.r.t. the logits ``z`` (before the temperature) of a loss whose gradient w.r.t.
    ``s = log_softmax(z / temperature)`` is ``grad_support`` at ``indices`` (``[n, N]``; all of ``s`` when None)
    and 0 elsewhere: ``(g - probs * sum(g)) / temperature``, written into ``probs`` ``[n, V]``, which is returned.
    """
    grad_support = grad_support / temperature
    probs.mul_(grad_support.sum(-1, keepdim=True).neg_())
    return probs.add_(grad_support) if indices is None else probs.scatter_add_(-1, indices, grad_support)


def _capped_softmax_backward_(
    probs: torch.Tensor,
    grad_support: torch.Tensor,
    indices: torch.Tensor | None,
    temperature: float,
    softcap: float,
    log_normaliser: torch.Tensor,
) -> torch.Tensor:
    """`_softmax_backward_` through the soft cap: the gradient w.r.t. ``z``, the logits being
    ``cap(z) = softcap * tanh(z / softcap)``, is the one w.r.t. ``cap(z)`` times ``1 - (cap(z) / softcap)^2``.

    ``cap(z)`` is recovered from the probabilities, ``temperature * (log p + log_normaliser)``, a slice of columns
    at a time, so that no second ``[n, V]`` tensor is needed; a probability that underflowed to 0 gives the slope
    of the cap's far end, 0 (its gradient is 0 as well, unless it is in the support).
    """

    def slope(p: torch.Tensor) -> torch.Tensor:
        capped = p.log().add_(log_normaliser).mul_(temperature / softcap).clamp_(-1.0, 1.0)
        return capped.square_().neg_().add_(1.0)

    grad_support = grad_support / temperature
    total = grad_support.sum(-1, keepdim=True).neg_()
    support_slope = None if indices is None else slope(probs.gather(-1, indices))
    for start in range(0, probs.shape[1], ENTROPY_COLUMNS):
        columns = slice(start, start + ENTROPY_COLUMNS)
        part = probs[:, columns]
        part_slope = slope(part)
        part.mul_(total)
        if indices is None:
            part.add_(grad_support[:, columns])
        part.mul_(part_slope)
    return probs if indices is None else probs.scatter_add_(-1, indices, grad_support.mul_(support_slope))


def default_chunk_size(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as keep one ``[chunk, vocab_size]`` tensor of ``dtype`` under ``CHUNK_BYTES``."""
    return max(1, (CHUNK_BYTES - 1) // (vocab_size * dtype.itemsize))


def _as_tuple(tensors: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[N]`` values at the ``N`` true positions of ``where: [B, T]``, zeros elsewhere."""
    return values.new_zeros(where.shape).masked_scatter(where, values)


def self_distillation_loss_from_hidden(
    student_hidden: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | Sequence[torch.Tensor],
    teacher_lm_head_weight: torch.Tensor | Sequence[torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    self_distillation_mask: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    settings: LossSettings,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    logit_softcap: float | None = None,
    teacher_coefficients: Sequence[float] | None = None,
    per_token_weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    policy_gradient: PolicyGradient | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``self_distillation_loss`` of the logits ``logit_scale * cap(hidden @ weight.T) / temperature``, without
    ``[B, T, V]`` logits (``cap`` is the soft cap, or none).

    Only the distilled tokens (``completion_mask * self_distillation_mask``) are projected, ``chunk_size`` at a time,
    so the peak memory beyond the inputs is the head weight's gradient plus O(``chunk_size * V``). The logits are
    projected in the head weight's dtype and the loss computed in at least float32.

    Args:
        student_hidden: ``[B, T, H]`` the student's final hidden states at the completion positions.
        student_lm_head_weight: ``[V, H]`` the student's output head, a linear layer without bias. Both receive
            gradients.
        teacher_hidden, teacher_lm_head_weight: ``[B, T, H]`` and ``[V, H]``, or sequences of such pairs whose
            transformed products, times `teacher_coefficients`, add up to the teacher's logits (the trust-region
            teacher mixes two models' logits this way). They never receive a gradient.
        temperature: the sampling temperature the logits are divided by.
        logit_scale: the factor the model multiplies its head's projection by, the student's and the teacher's
            (`sdpo_rl.forward.logit_scale`: Cohere's `logit_scale`, Granite's 1 / `logits_scaling`). Linear, so it
            is applied with the temperature: the logits are divided by ``temperature / logit_scale``, and the
            gradient goes through both.
        logit_softcap: ``c`` of the models' soft-capping ``cap(z) = c * tanh(z / c)`` of each head's projection
            (`sdpo_rl.forward.logit_softcap`: Gemma 2's `final_logit_softcapping`), applied before the scale; None:
            none.
        teacher_coefficients: one factor per teacher term (None: all 1): the teacher's logits are
            ``sum_i teacher_coefficients[i] * cap(teacher_hidden[i] @ teacher_lm_head_weight[i].T)``, scaled.
        chunk_size: tokens projected at a time; any value gives the same loss. None: :func:`default_chunk_size`.
        return_entropy: also return the ``[B, T]`` entropies of the student's and the teacher's next-token
            distributions (nats, no gradient, 0 where no token is distilled), which cost one more pass per chunk.
        policy_gradient: also return the student's ``[B, T]`` log-probabilities of ``completion_ids`` (0 where no
            token is distilled), with gradient, for a second loss whose expected gradient it gives.
        The other arguments are those of :func:`sdpo_rl.loss.self_distillation_loss`.

    Returns:
        The loss, followed by ``student_entropy, teacher_entropy`` with ``return_entropy`` and by the
        log-probabilities with ``policy_gradient``; the loss alone without either.
    """
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None or an int >= 1")
    if not (_finite_number(logit_scale) and logit_scale != 0):
        raise ValueError(f"logit_scale={logit_scale!r} must be a finite non-zero number (1.0: logits unscaled)")
    if logit_softcap is not None and not (_finite_number(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"logit_softcap={logit_softcap!r} must be None (no soft-capping) or a finite positive number")
    teacher_hidden, teacher_weight = _as_tuple(teacher_hidden), _as_tuple(teacher_lm_head_weight)
    coefficients = (1.0,) * len(teacher_hidden) if teacher_coefficients is None else tuple(teacher_coefficients)
    if len(coefficients) != len(teacher_hidden) or not all(map(_finite_number, coefficients)):
        raise ValueError(
            f"teacher_coefficients={teacher_coefficients!r} must be None or {len(teacher_hidden)} finite numbers, one "
            "per teacher term"
        )
    _check_hidden_shapes(
        student_hidden,
        student_lm_head_weight,
        teacher_hidden,
        teacher_weight,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        self_distillation_mask=self_distillation_mask,
        old_per_token_logps=old_per_token_logps,
        per_token_weight=per_token_weight,
        expected_logp_gradient=None if policy_gradient is None else policy_gradient.expected,
    )
    dtype = loss_dtype(student_hidden, student_lm_head_weight, *teacher_hidden, *teacher_weight)
    mask = distillation_mask(completion_mask, self_distillation_mask, dtype)
    active = mask > 0
    tokens = _DistilledTokens(
        teacher_hidden=tuple(h.detach()[active] for h in teacher_hidden),
        completion_ids=completion_ids[active],
        old_per_token_logps=None if old_per_token_logps is None else old_per_token_logps[active].to(dtype),
        per_token_weight=None if per_token_weight is None else per_token_weight[active].to(dtype),
        loss_weight=_aggregation_weights(mask, settings.loss_agg_mode, normalizer)[active],
        logp_gradient=None
        if policy_gradient is None or policy_gradient.expected is None
        else (policy_gradient.expected[active].to(dtype)),
    )
    chunk_settings = _ChunkSettings(
        teacher_weight=tuple(w.detach() for w in teacher_weight),
        teacher_coefficients=coefficients,
        softcap=None if logit_softcap is None else float(logit_softcap),
        temperature=temperature / logit_scale,
        chunk_size=chunk_size or default_chunk_size(student_lm_head_weight.shape[0], dtype),
        dtype=dtype,
        return_entropy=return_entropy,
        grad_enabled=torch.is_grad_enabled(),
        loss=settings,
    )
    with torch.autocast(student_hidden.device.type, enabled=False):  # the dtypes above hold under autocast too
        loss, student_entropy, teacher_entropy, logps = _ChunkedHeadLoss.apply(
            student_hidden[active], student_lm_head_weight, tokens, chunk_settings, policy_gradient
        )
    outputs = (_scatter(student_entropy, active), _scatter(teacher_entropy, active)) if return_entropy else ()
    if policy_gradient is not None:
        outputs += (_scatter(logps, active),)
    return (loss, *outputs) if outputs else loss
