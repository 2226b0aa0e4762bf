"""Tiny offline models and tokenizers for tests (nothing is downloaded from the Hub), and the checks that the tests of
shared prompts have in common."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Correctly solve the original question. Correct solution: the answer is 42.",
    "The following is feedback from your unsuccessful earlier attempt: wrong answer, expected 7.",
    "system user assistant You are a helpful assistant. Answer with just the city name.",
    "<think> let me think about it </think> 1 2 3 4 5 6 7 8 9 0 + - * / = ( ) [ ] { } , . : ; ! ?",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ def return print import traceback error",
]


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process, with a ChatML chat template and left padding."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, moe: bool = False, **config_overrides):
    """A 2-layer Qwen2 with random weights sized to ``tokenizer``; with ``moe``, a Qwen2-MoE with two experts."""
    torch.manual_seed(seed)
    config_class, model_class = (Qwen2MoeConfig, Qwen2MoeForCausalLM) if moe else (Qwen2Config, Qwen2ForCausalLM)
    experts = dict(
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        router_aux_loss_coef=0.01,
    )
    return _tiny_model(config_class, model_class, tokenizer, **(experts if moe else {}), **config_overrides)


def _tiny_model(config_class, model_class, tokenizer: PreTrainedTokenizerFast, **settings):
    """A `model_class` of 2 layers, hidden size 32, with random weights sized to `tokenizer`; `settings` configure the
    rest."""
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **settings,
    )
    model = model_class(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


COUNTRIES = [("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]


def make_dataset(conversational: bool = True, with_system: bool = True, n: int = 8):
    """A small prompt-only dataset ("What is the capital of X?") in TRL's conversational or standard format."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        country, city = COUNTRIES[i % len(COUNTRIES)]
        question = f"What is the capital of {country}?"
        if conversational:
            prompt = [{"role": "user", "content": question}]
            if with_system:
                prompt = [{"role": "system", "content": "Answer with just the city name."}, *prompt]
        else:
            prompt = question
        rows.append({"prompt": prompt, "answer": city})
    return Dataset.from_list(rows)


class ParityReward:
    """Reward 1 for completions whose first token id is even, else 0, with feedback for the failures.

    A random tiny model makes such groups mixed, so SDPO finds demonstrations and feedback.
    """

    __name__ = "parity_reward"

    def __init__(self):
        self.last_feedback = None
        self.calls = 0

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls += 1
        rewards = [1.0 if ids and ids[0] % 2 == 0 else 0.0 for ids in completion_ids]
        self.last_feedback = ["" if r == 1.0 else "The first token was odd." for r in rewards]
        return rewards


def grpo_args(output_dir, **overrides):
    """A CPU GRPOConfig small enough for unit tests."""
    from trl import GRPOConfig

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


@contextmanager
def embedded_positions(model) -> Iterator[list[int]]:
    """Within the block, each forward's count of token positions that `model`'s input embedding looks up."""
    counts = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: counts.append(out.shape[:2].numel())
    )
    try:
        yield counts
    finally:
        handle.remove()


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """`actual` equals `expected` to 1e-5 of `expected`'s largest magnitude.

    For gradients through a shared prompt: the RMS norms compute in float32, and summing a shared prompt's gradients
    before them rather than after rounds differently (even in a float64 model, by ~6e-8 of the gradient's scale).
    """
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


# A batch for the tests of shared prompts: prompts of 7 tokens, completions of 5.
PROMPT, COMPLETION = 7, 5
GROUP_OF_ROW = [2, 0, 0, 1, 2, 1, 0]  # 7 rows, 3 distinct prompts, in no particular order


def grouped_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts (each group its own padding) repeated per `GROUP_OF_ROW`, then completions, some ended."""
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab_size, (3, PROMPT), generator=generator)
    prompt_mask = torch.ones(3, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[2, :1] = 0
    group = torch.tensor(GROUP_OF_ROW)
    completions = torch.randint(3, vocab_size, (len(group), COMPLETION), generator=generator)
    completion_mask = torch.ones_like(completions)
    completion_mask[3, -2:] = completion_mask[6, -1:] = 0
    return torch.cat([prompts[group], completions], 1), torch.cat([prompt_mask[group], completion_mask], 1)


def model_variant(tokenizer: PreTrainedTokenizerFast, variant: str):
    """A tiny model for the tests of shared prompts: "plain", "lora" (LoRA on q and v, initialised away from zero) or
    "sliding_window" (whose first layer's cache keeps only the last 3 positions)."""
    from peft import LoraConfig, get_peft_model

    if variant == "sliding_window":
        return make_model(
            tokenizer, use_sliding_window=True, sliding_window=3, layer_types=["sliding_attention", "full_attention"]
        )
    model = make_model(tokenizer)
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


_MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=4)
_EXPERTS = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)
# `make_family_model`'s families: the names of the config and model classes, and the settings that give each its
# layer types.
_FAMILIES = {
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(attn_layer_indices=[1], **_MAMBA)),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1)
        | dict(num_experts=2, num_experts_per_tok=1, mamba_d_state=8),
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(layer_types=["linear_attention", "full_attention"], shared_expert_intermediate_size=32, **_EXPERTS)
        | dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8),
    ),
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(layer_types=["conv", "full_attention"])),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(mamba_d_ssm=None, **_MAMBA)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", _EXPERTS),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(layer_types=["sliding_attention", "full_attention"], sliding_window=3, final_logit_softcapping=None),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=3)),
}
# The families whose cache layers are all full or sliding-window attention (`forward.prompt_sharing_blocker`), and
# those with a recurrent, convolutional or linear-attention layer.
ATTENTION_FAMILIES = ["qwen3", "qwen3_moe", "gemma3_text", "mistral"]
STATE_FAMILIES = ["bamba", "jamba", "qwen3_next", "lfm2", "falcon_h1"]


def make_family_model(tokenizer: PreTrainedTokenizerFast, family: str):
    """A 2-layer float32 model of `family` (`ATTENTION_FAMILIES`, `STATE_FAMILIES`) with random weights, sized to
    `tokenizer`, with the layer types that matter for sharing prompts: one recurrent or convolutional layer and one
    attention layer in the hybrids (Falcon-H1's layers are both at once), a sliding window of 3 in Gemma3 and
    Mistral."""
    import transformers

    config_name, model_name, settings = _FAMILIES[family]
    torch.manual_seed(0)
    return _tiny_model(
        getattr(transformers, config_name), getattr(transformers, model_name), tokenizer, head_dim=8, **settings
    ).float()
