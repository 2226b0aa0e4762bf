"""The SDPO self-distillation loss (docs: SDPO.md section 3). Pure tensor math, no model or trainer code.

Notation: ``B`` completions, ``T`` completion tokens, ``V`` vocabulary size. Logits arrive already divided by the
sampling temperature. ``s = log_softmax(student_logits)``, ``q = log_softmax(teacher_logits)`` and
``KL(a || b) = sum_v e^a_v (a_v - b_v)`` over the distillation support.
"""

from __future__ import annotations

import math

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# The tail bucket's log-mass is capped below 0 so that log(1 - mass) stays finite when the top K hold all the mass.
_MAX_TOPK_LOG_MASS = -1e-7
# Bounds on the IS log-ratio before exp, as in the reference, so that a stale old logp cannot overflow.
_MAX_ABS_IS_LOG_RATIO = 20.0


def sampled_token_logps(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[y_t]``: logits ``[B, T, V]``, token_ids ``[B, T]`` -> ``[B, T]``.

    Computed as ``z[y] - logsumexp(z)`` so that no ``[B, T, V]`` log-softmax has to be kept for backward.
    """
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, without gradient: logits ``[B, T, V]`` -> ``[B, T]`` (nats)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


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
) -> torch.Tensor:
    """Per-token distillation term ``D_t`` before importance sampling and masking: ``[B, T, V] -> [B, T]``.

    student_logits, teacher_logits: ``[B, T, V]`` (the teacher is detached here); completion_ids: ``[B, T]``.

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

    s = torch.log_softmax(student_logits, dim=-1)
    q = torch.log_softmax(teacher_logits, dim=-1)
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


def _check_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor, **others: torch.Tensor | None) -> None:
    """student/teacher logits ``[B, T, V]``; ``self_distillation_mask`` ``[B]``; every other tensor ``[B, T]``."""
    shape = tuple(student_logits.shape)
    if len(shape) != 3:
        raise ValueError(f"student_logits shape {shape} must be [B, T, V]")
    if tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {shape}")
    for name, tensor in others.items():
        expected = shape[:1] if name == "self_distillation_mask" else shape[:2]
        if tensor is not None and tuple(tensor.shape) != expected:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != {expected} expected from student_logits {shape}")


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
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    mask = completion_mask.to(dtype)
    if self_distillation_mask is not None:
        mask = mask * self_distillation_mask.to(dtype).unsqueeze(1)
    # Padding positions may hold arbitrary, even non-finite, values: aggregate() drops whatever the math makes of them
    # in the forward pass and this where() zeroes the student's gradient there in backward, where 0 * inf is NaN.
    active = mask > 0
    student = torch.where(active.unsqueeze(-1), student_logits.to(dtype), 0.0)
    completion_ids = torch.where(active, completion_ids, 0)  # padding ids need only be valid indices

    per_token_loss = per_token_divergence(
        student,
        teacher_logits.to(dtype),
        completion_ids,
        alpha=alpha,
        distillation_topk=distillation_topk,
        distillation_add_tail=distillation_add_tail,
        full_logit_distillation=full_logit_distillation,
    )
    if is_clip is not None and old_per_token_logps is not None:
        student_logps = sampled_token_logps(student, completion_ids)
        per_token_loss = per_token_loss * importance_weight(student_logps, old_per_token_logps.to(dtype), is_clip)
    if per_token_weight is not None:
        per_token_loss = per_token_loss * per_token_weight.to(dtype)
    return aggregate(per_token_loss, mask, loss_agg_mode, normalizer)
