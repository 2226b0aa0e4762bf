"""`sdpo_rl.generation.prompts_prefilled_once`: sampling with each distinct prompt prefilled once draws what the full
prefill draws, from the same logits."""

from __future__ import annotations

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from tiny import (
    GROUP_OF_ROW,
    PROMPT,
    embedded_positions,
    grouped_batch,
    make_family_model,
    make_model,
    model_variant,
)
from transformers import GenerationConfig, LogitsProcessorList

from sdpo_rl.generation import prompts_prefilled_once

NEW_TOKENS = 5


def sampling_config(**overrides) -> GenerationConfig:
    settings = dict(
        do_sample=True,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        disable_compile=True,
    )
    return GenerationConfig(**{**settings, **overrides})


def sample(model, ids, mask, shared: bool, **generate_kwargs):
    """One seeded `generate` call, with or without `prompts_prefilled_once`; its output and the token positions the
    model embedded."""
    torch.manual_seed(0)
    with embedded_positions(model) as embedded, torch.no_grad():
        if shared:
            with prompts_prefilled_once(model):
                output = model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        else:
            output = model.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
    return output, sum(embedded)


def sample_both(model, tokenizer, **generate_kwargs):
    """`sample` of the prompts of `grouped_batch` with the full prefill, then with `prompts_prefilled_once`:
    ``(full, full_positions), (shared, shared_positions)``."""
    ids, mask = (tensor[:, :PROMPT] for tensor in grouped_batch(len(tokenizer)))
    return sample(model, ids, mask, False, **generate_kwargs), sample(model, ids, mask, True, **generate_kwargs)


@pytest.mark.parametrize("variant", ["plain", "lora", "sliding_window"])
def test_shared_prefill_samples_the_full_prefills_tokens_from_its_logits(variant, tokenizer):
    model = model_variant(tokenizer, variant)
    (full, full_positions), (shared, shared_positions) = sample_both(
        model, tokenizer, generation_config=sampling_config()
    )
    # Two paths, so the logits are compared to float32 rounding (a prompt prefilled once rounds differently); the
    # sampled tokens can then differ only where a seeded draw falls within that rounding of a boundary, which these
    # few fixed draws do not (checked on Intel and AMD CPUs).
    assert torch.equal(shared.sequences, full.sequences)
    for shared_logits, full_logits in zip(shared.logits, full.logits, strict=True):
        torch.testing.assert_close(shared_logits, full_logits, rtol=1e-5, atol=1e-5)
    rows = len(GROUP_OF_ROW)
    assert full_positions == rows * PROMPT + rows * (NEW_TOKENS - 1)
    assert shared_positions == 3 * (PROMPT - 1) + rows + rows * (NEW_TOKENS - 1)  # each prompt once, less its last
    assert "generate" not in vars(model)


@pytest.mark.parametrize("family", ["lfm2", "bamba"])
def test_models_with_recurrent_or_convolution_layers_take_the_full_prefill(family, tokenizer):
    """A model `forward.prompt_sharing_blocker` refuses (LFM2's short convolutions, Bamba's Mamba layers) samples
    with the full prefill: the same call, the same tokens and logits."""
    model = make_family_model(tokenizer, family)
    (full, full_positions), (shared, shared_positions) = sample_both(
        model, tokenizer, generation_config=sampling_config()
    )
    assert torch.equal(shared.sequences, full.sequences)
    assert all(map(torch.equal, shared.logits, full.logits))
    assert shared_positions == full_positions == len(GROUP_OF_ROW) * (PROMPT + NEW_TOKENS - 1)


def test_generation_settings_given_as_keywords_share_too(tokenizer):
    model = make_model(tokenizer)
    ids, mask = (tensor[:, :PROMPT] for tensor in grouped_batch(len(tokenizer)))
    settings = dict(do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    full, full_positions = sample(model, ids, mask, False, **settings)
    shared, shared_positions = sample(model, ids, mask, True, **settings)
    assert torch.equal(shared, full)
    rows = len(GROUP_OF_ROW)
    assert shared_positions == full_positions - rows * PROMPT + 3 * (PROMPT - 1) + rows


def test_other_calls_go_to_generate_as_they_came(tokenizer):
    """Distinct prompts, a `generate` argument that is not a generation setting, beam search (given or the model's
    default), several sequences per row and a prompt-learning adapter each take the full prefill."""
    model = make_model(tokenizer)
    beams_by_default = make_model(tokenizer)
    beams_by_default.generation_config.num_beams = 2
    prompt_tuned = get_peft_model(
        make_model(tokenizer), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    )
    ids, mask = (tensor[:, :PROMPT] for tensor in grouped_batch(len(tokenizer)))
    rows = len(GROUP_OF_ROW)
    no_logits = dict(generation_config=sampling_config(output_logits=False))
    cases = [
        (model, [0, 1, 3], dict(generation_config=sampling_config())),
        (model, slice(None), dict(generation_config=sampling_config(), logits_processor=LogitsProcessorList())),
        (
            model,
            slice(None),
            dict(generation_config=sampling_config(do_sample=False, num_beams=2, output_logits=False)),
        ),
        (beams_by_default, slice(None), dict(generation_config=sampling_config(do_sample=False, output_logits=False))),
        (model, slice(None), dict(generation_config=sampling_config(num_return_sequences=2))),
        (prompt_tuned, slice(None), no_logits),
    ]
    for case_model, case_rows, kwargs in cases:
        full, full_positions = sample(case_model, ids[case_rows], mask[case_rows], False, **kwargs)
        shared, shared_positions = sample(case_model, ids[case_rows], mask[case_rows], True, **kwargs)
        assert torch.equal(shared.sequences, full.sequences)
        assert shared_positions == full_positions >= ids[case_rows].numel()
    beam_positions = [sample(m, ids, mask, False, **kwargs)[1] for m, _, kwargs in cases[2:4]]
    assert min(beam_positions) > rows * (PROMPT + NEW_TOKENS - 1)  # the beams ran


@pytest.mark.parametrize("where", ["keyword", "model default"])
def test_the_cache_turned_off_takes_the_full_prefill(where, tokenizer):
    """With ``use_cache=False`` `generate` feeds every step the whole sequence, which on top of a shared cache would
    give other logits: given as a keyword or in the model's generation config, it takes the full prefill."""
    model = make_model(tokenizer)
    kwargs = dict(generation_config=sampling_config())
    if where == "keyword":
        kwargs["use_cache"] = False
    else:
        model.generation_config.use_cache = False
    (full, full_positions), (shared, shared_positions) = sample_both(model, tokenizer, **kwargs)
    assert torch.equal(shared.sequences, full.sequences)
    assert all(map(torch.equal, shared.logits, full.logits))
    rows = len(GROUP_OF_ROW)
    assert shared_positions == full_positions == rows * sum(range(PROMPT, PROMPT + NEW_TOKENS))  # no cache at all


def test_the_models_own_generate_is_restored(tokenizer):
    model = make_model(tokenizer)
    with prompts_prefilled_once(model):
        assert "generate" in vars(model)
    assert "generate" not in vars(model)

    def own_generate(**kwargs):
        return "own"

    model.generate = own_generate
    with prompts_prefilled_once(model):
        assert model.generate(input_ids=torch.ones(2, 3, dtype=torch.long)) == "own"
    assert model.generate is own_generate
