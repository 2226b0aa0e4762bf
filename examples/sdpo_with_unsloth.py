"""SDPO with Unsloth's fast kernels and LoRA: needs a CUDA GPU and `pip install unsloth` (see docs/unsloth.md).

python examples/sdpo_with_unsloth.py              # the embedded SmolLM2-135M-Instruct
python examples/sdpo_with_unsloth.py --model PATH --max-steps 50

Unsloth patches transformers and TRL when it is imported, so it is imported before `sdpo_rl` (and before trl),
which then subclasses the patched GRPOTrainer. Without a CUDA GPU, or without Unsloth, the script says so and exits
with status 1 before loading anything.
"""

import importlib.util
import sys

import torch
from common import parse_args, print_last_step_metrics, small_grpo_config


def unavailable_reason() -> str | None:
    """Why this example cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "it needs a CUDA GPU and none is available (Unsloth does not run on CPU)"
    if importlib.util.find_spec("unsloth") is None:
        return "Unsloth is not installed: pip install unsloth (it pins its own transformers/TRL versions)"
    return None


def main():
    args = parse_args(__doc__, __file__)

    reason = unavailable_reason()
    if reason is not None:
        print(f"sdpo_with_unsloth.py: nothing was run: {reason}. On CPU, run examples/sdpo_lora_ema.py instead.")
        sys.exit(1)

    from unsloth import FastLanguageModel  # first: it patches transformers and TRL; `common` imports TRL lazily

    from sdpo_rl import SDPOConfig, SDPOTrainer
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.models import prepare_default_model

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model or str(prepare_default_model()), max_seq_length=1024, load_in_4bit=False
    )
    model = FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    task = get_task("short_answer")
    trainer = SDPOTrainer(
        model=model,
        args=small_grpo_config(args, learning_rate=1e-4),
        sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.05),
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
    )
    trainer.train()
    print_last_step_metrics(trainer)


if __name__ == "__main__":
    main()
