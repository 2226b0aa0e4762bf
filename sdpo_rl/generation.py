"""Sampling a GRPO batch with each distinct prompt prefilled once.

A GRPO batch repeats every prompt G times, and `generate` runs each copy through the model before sampling.
`prompts_prefilled_once` runs each distinct prompt once (all but its last token), copies its key/value cache to the
rows that share it, and lets `generate` go on from there: the same logits up to rounding, and the same random draws,
as the full prefill. The decoding steps are unchanged; on a CPU it made the learning benchmark's generation 9% shorter
(docs/results.md). Only models whose cache holds attention layers alone do it (`forward.prompt_sharing_blocker`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from transformers import GenerationConfig

from .forward import cache_keyword, forward_parameters, prompt_groups, prompt_sharing_blocker, returned_cache

_GENERATION_CONFIG_FIELDS = frozenset(GenerationConfig().to_dict())


@contextmanager
def prompts_prefilled_once(model: nn.Module) -> Iterator[None]:
    """While active, ``model.generate`` prefills each distinct prompt of its batch once (`generate_sharing_prompts`).

    It shadows the method with an attribute of this one `model` object and removes it on exit, restoring what was
    there before.
    """
    had_own = "generate" in vars(model)
    own = vars(model).get("generate")
    model.generate = partial(generate_sharing_prompts, model, model.generate)
    try:
        yield
    finally:
        if had_own:
            model.generate = own
        else:
            del model.generate


def generate_sharing_prompts(model: nn.Module, generate, *args, **kwargs):
    """``generate(input_ids=..., attention_mask=..., generation_config=..., **settings)`` with rows whose prompts are
    equal prefilled once: the prompts less their last token run once per distinct prompt, and `generate` starts every
    row from its prompt's cache. `settings` are `GenerationConfig` fields given as keywords.

    Anything else (positional arguments, other inputs or keywords, a cache of the caller's, beam search, several
    sequences per row, a static cache, the cache turned off, prompt lookup, a model `forward.prompt_sharing_blocker`
    refuses, no repeated prompt) goes to `generate` as it came.
    """
    input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
    settings = {name: value for name, value in kwargs.items() if name not in ("input_ids", "attention_mask")}
    groups = (
        prompt_groups(input_ids[:, :-1], attention_mask[:, :-1])
        if not args
        and input_ids is not None
        and attention_mask is not None
        and input_ids.size(1) > 1
        and _samples_one_sequence_per_row(model, settings)
        and prompt_sharing_blocker(model) is None
        else None
    )
    if groups is None:
        return generate(*args, **kwargs)
    prefill = dict(input_ids=input_ids[groups.first_row, :-1], attention_mask=attention_mask[groups.first_row, :-1])
    if "position_ids" in forward_parameters(model):  # as `generate` numbers them: from 0 at the first unmasked token
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        prefill["position_ids"] = positions[groups.first_row, :-1]
    with torch.no_grad():
        outputs = model(**prefill, use_cache=True, logits_to_keep=1)
    keyword = cache_keyword(model)
    cache = returned_cache(model, outputs, keyword)
    cache.reorder_cache(groups.group)
    return generate(**kwargs, **{keyword: cache})


def _samples_one_sequence_per_row(model: nn.Module, settings: dict) -> bool:
    """Whether `settings` (a ``generation_config`` and `GenerationConfig` fields) ask for plain sampling or greedy
    search with a dynamic cache: no beams, one sequence per row, no static cache, the cache not turned off (with
    ``use_cache=False`` `generate` would feed the whole prompt again on top of the shared cache), no prompt lookup,
    and nothing but generation settings."""
    if any(name != "generation_config" and name not in _GENERATION_CONFIG_FIELDS for name in settings):
        return False
    given = settings.get("generation_config")
    defaults = getattr(model, "generation_config", None)
    sources = (settings, vars(given) if given is not None else {}, vars(defaults) if defaults is not None else {})

    def setting(name: str):  # a keyword, else the given config's value, else the model's default
        return next((source[name] for source in sources if source.get(name) is not None), None)

    return (
        setting("num_beams") in (None, 1)
        and setting("num_return_sequences") in (None, 1)
        and setting("cache_implementation") is None
        and setting("use_cache") is not False
        and setting("prompt_lookup_num_tokens") is None
    )
