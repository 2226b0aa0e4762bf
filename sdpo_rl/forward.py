"""Model forwards that return what the loss needs at the completion positions: logits, or final hidden states.

The student's forward (with gradient) and every teacher's (without) go through these helpers, so that both score
exactly the same positions. For a model whose logits are a plain linear projection of its final hidden states
(`linear_head`), `completion_hidden` returns those hidden states instead, and the loss projects them a chunk of tokens
at a time (`sdpo_rl.loss.chunked`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import get_layer_types_and_kwargs

from .sharding import is_sharded

# Config fields of models whose logits are a transform of the head's projection (soft-capping, scaling), as read by
# TRL's fused LM head.
_LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)
# Model types whose causal LM multiplies the head's output by a config field (True) or divides it by one (False),
# right after the head (read in their transformers 5.25 forwards). A scale is linear, so the loss from hidden states
# applies it exactly (`logit_scale`); the other families keep their logits (soft-capping: `_LOGIT_SOFTCAPS`).
_LOGIT_SCALES = {
    **dict.fromkeys(["cohere", "cohere2", "cohere2_moe"], ("logit_scale", True)),
    "falcon_h1": ("lm_head_multiplier", True),
    "hyperclovax": ("logits_scaling", True),
    **dict.fromkeys(
        ["granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "granitemoehybrid"],
        ("logits_scaling", False),
    ),
}

# Model types whose causal LM soft-caps the head's output, ``c * tanh(z / c)`` with ``c`` = the config's
# `final_logit_softcapping`, right after the head (read in their transformers 5.25 forwards). The loss from hidden
# states applies it term by term (`logit_softcap`, `sdpo_rl.loss.chunked`).
_LOGIT_SOFTCAPS = frozenset({"gemma2", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat"})

# The cache layers whose states at a position are keys and values computed from the tokens up to it, kept per position
# (transformers' `DynamicLayer` and `DynamicSlidingWindowLayer`): the only ones a shared prompt's cache may hold.
_SHAREABLE_CACHE_LAYERS = frozenset({"full_attention", "sliding_attention"})


def completion_logits(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
) -> torch.Tensor:
    """Logits `[B, logits_to_keep, V]` that predict the last `logits_to_keep` tokens of `input_ids: [B, L]`.

    The model returns the logits of the last `logits_to_keep + 1` positions; the last one predicts the token after
    the sequence and is dropped, so position t predicts `input_ids[:, L - logits_to_keep + t]`.
    """
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1, use_cache=False
    )
    return outputs.logits[:, :-1, :]


@dataclass(frozen=True)
class HeadInputs:
    """Logits given as ``sum_i coefficients[i] * f(hidden[i] @ weight[i].T)``: hidden states ``[B, T, H_i]``, head
    weights ``[V, H_i]``, where ``f`` is the models' own transform of their head's projection (`logit_scale`,
    `logit_softcap`), applied by the loss.

    One term for a model's own head; two for the trust-region teacher's mixture of two models' logits, more for the
    hindsight contrast. The coefficients stay apart from the hidden states because soft-capping is not linear.
    """

    hidden: tuple[torch.Tensor, ...]
    weight: tuple[torch.Tensor, ...]
    coefficients: tuple[float, ...] | None = None  # one per term; None: all 1

    def __post_init__(self):
        if self.coefficients is not None and len(self.coefficients) != len(self.hidden):
            raise ValueError(f"{len(self.coefficients)} coefficients for {len(self.hidden)} terms")

    def scaled(self, factor: float) -> HeadInputs:
        """These terms with every coefficient multiplied by `factor`."""
        return HeadInputs(self.hidden, self.weight, tuple(factor * c for c in self.term_coefficients))

    @property
    def term_coefficients(self) -> tuple[float, ...]:
        return (1.0,) * len(self.hidden) if self.coefficients is None else self.coefficients

    def __add__(self, other: HeadInputs) -> HeadInputs:
        """The sum of two models' logits: the terms of both."""
        return HeadInputs(
            self.hidden + other.hidden, self.weight + other.weight, self.term_coefficients + other.term_coefficients
        )


def linear_head(model: nn.Module) -> nn.Linear | None:
    """The output head if `model`'s logits are exactly a bias-free `nn.Linear` of its final hidden states, times
    `logit_scale(model)` or soft-capped by `logit_softcap(model)`; else None.

    None as well for a head that is a subclass or wrapper (PEFT LoRA or `modules_to_save`, quantised layers), a
    sharded head weight (its full value exists only inside the model's forward), and models whose config otherwise
    transforms the projection (`_LOGIT_TRANSFORM_FIELDS`: soft-capping outside `_LOGIT_SOFTCAPS`, a scale outside
    `_LOGIT_SCALES`, a scale or a soft cap of 0).
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or is_sharded(head.weight):
        return None
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scaled_by, _ = _scaling(config)
    applied = {scaled_by, "final_logit_softcapping" if _soft_capped(config) else None}
    if any(_transforms(f, getattr(text_config, f, None)) for f in _LOGIT_TRANSFORM_FIELDS if f not in applied):
        return None
    return None if any(getattr(config, field, None) == 0 for field in applied if field) else head


def logit_scale(model: nn.Module) -> float:
    """The factor between `model`'s logits and its head's projection for the model types in `_LOGIT_SCALES` (e.g.
    Cohere's `logit_scale`, Granite's 1 / `logits_scaling`); 1.0 for every other model."""
    config = getattr(model, "config", None)
    field, multiplies = _scaling(config)
    value = None if field is None else getattr(config, field, None)
    if value is None:
        return 1.0
    return float(value) if multiplies else 1.0 / float(value)


def _transforms(field: str, value) -> bool:
    """Whether a `_LOGIT_TRANSFORM_FIELDS` value changes the logits (a soft cap of 1 does, a scale of 1 does not)."""
    return value is not None and (field == "final_logit_softcapping" or value != 1.0)


def logit_softcap(model: nn.Module) -> float | None:
    """The soft cap ``c`` of `model`'s logits, ``c * tanh(projection / c)``, for the model types in `_LOGIT_SOFTCAPS`
    (Gemma 2's `final_logit_softcapping`); None for every other model and where the config sets none."""
    config = getattr(model, "config", None)
    value = getattr(config, "final_logit_softcapping", None) if _soft_capped(config) else None
    return None if value is None else float(value)


def _soft_capped(config) -> bool:
    """Whether `config` is a text model type in `_LOGIT_SOFTCAPS`."""
    return _text_only(config) and getattr(config, "model_type", None) in _LOGIT_SOFTCAPS


def _text_only(config) -> bool:
    return config is not None and (not hasattr(config, "get_text_config") or config.get_text_config() is config)


def _scaling(config) -> tuple[str | None, bool]:
    """``(config field, whether it multiplies)`` of a text model type in `_LOGIT_SCALES`, else ``(None, True)``."""
    return _LOGIT_SCALES.get(getattr(config, "model_type", None), (None, True)) if _text_only(config) else (None, True)


def completion_hidden(
    model: nn.Module,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    share_prompts: bool = False,
) -> torch.Tensor:
    """Final hidden states ``[B, logits_to_keep, H]`` whose projection by `head` is `completion_logits`.

    Runs `model`'s own forward, so that its wrappers (DDP, PEFT, gradient checkpointing) still apply, with a pre-hook
    on `head` that keeps the head's input and hands it an empty slice instead: no position is projected. With
    `share_prompts`, rows whose prompts (the first ``L - logits_to_keep`` columns, ids and mask) are equal, as a
    group's G completions are, run their prompt once (`_shared_prompt_hidden`), where `prompt_sharing_blocker` finds
    nothing against it.
    """
    keyword = cache_keyword(model) if share_prompts and prompt_sharing_blocker(model) is None else None
    if keyword is not None:
        prompt_length = input_ids.size(1) - logits_to_keep
        groups = prompt_groups(input_ids[:, :prompt_length], attention_mask[:, :prompt_length])
        if groups is not None:
            return _shared_prompt_hidden(model, head, input_ids, attention_mask, logits_to_keep, groups, keyword)
    hidden, _ = _head_input(
        model,
        head,
        input_ids=input_ids,
        attention_mask=attention_mask,
        logits_to_keep=logits_to_keep + 1,
        use_cache=False,
    )
    return hidden[:, -(logits_to_keep + 1) : -1]


def _shared_prompt_hidden(
    model, head, input_ids, attention_mask, logits_to_keep: int, groups: PromptGroups, cache_keyword: str
):
    """`completion_hidden` of rows whose prompts are equal within each of `groups`: one forward of each group's
    prompt, whose key/value cache (the forward's `cache_keyword`) every row of the group then extends with its
    completion.

    Causal attention makes the prompt's states independent of what follows, so this is the same function as the full
    forward (the last bits may round differently), with the gradient of a shared prompt summed over its rows.
    """
    prompt_length = input_ids.size(1) - logits_to_keep
    last_prompt_hidden, outputs = _head_input(
        model,
        head,
        input_ids=input_ids[groups.first_row, :prompt_length],
        attention_mask=attention_mask[groups.first_row, :prompt_length],
        logits_to_keep=1,
        use_cache=True,
    )
    cache = returned_cache(model, outputs, cache_keyword)
    hidden = [last_prompt_hidden[groups.group]]  # the last prompt position predicts the first completion token
    if logits_to_keep > 1:
        cache.reorder_cache(groups.group)  # each row starts from its group's prompt states
        completion_states, _ = _head_input(
            model,
            head,
            input_ids=input_ids[:, prompt_length:-1],
            attention_mask=attention_mask[:, :-1],
            logits_to_keep=0,  # all positions
            use_cache=True,
            **{cache_keyword: cache},
        )
        hidden.append(completion_states)
    return torch.cat(hidden, dim=1)


@dataclass(frozen=True)
class PromptGroups:
    """Rows with equal prompts: each row's group index (`group`, ``[B]``) and each group's first row (``[G]``)."""

    group: torch.Tensor
    first_row: torch.Tensor


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PromptGroups | None:
    """The groups of rows whose prompt ids and mask (``[B, L]``) are equal, as a GRPO batch's G completions of one
    prompt are; None where every row's prompt is distinct, so that sharing would save nothing."""
    unique_prompts, group = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if unique_prompts.size(0) == prompt_ids.size(0):
        return None
    rows = torch.arange(group.size(0), device=group.device)
    first_row = group.new_full((unique_prompts.size(0),), group.size(0)).scatter_reduce(0, group, rows, "amin")
    return PromptGroups(group, first_row)


def cache_keyword(model: nn.Module) -> str | None:
    """The name under which `model`'s forward takes and returns its key/value cache (transformers renamed it); None
    where the forward declares neither, as a compiled or custom wrapper's ``**kwargs`` does."""
    parameters = forward_parameters(model)
    return next((keyword for keyword in ("cache", "past_key_values") if keyword in parameters), None)


def forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of the forward of `model`'s base model (under a PEFT wrapper, the wrapped model's)."""
    return inspect.signature(_base_model(model).forward).parameters


def _base_model(model: nn.Module) -> nn.Module:
    """`model`, or under a PEFT wrapper the wrapped model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_sharing_blocker(model: nn.Module) -> str | None:
    """Why `model`'s forwards cannot run a prompt once and extend its key/value cache with each row sharing it; None
    where they can (`completion_hidden`, `generation.generate_sharing_prompts`).

    An allow-list: every layer of the model's cache must be a full or sliding-window attention layer, whose cached keys
    and values are the full forward's. The layer types are read from the config as transformers' `DynamicCache`
    builds its layers. A recurrent, convolutional or linear-attention state (Mamba, LFM2's short convolutions, gated
    delta rules) is refused even where it would give the same values: reused, such states gave wrong gradients (Bamba,
    Jamba) or a backward that fails (Qwen3-Next) (docs/verification.md). A forward that declares no cache and a
    prompt-learning adapter, which brings a cache of its own, are refused too.
    """
    name = type(model).__name__
    if cache_keyword(model) is None:
        return f"the forward of {name} declares no key/value cache"
    if brings_own_cache(model):
        return f"{name}'s prompt-learning adapter brings a cache of its own"
    config = getattr(_base_model(model), "config", None)
    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except AttributeError:  # no config, or one that does not say what its layers are
        return f"the config of {name} does not say what its cache layers are"
    others = sorted(set(layer_types) - _SHAREABLE_CACHE_LAYERS)
    if others:
        return f"the cache of {name} has {', '.join(others)} layers, not only full or sliding-window attention"
    return None


def brings_own_cache(model: nn.Module) -> bool:
    """Whether `model` is a PEFT model whose active adapter learns prompts: it feeds its own key/value cache or
    virtual tokens, so a cache of shared prompts must not be handed to it."""
    return getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)


def returned_cache(model: nn.Module, outputs, keyword: str):
    """The key/value cache in `model`'s `outputs` of a forward with ``use_cache=True``."""
    cache = getattr(outputs, keyword, None)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no `{keyword}` for its prompts with use_cache=True.")
    return cache


def _head_input(model: nn.Module, head: nn.Module, **model_inputs) -> tuple[torch.Tensor, Any]:
    """``(the input of head, model's outputs)`` of one forward of `model` in which `head` projects no position."""
    inputs = []

    def keep_input(module, args):
        inputs.append(args[0])
        return (args[0][:, :0], *args[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        outputs = model(**model_inputs)
    finally:
        handle.remove()
    if len(inputs) != 1:
        raise RuntimeError(f"The output head ran {len(inputs)} times in one forward of {type(model).__name__}.")
    return inputs[0], outputs


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no dropout) and restore its previous mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def no_grad_logits(model: nn.Module, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
    """`completion_logits` of `model` in eval mode, without gradient."""
    with torch.no_grad(), eval_mode(model):
        return completion_logits(model, input_ids, attention_mask, logits_to_keep)


def no_grad_head_inputs(
    model: nn.Module, input_ids, attention_mask, logits_to_keep: int, share_prompts: bool = False
) -> HeadInputs:
    """`completion_hidden` of `model` in eval mode, without gradient, with its head's weight; `share_prompts` as
    there."""
    head = linear_head(model)
    if head is None:
        raise ValueError(f"The output head of {type(model).__name__} is not a plain linear layer: use its logits.")
    with torch.no_grad(), eval_mode(model):
        hidden = completion_hidden(model, head, input_ids, attention_mask, logits_to_keep, share_prompts)
    return HeadInputs((hidden,), (head.weight,))
