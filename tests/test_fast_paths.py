"""SDPOTrainer says when a fast path is off: one info line per reason, naming it, and a flag logged per call
(`self_distillation/prompt_sharing`, `self_distillation/one_pass_hybrid`)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import build
from tiny import make_family_model, make_model, make_tokenizer

from sdpo_rl import SDPOConfig
from sdpo_rl.metrics import ONE_PASS_HYBRID, PROMPT_SHARING


def notices(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if " is off (self_distillation/" in record.getMessage()]


@pytest.mark.parametrize("case", ["attention", "convolution", "gradient checkpointing"])
def test_prompt_sharing_says_why_it_is_off(tmp_path, caplog, case):
    """On a CPU in one process a model with attention-only caches shares prompts in every forward; LFM2's short
    convolutions turn it off for every forward, gradient checkpointing for the student's training forwards only."""
    tokenizer = make_tokenizer()
    model = make_family_model(tokenizer, "lfm2") if case == "convolution" else make_model(tokenizer)
    trainer = build(tmp_path, tokenizer=tokenizer, model=model, gradient_checkpointing=case == "gradient checkpointing")
    if case == "gradient checkpointing":  # as `train()` does
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
    trainer.model.train()
    with caplog.at_level("INFO", logger="sdpo_rl.cpu_fast_path"):
        shared = [trainer._shares_prompts(trainer.model, training_forward) for training_forward in (True, True, False)]
    said = notices(caplog)
    expected = {
        "attention": ([True] * 3, []),
        "convolution": (
            [False] * 3,
            [
                "Running each distinct prompt once is off (self_distillation/prompt_sharing logs 0): the cache of "
                "Lfm2ForCausalLM has conv layers, not only full or sliding-window attention."
            ],
        ),
        "gradient checkpointing": (
            [False, False, True],
            [
                "Running each distinct prompt once is off (self_distillation/prompt_sharing logs 0): gradient "
                "checkpointing turns the key/value cache off in the student's training forwards."
            ],
        ),
    }[case]
    assert (shared, said) == expected
    assert trainer._metrics["train"][PROMPT_SHARING] == [float(s) for s in shared]


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_the_hybrids_one_pass_says_why_it_is_off(tmp_path, caplog, entropy_coef):
    """TRL's entropy bonus takes the entropies, with their gradient, from TRL's forward: two passes, said once."""
    trainer = build(tmp_path, SDPOConfig(grpo_weight=0.5), entropy_coef=entropy_coef)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test does not run
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2) for _ in range(4)])
    with caplog.at_level("INFO", logger="sdpo_rl.cpu_fast_path"):
        for _ in range(2):
            trainer._compute_loss(trainer.model, batch)
    one_pass = entropy_coef == 0.0
    assert trainer._metrics["train"][ONE_PASS_HYBRID] == [float(one_pass)] * 2
    assert notices(caplog) == (
        []
        if one_pass
        else [
            "The hybrid's one pass is off (self_distillation/one_pass_hybrid logs 0): TRL's entropy bonus "
            "(entropy_coef, use_adaptive_entropy) takes the entropies from its own forward."
        ]
    )
