"""Held-out accuracy of a chat model on a task from `sdpo_rl.apps.tasks`, by sampling (no gradients).

`heldout_accuracy` renders every prompt with the tokenizer's chat template (`add_generation_prompt=True`), samples
`samples_per_prompt` completions per prompt with `model.generate` in left-padded batches (on a CPU with each batch's
repeated prompts prefilled once where the model allows it, `sdpo_rl.generation`), and scores each one with
`task.is_correct`. Sampling is seeded and runs inside `torch.random.fork_rng`, so the same call gives the same samples
before and after training (up to the model's change) and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .generation import generate_sharing_prompts


def sample_completions(
    model,
    tokenizer,
    prompts: list[list[dict[str, str]]],
    *,
    samples_per_prompt: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[tuple[str, int]]]:
    """For each conversational prompt, `samples_per_prompt` sampled completions as (text, length in tokens).

    The length counts the generated tokens up to and including the first end-of-sequence token (as TRL's
    `completions/mean_length` does); the text is decoded without special tokens. `temperature=0` means greedy.
    The model is put in eval mode for the call and its previous mode is restored.
    """
    if samples_per_prompt < 1 or batch_size < 1:
        raise ValueError("samples_per_prompt and batch_size must be >= 1.")
    device = next(model.parameters()).device
    eos_ids = model.generation_config.eos_token_id
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [tokenizer.eos_token_id])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    )
    # Every prompt repeated samples_per_prompt times, in order, then cut into batches.
    flat = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    results: list[tuple[str, int]] = []

    was_training = model.training
    padding_side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    devices = [device] if device.type == "cuda" else []
    generate = partial(generate_sharing_prompts, model, model.generate) if device.type == "cpu" else model.generate
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, len(flat), batch_size):
                batch = tokenizer.apply_chat_template(
                    flat[start : start + batch_size],
                    add_generation_prompt=True,
                    padding=True,
                    return_dict=True,
                    return_tensors="pt",
                ).to(device)
                output = generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_id,
                    **sampling,
                )
                completions = output[:, batch["input_ids"].shape[1] :]
                for row in completions.tolist():
                    length = next((i + 1 for i, token in enumerate(row) if token in eos_ids), len(row))
                    results.append((tokenizer.decode(row[:length], skip_special_tokens=True), length))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return [results[i : i + samples_per_prompt] for i in range(0, len(results), samples_per_prompt)]


def heldout_accuracy(
    model,
    tokenizer,
    dataset,
    task,
    *,
    samples_per_prompt: int = 4,
    temperature: float = 0.7,
    max_new_tokens: int = 24,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """Fraction of sampled completions that `task.is_correct` accepts, over every row of `dataset`.

    Returns `accuracy`, `prompts_with_a_pass` (the share of rows with at least one accepted sample: a GRPO group of
    `samples_per_prompt` with a success), `mean_completion_length` (tokens, end-of-sequence included), `num_samples`
    and `examples` (the first completion of the first few prompts, for display). Use the same arguments before and
    after training to compare the two.
    """
    rows = list(dataset)
    samples = sample_completions(
        model,
        tokenizer,
        [row["prompt"] for row in rows],
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
    )
    passed = [[task.is_correct(text, row) for text, _ in group] for row, group in zip(rows, samples, strict=True)]
    correct = [accepted for group in passed for accepted in group]
    lengths = [length for group in samples for _, length in group]
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "prompts_with_a_pass": sum(map(any, passed)) / max(len(rows), 1),
        "mean_completion_length": sum(lengths) / max(len(lengths), 1),
        "num_samples": len(correct),
        "examples": [
            (row["prompt"][-1]["content"], group[0][0]) for row, group in list(zip(rows, samples, strict=True))[:3]
        ],
    }
