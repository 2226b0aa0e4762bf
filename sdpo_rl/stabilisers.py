"""Pure pieces of the stabilised SDPO variants (docs/how-it-works.md §7), from plain values and tensors.

- Sample routing (SRPO, Li et al., arXiv:2604.02288): which completions are distilled and which get GRPO's loss.
- Teacher-entropy weights (SRPO's DW-SDPO): distilled tokens where the teacher is unsure count less.
- Pass-rate weights (SC-SDPO, Liu et al., arXiv:2605.27765): prompts the model half-solves count most.

Notation: c_i = 1 when completion i's total reward reaches the success threshold (NaN never does), m_i = 1 when it has
a teacher signal (a demonstration or feedback).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .forward import HeadInputs
from .loss.chunked import project_logits


def _successes(rewards: Sequence[float], threshold: float) -> list[bool]:
    return [float(r) >= threshold for r in rewards]  # NaN compares False: never a success


def routed_to_distillation(rewards: Sequence[float], has_signal: Sequence[bool], threshold: float) -> list[bool]:
    """z^SD_i = (1 - c_i) m_i: a failed completion with a teacher signal is distilled, and only distilled.

    Every other completion (a success, or a failure without any signal) gets GRPO's loss: z^PG_i = 1 - z^SD_i.
    """
    if len(rewards) != len(has_signal):
        raise ValueError(f"rewards ({len(rewards)}) and has_signal ({len(has_signal)}) must have one entry each")
    return [signal and not success for success, signal in zip(_successes(rewards, threshold), has_signal, strict=True)]


def group_pass_rates(rewards: Sequence[float], num_generations: int, threshold: float) -> list[float]:
    """p̂ per completion: the fraction of its group's `num_generations` completions that succeeded."""
    if num_generations < 1 or len(rewards) % num_generations:
        raise ValueError(
            f"the number of rewards ({len(rewards)}) must be a positive multiple of num_generations ({num_generations})"
        )
    successes = _successes(rewards, threshold)
    rates = []
    for start in range(0, len(successes), num_generations):
        rate = sum(successes[start : start + num_generations]) / num_generations
        rates.extend([rate] * num_generations)
    return rates


def pass_rate_weights(
    rewards: Sequence[float], distilled: Sequence[bool], num_generations: int, threshold: float
) -> list[float]:
    """sqrt(p̂ (1 - p̂)) per completion, normalised to mean 1 over the distilled completions; 0 for the others.

    A group that all succeeded or all failed weighs 0 (p̂ is 0 or 1). When no distilled completion has a positive
    weight, every weight is 0: there is nothing this weighting would distil.
    """
    raw = [
        math.sqrt(p * (1.0 - p)) if d else 0.0
        for p, d in zip(group_pass_rates(rewards, num_generations, threshold), distilled, strict=True)
    ]
    count = sum(distilled)
    total = sum(raw)
    if total == 0.0:
        return [0.0] * len(raw)
    return [w * count / total for w in raw]


def entropy_weights(entropy: torch.Tensor, beta: float) -> torch.Tensor:
    """exp(-beta H) per token, before normalisation: ``[...] -> [...]``, without gradient."""
    return torch.exp(-beta * entropy.detach())


def normalise_to_mean_one(values: torch.Tensor, mask: torch.Tensor, total: torch.Tensor, count: torch.Tensor):
    """``values / (total / count)`` where ``mask`` is set, 0 elsewhere (``[B, T]``).

    ``total`` and ``count`` are the sum of ``values`` over the masked positions and their number, over the whole
    generation batch (every process), so that the weights have mean 1 there. All zeros when ``total`` is 0.
    """
    if total <= 0:
        return torch.zeros_like(values)
    return torch.where(mask > 0, values * (count / total), 0.0)


def head_entropy(terms: HeadInputs, temperature: float, chunk_size: int, softcap: float | None = None) -> torch.Tensor:
    """Entropy (nats) per token of ``softmax(logits / temperature)``, without gradient, the logits given as
    `HeadInputs` terms of ``[N, H_i]`` hidden states (soft-capped by `softcap`, as in `project_logits`) -> ``[N]``;
    ``chunk_size`` tokens are projected at a time, in float32 or wider."""
    hidden, weight = terms.hidden, terms.weight
    dtype = torch.promote_types(weight[0].dtype, torch.float32)
    entropies = []
    with torch.no_grad():
        for start in range(0, hidden[0].shape[0], chunk_size):
            rows = [h[start : start + chunk_size] for h in hidden]
            logits = rows[0].new_empty(rows[0].shape[0], weight[0].shape[0], dtype=dtype)
            project_logits(rows, weight, logits, terms.coefficients, softcap)
            log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
            entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(entropies) if entropies else hidden[0].new_zeros(0, dtype=torch.float32)
