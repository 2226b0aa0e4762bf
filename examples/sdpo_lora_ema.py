"""SDPO on a LoRA adapter with an EMA teacher adapter (`teacher_mode="lora_ema"`): no copy of the model is made.

python examples/sdpo_lora_ema.py                  # the embedded SmolLM2-135M-Instruct, on CPU
python examples/sdpo_lora_ema.py --model PATH --max-steps 50
"""

import argparse

import torch
from peft import LoraConfig
from trl import GRPOConfig

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.models import load_model
from sdpo_rl.tasks import get_task


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/sdpo_lora_ema")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    task = get_task("short_answer")  # feedback: how many words too many, without the answer
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=24,
            learning_rate=1e-4,  # LoRA adapters usually take a larger learning rate than full fine-tuning
            logging_steps=1,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
        ),
        sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.05),
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the student adapter only; the teacher adapter stays in trainer.model
    print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith(("reward", "self_distillation/"))})


if __name__ == "__main__":
    main()
