"""The SDPO self-distillation loss from logits (docs/how-it-works.md section 4). Pure tensor math, no model code.

Notation: ``B`` completions, ``T`` completion tokens, ``V`` vocabulary size. Logits arrive already divided by the
sampling temperature. ``s = log_softmax(student_logits)``, ``q = log_softmax(teacher_logits)`` and
``KL(a || b) = sum_v e^a_v (a_v - b_v)`` over the distillation support.

:func:`self_distillation_loss` computes the loss from ``[B, T, V]`` logits; :func:`per_token_loss` is the per-token
math it shares with the chunked twin in :mod:`sdpo_rl.loss.chunked`, which never materialises those logits. Both take
the loss's settings as one validated :class:`LossSettings`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# The tail bucket's log-mass is capped below 0 so that log(1 - mass) stays finite when the top K hold all the mass.
_MAX_TOPK_LOG_MASS = -1e-7
# Bounds on the IS log-ratio before exp, as in the reference, so that a stale old logp cannot overflow.
_MAX_ABS_IS_LOG_RATIO = 20.0


@dataclass(frozen=True)
class LossSettings:
    """The settings of the distillation loss, validated when built (``SDPOConfig.loss_settings()`` builds them).

    Attributes:
        alpha: divergence interpolation in [0, 1], see :func:`divergence`; must be 1 without full-logit distillation.
        distillation_topk: K >= 1 (student's top-K support) or None (full vocabulary), see :func:`per_token_divergence`.
        distillation_add_tail: with top-K, add a tail bucket (True) or renormalise over the K (False).
        full_logit_distillation: distil the distribution (True) or only the sampled token (False).
        is_clip: cap > 0 of the IS ratio (:func:`importance_weight`); None disables importance sampling.
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`, see :func:`aggregate`.
    """

    alpha: float
    distillation_topk: int | None
    distillation_add_tail: bool
    full_logit_distillation: bool
    is_clip: float | None
    loss_agg_mode: str

    def __post_init__(self) -> None:
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            _reject("loss_agg_mode", self.loss_agg_mode, f"one of {LOSS_AGG_MODES}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            _reject("alpha", self.alpha, "a number in [0, 1]")
        if not self.full_logit_distillation and self.alpha != 1.0:
            _reject("alpha", self.alpha, "1.0 when full_logit_distillation=False (only reverse KL)")
        topk = self.distillation_topk
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            _reject("distillation_topk", topk, "None (full vocabulary) or an int >= 1")
        for name in ("distillation_add_tail", "full_logit_distillation"):
            if not isinstance(getattr(self, name), bool):
                _reject(name, getattr(self, name), "True or False")
        clip = self.is_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            _reject("is_clip", clip, "None (no importance sampling) or a number > 0")


def _reject(name: str, value, allowed: str) -> None:
    raise ValueError(f"LossSettings.{name}={value!r} is invalid: expected {allowed}.")


def sampled_token_logps(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[y_t]``: logits ``[B, T, V]``, token_ids ``[B, T]`` -> ``[B, T]``.

    Computed as ``z[y] - logsumexp(z)`` so that no ``[B, T, V]`` log-softmax has to be kept for backward.
    """
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each next-token distribution, without gradient: logits ``[B, T, V]`` -> ``[B, T]`` (nats)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -log_probs.exp().mul_(log_probs).sum(-1)


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


def support_indices(
    student_logits: torch.Tensor, completion_ids: torch.Tensor, settings: LossSettings
) -> torch.Tensor | None:
    """Where the loss reads both models' log-probabilities: logits ``[..., V]``, ids ``[...]`` -> ``[..., N]`` or None.

    The student's top-K tokens (``N = K``, clamped to ``V``), the sampled token in sampled-token mode (``N = 1``), or
    None for the full vocabulary.
    """
    if not settings.full_logit_distillation:
        return completion_ids.unsqueeze(-1)
    if settings.distillation_topk is None:
        return None
    k = min(settings.distillation_topk, student_logits.shape[-1])
    return student_logits.detach().topk(k, dim=-1).indices


def support_divergence(s: torch.Tensor, q: torch.Tensor, settings: LossSettings) -> torch.Tensor:
    """``D_t`` from both models' log-probabilities on the support (:func:`support_indices`): ``[..., N] -> [...]``.

    Full-logit mode: ``divergence(s, q, alpha)``; with top-K, ``s`` and ``q`` are first extended by a tail bucket
    (``distillation_add_tail``) or renormalised over the K entries. Sampled-token mode (``N = 1``):
    ``D_t = sg(log pi_S(y_t) - log pi_T(y_t)) * log pi_S(y_t)``, a surrogate whose gradient is the sampled-token
    estimate of the reverse KL's gradient.
    """
    if not settings.full_logit_distillation:
        s, q = s.squeeze(-1), q.squeeze(-1)
        return (s - q).detach() * s
    if settings.distillation_topk is not None:
        support = _add_tail if settings.distillation_add_tail else _renormalise
        s, q = support(s), support(q)
    return divergence(s, q, settings.alpha)


def support_loss(
    s: torch.Tensor,
    q: torch.Tensor,
    student_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor | None,
    per_token_weight: torch.Tensor | None,
    settings: LossSettings,
) -> torch.Tensor:
    """``l_t = D_t * rho_t * w_t`` from log-probabilities on the support: ``s``, ``q`` ``[..., N]`` -> ``[...]``.

    ``D_t`` is :func:`support_divergence`, ``rho_t`` :func:`importance_weight` of ``student_logps = log pi_S(y_t)``
    (1 when ``settings.is_clip`` or ``old_per_token_logps`` is None) and ``w_t`` the ``per_token_weight`` (1 when
    None); all three ``[...]``.
    """
    loss = support_divergence(s, q, settings)
    if settings.is_clip is not None and old_per_token_logps is not None:
        loss = loss * importance_weight(student_logps, old_per_token_logps, settings.is_clip)
    if per_token_weight is not None:
        loss = loss * per_token_weight
    return loss


def _on_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, completion_ids: torch.Tensor, settings: LossSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s, q, log pi_S(y_t))``: both models' log-probabilities on the support ``[..., N]``, the sampled token's
    ``[...]``. The teacher is detached and read at the student's indices, normalised over its full vocabulary."""
    teacher_logits = teacher_logits.detach()
    if not settings.full_logit_distillation:  # no [..., V] log-softmax to keep for backward
        student_logps = sampled_token_logps(student_logits, completion_ids)
        return (
            student_logps.unsqueeze(-1),
            sampled_token_logps(teacher_logits, completion_ids).unsqueeze(-1),
            student_logps,
        )
    s, q = torch.log_softmax(student_logits, dim=-1), torch.log_softmax(teacher_logits, dim=-1)
    student_logps = s.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    indices = support_indices(student_logits, completion_ids, settings)
    if indices is not None:
        s, q = s.gather(-1, indices), q.gather(-1, indices)
    return s, q, student_logps


def per_token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, completion_ids: torch.Tensor, *, settings: LossSettings
) -> torch.Tensor:
    """Per-token distillation term ``D_t`` before importance sampling and masking: ``[B, T, V] -> [B, T]``.

    student_logits, teacher_logits: ``[B, T, V]`` (the teacher is detached here); completion_ids: ``[B, T]``.
    :func:`support_divergence` of the log-probabilities ``s = log_softmax(student_logits)``,
    ``q = log_softmax(teacher_logits)`` on the :func:`support_indices`.
    """
    s, q, _ = _on_support(student_logits, teacher_logits, completion_ids, settings)
    return support_divergence(s, q, settings)


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


def check_token_shapes(batch_shape: tuple[int, ...], source: str, **others: torch.Tensor | None) -> None:
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
    check_token_shapes(shape[:2], f"student_logits {shape}", **others)


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the loss is computed in: the inputs' promoted dtype, at least float32."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def distillation_mask(
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
    settings: LossSettings,
) -> torch.Tensor:
    """``l_t = D_t * rho_t * w_t`` at every position: logits ``[..., V]``, the other tensors ``[...]`` -> ``[...]``.

    :func:`support_loss` of the log-probabilities on the :func:`support_indices`; one log-softmax of each model
    serves both ``D_t`` and the IS ratio ``rho_t``.
    """
    s, q, student_logps = _on_support(student_logits, teacher_logits, completion_ids, settings)
    return support_loss(s, q, student_logps, old_per_token_logps, per_token_weight, settings)


def self_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    self_distillation_mask: torch.Tensor | None = None,
    old_per_token_logps: torch.Tensor | None = None,
    *,
    settings: LossSettings,
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
        settings: divergence, support, IS clip and aggregation, see :class:`LossSettings`.
        per_token_weight: ``[B, T]`` extra factor ``w_t`` (e.g. vLLM's importance_sampling_ratio); None means 1.
        normalizer: replaces the local token/sequence count in the mean, see :func:`aggregate`.

    Computed in at least float32 (half-precision inputs are upcast); the result has that dtype (float32 unless an
    input is float64).
    """
    _check_shapes(
        student_logits,
        teacher_logits,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        self_distillation_mask=self_distillation_mask,
        old_per_token_logps=old_per_token_logps,
        per_token_weight=per_token_weight,
    )
    dtype = loss_dtype(student_logits, teacher_logits)
    mask = distillation_mask(completion_mask, self_distillation_mask, dtype)
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
        settings=settings,
    )
    return aggregate(per_token, mask, settings.loss_agg_mode, normalizer)
