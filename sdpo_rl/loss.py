"""The SDPO self-distillation loss (docs/how-it-works.md section 4). Pure tensor math, no model or trainer code.

Notation: ``B`` completions, ``T`` completion tokens, ``V`` vocabulary size, ``H`` hidden size. Logits arrive already
divided by the sampling temperature. ``s = log_softmax(student_logits)``, ``q = log_softmax(teacher_logits)`` and
``KL(a || b) = sum_v e^a_v (a_v - b_v)`` over the distillation support.

Two entry points compute the same loss: :func:`self_distillation_loss` from ``[B, T, V]`` logits, and
:func:`self_distillation_loss_from_hidden` from final hidden states and the output head's weight, a chunk of tokens
at a time, so that the ``[B, T, V]`` logits never exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# The tail bucket's log-mass is capped below 0 so that log(1 - mass) stays finite when the top K hold all the mass.
_MAX_TOPK_LOG_MASS = -1e-7
# Bounds on the IS log-ratio before exp, as in the reference, so that a stale old logp cannot overflow.
_MAX_ABS_IS_LOG_RATIO = 20.0
# `self_distillation_loss_from_hidden` projects as many tokens at a time as keep one [chunk, V] tensor under this size
# (62 tokens with a 151,936-token vocabulary in float32); a chunk's loss and gradient hold about five of them. Just
# above 32 MiB, glibc's largest heap block, each is mapped on allocation and returned when freed, so the resident
# memory is what is alive; smaller ones are carved from the heap, which fragments (measured: up to twice the peak).
CHUNK_BYTES = 36 * 2**20


def sampled_token_logps(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[y_t]``: logits ``[B, T, V]``, token_ids ``[B, T]`` -> ``[B, T]``.

    Computed as ``z[y] - logsumexp(z)`` so that no ``[B, T, V]`` log-softmax has to be kept for backward.
    """
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, without gradient: logits ``[B, T, V]`` -> ``[B, T]`` (nats)."""
    return log_prob_entropy(torch.log_softmax(logits.float(), dim=-1))


@torch.no_grad()
def log_prob_entropy(log_probs: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``-sum_v e^x_v x_v``, without gradient: log-probabilities ``[..., V]`` -> ``[...]`` (nats).

    ``scratch``, a tensor of the same shape, is overwritten instead of allocating one.
    """
    return -torch.exp(log_probs, out=scratch).mul_(log_probs).sum(-1)


def log_softmax_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, q)``: the log-softmax of both logits ``[..., V]``, the teacher's detached.

    Full-logit distillation needs both over the whole vocabulary; computed once, they also give the IS ratio's
    ``log pi_S(y_t)`` and the entropies.
    """
    return torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits.detach(), dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = sum_v e^log_p (log_p - log_q)`` over the last dim: ``[..., N] -> [...]``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _add_tail(log_probs: torch.Tensor) -> torch.Tensor:
    """Append the tail bucket ``log(1 - sum exp(x_K))``: ``[..., K] -> [..., K+1]``.

    Computed as ``log(-expm1(min(logsumexp(x_K), -1e-7)))``: expm1 keeps precision when the tail mass is small.
    """
    log_mass = log_probs.logsumexp(-1, keepdim=True).clamp(max=_MAX_TOPK_LOG_MASS)
    return torch.cat([log_probs, torch.log(-torch.expm1(log_mass))], dim=-1)


def _renormalise(log_probs: torch.Tensor) -> torch.Tensor:
    """``x_K - logsumexp(x_K)``: the distribution restricted to the K entries, ``[..., K] -> [..., K]``."""
    return log_probs - log_probs.logsumexp(-1, keepdim=True)


def divergence(s: torch.Tensor, q: torch.Tensor, alpha: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence between two log-distributions: ``[..., N] -> [...]``.

    ``alpha = 0``: ``KL(q || s)`` (forward KL); ``alpha = 1``: ``KL(s || q)`` (reverse KL); otherwise with
    ``m = log((1 - alpha) e^s + alpha e^q)``: ``D = (1 - alpha) KL(s || m) + alpha KL(q || m)``.
    """
    if alpha == 0.0:
        return _kl(q, s)
    if alpha == 1.0:
        return _kl(s, q)
    m = torch.logsumexp(torch.stack([s + math.log(1.0 - alpha), q + math.log(alpha)]), dim=0)
    return (1.0 - alpha) * _kl(s, m) + alpha * _kl(q, m)


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    *,
    alpha: float,
    distillation_topk: int | None,
    distillation_add_tail: bool,
    full_logit_distillation: bool,
    log_probs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-token distillation term ``D_t`` before importance sampling and masking: ``[B, T, V] -> [B, T]``.

    student_logits, teacher_logits: ``[B, T, V]`` (the teacher is detached here); completion_ids: ``[B, T]``;
    log_probs: their :func:`log_softmax_pair` if the caller has it already (full-logit mode).

    Full-logit mode: ``divergence(s, q, alpha)`` over the full vocabulary, or with ``distillation_topk = K`` over
    ``I = topk(student_logits, K)`` (``K`` clamped to ``V``): ``s_K = s[I]``, ``q_K = q[I]``, each extended by a tail
    bucket (``distillation_add_tail``) or renormalised over the K entries.

    Sampled-token mode (``alpha`` must be 1): ``D_t = sg(log pi_S(y_t) - log pi_T(y_t)) * log pi_S(y_t)``, a surrogate
    whose gradient is the sampled-token estimate of the reverse KL's gradient.
    """
    teacher_logits = teacher_logits.detach()
    if not full_logit_distillation:
        student_logps = sampled_token_logps(student_logits, completion_ids)
        teacher_logps = sampled_token_logps(teacher_logits, completion_ids)
        return (student_logps - teacher_logps).detach() * student_logps

    s, q = log_softmax_pair(student_logits, teacher_logits) if log_probs is None else log_probs
    if distillation_topk is not None:
        k = min(distillation_topk, student_logits.shape[-1])
        # The teacher is read at the student's indices, still normalised over the teacher's full vocabulary.
        indices = student_logits.detach().topk(k, dim=-1).indices
        s, q = s.gather(-1, indices), q.gather(-1, indices)
        support = _add_tail if distillation_add_tail else _renormalise
        s, q = support(s), support(q)
    return divergence(s, q, alpha)


def importance_weight(student_logps: torch.Tensor, old_per_token_logps: torch.Tensor, is_clip: float) -> torch.Tensor:
    """Clipped IS ratio ``rho_t = min(exp(clamp(sg(log pi_S(y_t) - log pi_old(y_t)), -20, 20)), is_clip)``.

    student_logps, old_per_token_logps: ``[B, T]`` -> ``[B, T]``, detached.
    """
    log_ratio = (student_logps - old_per_token_logps).detach()
    return log_ratio.clamp(-_MAX_ABS_IS_LOG_RATIO, _MAX_ABS_IS_LOG_RATIO).exp().clamp(max=is_clip)


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss ``l`` under a ``[B, T]`` 0/1 mask to a scalar.

    - ``token-mean``: ``sum(l * mask) / max(sum(mask), 1)``
    - ``seq-mean-token-mean``: mean over sequences with any unmasked token of ``sum_t(l * mask) / sum_t(mask)``
    - ``seq-mean-token-sum``: mean over sequences with any unmasked token of ``sum_t(l * mask)``

    ``normalizer`` replaces the count in the final division (unmasked tokens for ``token-mean``, sequences with
    unmasked tokens otherwise): with the count over a whole accumulated batch, micro-batch losses add up to the
    loss of that batch. A mask with no unmasked token gives 0 (never NaN), still attached to the graph.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
    mask = mask.to(per_token_loss.dtype)
    # where(), not a bare product, so that a non-finite value at a masked position cannot turn the sum into NaN.
    masked_loss = torch.where(mask > 0, per_token_loss * mask, 0.0)
    if loss_agg_mode == "token-mean":
        return masked_loss.sum() / (mask.sum().clamp(min=1.0) if normalizer is None else normalizer)
    tokens_per_seq = mask.sum(-1)
    seq_loss = masked_loss.sum(-1)
    if loss_agg_mode == "seq-mean-token-mean":
        seq_loss = seq_loss / tokens_per_seq.clamp(min=1.0)
    has_tokens = (tokens_per_seq > 0).to(seq_loss.dtype)
    return (seq_loss * has_tokens).sum() / (has_tokens.sum().clamp(min=1.0) if normalizer is None else normalizer)


def _check_settings(alpha, distillation_topk, full_logit_distillation, is_clip, loss_agg_mode) -> None:
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of {LOSS_AGG_MODES}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1]")
    if not full_logit_distillation and alpha != 1.0:
        raise ValueError(f"alpha={alpha!r} must be 1.0 when full_logit_distillation=False (only reverse KL)")
    if distillation_topk is not None and (not isinstance(distillation_topk, int) or distillation_topk < 1):
        raise ValueError(f"distillation_topk={distillation_topk!r} must be None (full vocabulary) or an int >= 1")
    if is_clip is not None and not is_clip > 0:
        raise ValueError(f"is_clip={is_clip!r} must be None (no importance sampling) or > 0")


def _check_token_shapes(batch_shape: tuple[int, ...], source: str, **others: torch.Tensor | None) -> None:
    """``self_distillation_mask`` must be ``[B]``, every other tensor ``[B, T] = batch_shape`` (from ``source``)."""
    for name, tensor in others.items():
        expected = batch_shape[:1] if name == "self_distillation_mask" else batch_shape
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != {expected} expected from {source}")


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **others: torch.Tensor | None) -> None:
    """student/teacher logits ``[B, T, V]``; ``self_distillation_mask`` ``[B]``; every other tensor ``[B, T]``."""
    shape = tuple(student_logits.shape)
    if len(shape) != 3:
        raise ValueError(f"student_logits shape {shape} must be [B, T, V]")
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {shape}")
    _check_token_shapes(shape[:2], f"student_logits {shape}", **others)


def _check_hidden_shapes(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: tuple[torch.Tensor, ...],
    teacher_weight: tuple[torch.Tensor, ...],
    **others: torch.Tensor | None,
) -> None:
    """Hidden states ``[B, T, H_i]`` with head weights ``[V, H_i]``; the other tensors as in :func:`_check_shapes`."""
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
    _check_token_shapes(shape[:2], f"student_hidden {shape}", **others)


def _loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the loss is computed in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _distillation_mask(
    completion_mask: torch.Tensor, self_distillation_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``completion_mask * self_distillation_mask[:, None]``: ``[B, T]``, 1 where a token is distilled."""
    mask = completion_mask.to(dtype)
    if self_distillation_mask is not None:
        mask = mask * self_distillation_mask.to(dtype).unsqueeze(1)
    return mask


def per_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    old_per_token_logps: torch.Tensor | None = None,
    per_token_weight: torch.Tensor | None = None,
    *,
    alpha: float,
    distillation_topk: int | None,
    distillation_add_tail: bool,
    full_logit_distillation: bool,
    is_clip: float | None,
    log_probs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``l_t = D_t * rho_t * w_t`` at every position: logits ``[..., V]``, the other tensors ``[...]`` -> ``[...]``.

    ``D_t`` is :func:`per_token_divergence`, ``rho_t`` :func:`importance_weight` (1 when ``is_clip`` or
    ``old_per_token_logps`` is None) and ``w_t`` the ``per_token_weight`` (1 when None). In full-logit mode the
    :func:`log_softmax_pair` (``log_probs``, computed here when None) serves both ``D_t`` and ``rho_t``.
    """
    if full_logit_distillation and log_probs is None:
        log_probs = log_softmax_pair(student_logits, teacher_logits)
    loss = per_token_divergence(
        student_logits,
        teacher_logits,
        completion_ids,
        alpha=alpha,
        distillation_topk=distillation_topk,
        distillation_add_tail=distillation_add_tail,
        full_logit_distillation=full_logit_distillation,
        log_probs=log_probs,
    )
    if is_clip is not None and old_per_token_logps is not None:
        student_logps = (
            sampled_token_logps(student_logits, completion_ids)
            if log_probs is None
            else log_probs[0].gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        )
        loss = loss * importance_weight(student_logps, old_per_token_logps, is_clip)
    if per_token_weight is not None:
        loss = loss * per_token_weight
    return loss


def self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    self_distillation_mask: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    alpha: float,
    distillation_topk: int | None,
    distillation_add_tail: bool,
    full_logit_distillation: bool,
    is_clip: float | None,
    loss_agg_mode: str,
    per_token_weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """SDPO loss ``aggregate(D_t * rho_t * w_t, completion_mask * self_distillation_mask[:, None])``: a scalar.

    Args:
        student_logits: ``[B, T, V]`` temperature-scaled student logits at the completion positions.
        teacher_logits: ``[B, T, V]`` temperature-scaled teacher logits; never receives a gradient.
        completion_ids: ``[B, T]`` sampled tokens ``y_t``.
        completion_mask: ``[B, T]`` 1 for completion tokens, 0 for padding (any dtype).
        self_distillation_mask: ``[B]`` 1 for completions with a teacher signal; None means all ones.
        old_per_token_logps: ``[B, T]`` ``log pi_old(y_t)`` of the rollout policy; None means on-policy (``rho = 1``).
        alpha, distillation_topk, distillation_add_tail, full_logit_distillation: see :func:`per_token_divergence`.
        is_clip: cap of the IS ratio :func:`importance_weight`; None disables importance sampling.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`, see :func:`aggregate`.
        per_token_weight: ``[B, T]`` extra factor ``w_t`` (e.g. vLLM's importance_sampling_ratio); None means 1.
        normalizer: replaces the local token/sequence count in the mean, see :func:`aggregate`.

    Computed in at least float32 (half-precision inputs are upcast); the result has that dtype (float32 unless an
    input is float64).
    """
    _check_settings(alpha, distillation_topk, full_logit_distillation, is_clip, loss_agg_mode)
    _check_shapes(
        student_logits,
        teacher_logits,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        self_distillation_mask=self_distillation_mask,
        old_per_token_logps=old_per_token_logps,
        per_token_weight=per_token_weight,
    )
    dtype = _loss_dtype(student_logits, teacher_logits)
    mask = _distillation_mask(completion_mask, self_distillation_mask, dtype)
    # Padding positions may hold arbitrary, even non-finite, values: aggregate() drops whatever the math makes of them
    # in the forward pass and this where() zeroes the student's gradient there in backward, where 0 * inf is NaN.
    active = mask > 0
    student = torch.where(active.unsqueeze(-1), student_logits.to(dtype), 0.0)
    completion_ids = torch.where(active, completion_ids, 0)  # padding ids need only be valid indices

    per_token = per_token_loss(
        student,
        teacher_logits.to(dtype),
        completion_ids,
        None if old_per_token_logps is None else old_per_token_logps.to(dtype),
        None if per_token_weight is None else per_token_weight.to(dtype),
        alpha=alpha,
        distillation_topk=distillation_topk,
        distillation_add_tail=distillation_add_tail,
        full_logit_distillation=full_logit_distillation,
        is_clip=is_clip,
    )
    return aggregate(per_token, mask, loss_agg_mode, normalizer)


@dataclass(frozen=True)
class _DistilledTokens:
    """What the loss needs of the ``N`` distilled tokens besides the student's hidden states: ``[N, ...]`` each."""

    teacher_hidden: tuple[torch.Tensor, ...]  # each [N, H_i]
    completion_ids: torch.Tensor
    old_per_token_logps: torch.Tensor | None
    per_token_weight: torch.Tensor | None
    loss_weight: torch.Tensor  # c_t: the weight of each token's loss in the aggregated loss

    def rows(self, rows: slice) -> _DistilledTokens:
        return _DistilledTokens(
            tuple(h[rows] for h in self.teacher_hidden),
            self.completion_ids[rows],
            None if self.old_per_token_logps is None else self.old_per_token_logps[rows],
            None if self.per_token_weight is None else self.per_token_weight[rows],
            self.loss_weight[rows],
        )


@dataclass(frozen=True)
class _ChunkSettings:
    teacher_weight: tuple[torch.Tensor, ...]  # each [V, H_i]
    temperature: float
    chunk_size: int
    dtype: torch.dtype  # of the logits and the loss
    return_entropy: bool
    grad_enabled: bool
    loss_options: dict  # alpha, distillation_topk, ...: the keyword arguments of per_token_loss()


@dataclass(frozen=True)
class _ChunkBuffers:
    """``[chunk, V]`` logits every chunk reuses: a fresh block that large is mapped and page-faulted each time."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor

    @classmethod
    def allocate(cls, rows: int, vocab_size: int, like: torch.Tensor, dtype: torch.dtype) -> _ChunkBuffers:
        return cls(*(like.new_empty(rows, vocab_size, dtype=dtype) for _ in range(2)))

    def rows(self, count: int) -> _ChunkBuffers:
        return _ChunkBuffers(self.student_logits[:count], self.teacher_logits[:count])


def _project(hidden: Sequence[torch.Tensor], weight: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """``out = sum_i hidden_i @ weight_i.T``, returned; each product runs in its weight's dtype, as the head would."""
    for i, (h, w) in enumerate(zip(hidden, weight, strict=True)):
        h = h.to(w.dtype)
        if w.dtype != out.dtype:
            product = h @ w.T
            out.copy_(product) if i == 0 else out.add_(product)
        elif i == 0:
            torch.mm(h, w.T, out=out)
        else:
            out.addmm_(h, w.T)
    return out


def _aggregation_weights(mask: torch.Tensor, loss_agg_mode: str, normalizer: torch.Tensor | float | None):
    """``c = d aggregate / d l``: ``[B, T]``, the weight of each token's loss in the loss (aggregate() is linear)."""
    return torch.func.grad(lambda losses: aggregate(losses, mask, loss_agg_mode, normalizer))(torch.zeros_like(mask))


class _ChunkedHeadLoss(torch.autograd.Function):
    """``sum_t c_t l_t`` over ``N`` tokens whose student logits are ``hidden @ weight.T``, projected chunk by chunk.

    The loss is linear in the per-token losses, so a chunk's gradient w.r.t. the student's hidden states and head
    weight is final as soon as the chunk is done: it is computed in the forward pass and only scaled in backward. No
    logits are kept and none is projected twice; the weight's gradient is accumulated in place (float32 or wider).
    Returns the loss and the ``[N]`` student and teacher entropies (None without ``return_entropy``).
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens: _DistilledTokens, settings: _ChunkSettings):
        wants_hidden_grad = settings.grad_enabled and ctx.needs_input_grad[0]
        wants_weight_grad = settings.grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden_grad else None
        grad_weight = torch.zeros_like(weight, dtype=_loss_dtype(weight)) if wants_weight_grad else None
        loss = hidden.new_zeros((), dtype=settings.dtype)
        no_tokens = hidden.new_zeros(0, dtype=torch.float32)
        entropies = [(no_tokens, no_tokens)]  # (student, teacher) per chunk
        buffers = _ChunkBuffers.allocate(
            min(settings.chunk_size, hidden.shape[0]), weight.shape[0], hidden, settings.dtype
        )
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
            )
            loss += chunk_loss
            entropies += chunk_entropies
        ctx.gradients = (grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        if not settings.return_entropy:
            return loss, None, None
        student_entropy, teacher_entropy = (torch.cat(side) for side in zip(*entropies, strict=True))
        ctx.mark_non_differentiable(student_entropy, teacher_entropy)
        return loss, student_entropy, teacher_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_entropy_grads):
        grad_hidden, grad_weight = ctx.gradients
        del ctx.gradients  # scaled in place below: a second backward must fail, not scale them again
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in place (skipped at temperature 1: it is a full pass over ``[chunk, V]``)."""
    return logits if temperature == 1.0 else logits.div_(temperature)


def _chunk_step(
    hidden, weight, chunk: _DistilledTokens, settings: _ChunkSettings, buffers: _ChunkBuffers, grad_hidden, grad_weight
):
    """One chunk: its ``sum_t c_t l_t`` and ``[n]`` (student, teacher) entropies in a list (empty if not wanted).

    Adds the chunk's gradients into ``grad_hidden`` (its rows) and ``grad_weight`` when they are given. Every other
    ``[n, V]`` tensor lives only in here, so none is alive when the next chunk's are allocated.
    """
    # The leaf is the tempered logits: its gradient over the temperature is the projection's.
    student_logits = _tempered(_project([hidden], [weight], buffers.student_logits), settings.temperature)
    teacher_logits = _project(chunk.teacher_hidden, settings.teacher_weight, buffers.teacher_logits)
    teacher_logits = _tempered(teacher_logits, settings.temperature)
    wants_grad = grad_hidden is not None or grad_weight is not None
    with torch.enable_grad():
        student_logits.requires_grad_(wants_grad)
        log_probs = (
            log_softmax_pair(student_logits, teacher_logits)
            if settings.loss_options["full_logit_distillation"]
            else None
        )
        per_token = per_token_loss(
            student_logits,
            teacher_logits,
            chunk.completion_ids,
            chunk.old_per_token_logps,
            chunk.per_token_weight,
            log_probs=log_probs,
            **settings.loss_options,
        )
        chunk_loss = (chunk.loss_weight * per_token).sum()
    entropies = _entropies(student_logits, teacher_logits, log_probs) if settings.return_entropy else []
    del log_probs  # the backward below needs the student's only: free the teacher's first
    if wants_grad:
        (grad_logits,) = torch.autograd.grad(chunk_loss, student_logits)
        grad_logits = _tempered(grad_logits, settings.temperature)
        if grad_hidden is not None:
            grad_hidden.copy_(grad_logits.to(weight.dtype) @ weight)
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.T.to(grad_weight.dtype), hidden.to(grad_weight.dtype))
    return chunk_loss.detach(), entropies


def _entropies(student_logits, teacher_logits, log_probs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(student entropy, teacher entropy)]``, once the chunk's loss is computed.

    From the log-probabilities when the loss computed them; the teacher's logits are then no longer needed, and
    their buffer is the scratch.
    """
    if log_probs is None:
        return [(token_entropy(student_logits), token_entropy(teacher_logits))]
    student, teacher = (log_prob_entropy(side, scratch=teacher_logits).float() for side in log_probs)
    return [(student, teacher)]


def default_chunk_size(vocab_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: as many as keep one ``[chunk, vocab_size]`` tensor of ``dtype`` under ``CHUNK_BYTES``."""
    return max(1, (CHUNK_BYTES - 1) // (vocab_size * dtype.itemsize))


def _as_tuple(tensors: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)


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
    temperature: float = 1.0,
    alpha: float,
    distillation_topk: int | None,
    distillation_add_tail: bool,
    full_logit_distillation: bool,
    is_clip: float | None,
    loss_agg_mode: str,
    per_token_weight: torch.Tensor | None = None,
    normalizer: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`self_distillation_loss` of the logits ``hidden @ weight.T / temperature``, without ``[B, T, V]`` logits.

    Only the distilled tokens (``completion_mask * self_distillation_mask``) are projected, ``chunk_size`` at a time,
    so the peak memory beyond the inputs is the head weight's gradient plus O(``chunk_size * V``). The logits are
    projected in the head weight's dtype and the loss computed in at least float32.

    Args:
        student_hidden: ``[B, T, H]`` the student's final hidden states at the completion positions.
        student_lm_head_weight: ``[V, H]`` the student's output head, a linear layer without bias. Both receive
            gradients.
        teacher_hidden, teacher_lm_head_weight: ``[B, T, H]`` and ``[V, H]``, or sequences of such pairs whose
            products add up to the teacher's logits (the trust-region teacher mixes two models' logits this way).
            They never receive a gradient.
        temperature: the sampling temperature the logits are divided by.
        chunk_size: tokens projected at a time; any value gives the same loss. None: :func:`default_chunk_size`.
        return_entropy: also return the ``[B, T]`` entropies of the student's and the teacher's next-token
            distributions (nats, no gradient, 0 where no token is distilled), which cost one more pass per chunk.
        The other arguments are those of :func:`self_distillation_loss`.

    Returns:
        The loss, or ``(loss, student_entropy, teacher_entropy)`` with ``return_entropy``.
    """
    _check_settings(alpha, distillation_topk, full_logit_distillation, is_clip, loss_agg_mode)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size={chunk_size!r} must be None or an int >= 1")
    teacher_hidden, teacher_weight = _as_tuple(teacher_hidden), _as_tuple(teacher_lm_head_weight)
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
    )
    dtype = _loss_dtype(student_hidden, student_lm_head_weight, *teacher_hidden, *teacher_weight)
    mask = _distillation_mask(completion_mask, self_distillation_mask, dtype)
    active = mask > 0
    tokens = _DistilledTokens(
        teacher_hidden=tuple(h.detach()[active] for h in teacher_hidden),
        completion_ids=completion_ids[active],
        old_per_token_logps=None if old_per_token_logps is None else old_per_token_logps[active].to(dtype),
        per_token_weight=None if per_token_weight is None else per_token_weight[active].to(dtype),
        loss_weight=_aggregation_weights(mask, loss_agg_mode, normalizer)[active],
    )
    settings = _ChunkSettings(
        teacher_weight=tuple(w.detach() for w in teacher_weight),
        temperature=temperature,
        chunk_size=chunk_size or default_chunk_size(student_lm_head_weight.shape[0], dtype),
        dtype=dtype,
        return_entropy=return_entropy,
        grad_enabled=torch.is_grad_enabled(),
        loss_options=dict(
            alpha=alpha,
            distillation_topk=distillation_topk,
            distillation_add_tail=distillation_add_tail,
            full_logit_distillation=full_logit_distillation,
            is_clip=is_clip,
        ),
    )
    with torch.autocast(student_hidden.device.type, enabled=False):  # the dtypes above hold under autocast too
        loss, student_entropy, teacher_entropy = _ChunkedHeadLoss.apply(
            student_hidden[active], student_lm_head_weight, tokens, settings
        )
    if not return_entropy:
        return loss
    return loss, _scatter(student_entropy, active), _scatter(teacher_entropy, active)
