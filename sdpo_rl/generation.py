"""Sampling a GRPO batch with each distinct prompt prefilled once.

A GRPO batch repeats every prompt G times, and `generate` runs each copy through the model before sampling. On a CPU
that prefill is a large part of the step's generation. `prompts_prefilled_once` runs each distinct prompt once (all
but its last token), copies its key/value cache to the rows that share it, and lets `generate` go on from there: the
same logits up to rounding, and the same random draws, as the full prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from .forward import cache_keyword, forward_parameters, prompt_groups, returned_cache


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
    """``generate(input_ids=..., attention_mask=..., generation_config=...)`` with rows whose prompts are equal
    prefilled once: the prompts less their last token run once per distinct prompt, and `generate` starts every row
    from its prompt's cache.

    Anything else (positional arguments, other inputs, a cache of the caller's, beam search, a static cache, prompt
    lookup, a forward that takes no cache, no repeated prompt) goes to `generate` as it came.
    """
    keyword = cache_keyword(model)
    if args or keyword is None or set(kwargs) != {"input_ids", "attention_mask", "generation_config"}:
        return generate(*args, **kwargs)
    input_ids, attention_mask, config = kwargs["input_ids"], kwargs["attention_mask"], kwargs["generation_config"]
    plain_sampling = (
        config is not None
        and _setting(model, config, "num_beams") in (None, 1)
        and _setting(model, config, "cache_implementation") is None
        and _setting(model, config, "prompt_lookup_num_tokens") is None
    )
    groups = (
        prompt_groups(input_ids[:, :-1], attention_mask[:, :-1])
        if plain_sampling and attention_mask is not None and input_ids.size(1) > 1
        else None
    )
    if groups is None:
        return generate(**kwargs)
    prefill = dict(input_ids=input_ids[groups.first_row, :-1], attention_mask=attention_mask[groups.first_row, :-1])
    if "position_ids" in forward_parameters(model):  # as `generate` numbers them: from 0 at the first unmasked token
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        prefill["position_ids"] = positions[groups.first_row, :-1]
    with torch.no_grad():
        outputs = model(**prefill, use_cache=True, logits_to_keep=1)
    cache = returned_cache(model, outputs, keyword)
    cache.reorder_cache(groups.group)
    return generate(**kwargs, **{keyword: cache})


def _setting(model: nn.Module, config, name: str):
    """`config`'s value of `name`, or where it leaves it unset (None), the model's default generation config's."""
    value = getattr(config, name, None)
    return value if value is not None else getattr(getattr(model, "generation_config", None), name, None)
