"""`sdpo_rl.forward.completion_hidden` with each distinct prompt run once: the full forward's values and gradients."""

from __future__ import annotations

import pytest
import torch
from tiny import (
    ATTENTION_FAMILIES,
    COMPLETION,
    GROUP_OF_ROW,
    PROMPT,
    STATE_FAMILIES,
    assert_close_to_scale,
    embedded_positions,
    grouped_batch,
    make_family_model,
    make_model,
    model_variant,
)
from torch import nn

from sdpo_rl.forward import cache_keyword, completion_hidden, linear_head, prompt_sharing_blocker


def hidden_and_gradients(model, ids, mask, logits_to_keep, share_prompts):
    """The head's inputs at the completion positions, the gradients of a weighted sum of them, and how many token
    positions the model embedded."""
    with embedded_positions(model) as embedded:
        hidden = completion_hidden(model, linear_head(model), ids, mask, logits_to_keep, share_prompts)
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad((hidden * weights).sum(), parameters, allow_unused=True, materialize_grads=True)
    return hidden, gradients, sum(embedded)


def assert_prompts_run_once(model, ids, mask, logits_to_keep):
    """`completion_hidden` with shared prompts gives the full forward's hidden states (to 1e-5) and gradients (to
    `assert_close_to_scale`), running each of the batch's 3 distinct prompts once and no row's last token."""
    full, full_gradients, full_positions = hidden_and_gradients(model, ids, mask, logits_to_keep, False)
    shared, shared_gradients, shared_positions = hidden_and_gradients(model, ids, mask, logits_to_keep, True)
    # float32, two paths: the prompt's attention runs on a batch of distinct prompts, not on every row, and rounds
    # differently (about 1e-7 of these hidden states' scale of 1), hence 1e-6 absolute, not bitwise.
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    for shared_gradient, full_gradient in zip(shared_gradients, full_gradients, strict=True):
        assert_close_to_scale(shared_gradient, full_gradient)
    rows = len(GROUP_OF_ROW)
    assert full_positions == rows * (PROMPT + logits_to_keep)
    assert shared_positions == 3 * PROMPT + rows * (logits_to_keep - 1)


@pytest.mark.parametrize(
    "variant, logits_to_keep",
    [("plain", COMPLETION), ("plain", 1), ("lora", COMPLETION), ("sliding_window", COMPLETION)],
)
def test_shared_prompts_give_the_full_forwards_values_and_gradients(variant, logits_to_keep, tokenizer):
    model = model_variant(tokenizer, variant)
    model.train()
    ids, mask = (tensor[:, : PROMPT + logits_to_keep] for tensor in grouped_batch(len(tokenizer)))
    assert_prompts_run_once(model, ids, mask, logits_to_keep)


@pytest.mark.parametrize("family", ATTENTION_FAMILIES)
def test_models_whose_cache_is_attention_only_share_prompts(family, tokenizer):
    """Qwen3, Qwen3-MoE, Gemma3 (sliding and full layers) and Mistral (a window of 3 positions, shorter than the
    prompts)."""
    model = make_family_model(tokenizer, family)
    model.train()
    assert prompt_sharing_blocker(model) is None
    assert_prompts_run_once(model, *grouped_batch(len(tokenizer)), COMPLETION)


@pytest.mark.parametrize("family", STATE_FAMILIES)
def test_models_with_recurrent_or_convolution_layers_take_the_full_forward(family, tokenizer):
    """Bamba, Jamba (Mamba layers), Falcon-H1 (Mamba beside attention in every layer), Qwen3-Next (gated delta rule)
    and LFM2 (short convolutions) keep a state that is no per-position key/value: extended from a shared prompt it
    gave Bamba's and Jamba's gradients off by a third and more, and Qwen3-Next's backward failed. They are refused
    by name, and `share_prompts` gives the full forward itself."""
    model = make_family_model(tokenizer, family)
    model.train()
    ids, mask = grouped_batch(len(tokenizer))
    blocker = prompt_sharing_blocker(model)
    assert blocker is not None and blocker.startswith(f"the cache of {type(model).__name__} has ")
    full, full_gradients, full_positions = hidden_and_gradients(model, ids, mask, COMPLETION, False)
    shared, shared_gradients, shared_positions = hidden_and_gradients(model, ids, mask, COMPLETION, True)
    assert shared_positions == full_positions == ids.numel()
    assert torch.equal(shared, full)
    assert all(map(torch.equal, shared_gradients, full_gradients))


def test_rows_with_distinct_prompts_take_one_full_forward(tokenizer):
    model = make_model(tokenizer)
    ids, mask = grouped_batch(len(tokenizer))
    distinct = [0, 1, 3]  # one row of each group
    full, _, _ = hidden_and_gradients(model, ids[distinct], mask[distinct], COMPLETION, False)
    shared, _, positions = hidden_and_gradients(model, ids[distinct], mask[distinct], COMPLETION, True)
    assert torch.equal(shared, full)
    assert positions == len(distinct) * (PROMPT + COMPLETION)


def test_the_cache_goes_by_the_name_the_models_forward_takes(tokenizer):
    class OlderModel(nn.Module):
        def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None):
            raise NotImplementedError

    assert cache_keyword(make_model(tokenizer)) == "cache"
    assert cache_keyword(model_variant(tokenizer, "lora")) == "cache"
    assert cache_keyword(OlderModel()) == "past_key_values"
    assert prompt_sharing_blocker(OlderModel()) == "the config of OlderModel does not say what its cache layers are"


def test_a_forward_that_takes_no_cache_runs_every_prompt(tokenizer):
    """A wrapper whose forward declares no cache (``**kwargs``, as a compiled model's) takes the full forward."""

    class Wrapper(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return self.model(**inputs)

        def get_input_embeddings(self):
            return self.model.get_input_embeddings()

    model = make_model(tokenizer)
    wrapper = Wrapper(model)
    assert cache_keyword(wrapper) is None
    assert prompt_sharing_blocker(wrapper) == "the forward of Wrapper declares no key/value cache"
    ids, mask = grouped_batch(len(tokenizer))
    with embedded_positions(model) as embedded:
        shared = completion_hidden(wrapper, model.lm_head, ids, mask, COMPLETION, share_prompts=True)
    assert embedded == [ids.numel()]
    assert torch.equal(shared, completion_hidden(model, model.lm_head, ids, mask, COMPLETION))


def test_head_inputs_add_and_scale_terms_and_keep_one_coefficient_per_term():
    """The trust-region mixture and the hindsight contrast are built from `scaled` and `+`: their terms in order, each
    with its own coefficient (a soft cap is applied per term, so none is folded into a hidden state)."""
    from sdpo_rl.forward import HeadInputs

    hidden, weight = torch.zeros(1, 2, 3), torch.zeros(5, 3)
    one = HeadInputs((hidden,), (weight,))
    two = HeadInputs((hidden, hidden), (weight, weight), (0.5, 2.0))
    assert one.term_coefficients == (1.0,)
    mixed = one + two.scaled(-3.0)
    assert mixed.term_coefficients == (1.0, -1.5, -6.0)
    assert mixed.hidden == (hidden, hidden, hidden) and mixed.weight == (weight, weight, weight)
    with pytest.raises(ValueError, match="3 coefficients for 2 terms"):
        HeadInputs((hidden, hidden), (weight, weight), (1.0, 1.0, 1.0))
