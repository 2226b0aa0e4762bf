"""SDPO on a LoRA adapter with an EMA teacher adapter (`teacher_mode="lora_ema"`): no copy of the model is made.

python examples/sdpo_lora_ema.py                  # the embedded SmolLM2-135M-Instruct, on CPU
python examples/sdpo_lora_ema.py --model PATH --max-steps 50
"""

from common import parse_args, print_last_step_metrics, small_grpo_config
from peft import LoraConfig

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.apps.tasks import get_task
from sdpo_rl.models import load_model


def main():
    args = parse_args(__doc__, __file__)

    model, tokenizer = load_model(args.model)
    task = get_task("short_answer")  # feedback: wrong content, or how many words too many; never the answer
    trainer = SDPOTrainer(
        model=model,
        args=small_grpo_config(
            args,
            learning_rate=1e-4,  # LoRA adapters usually take a larger learning rate than full fine-tuning
        ),
        sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_update_rate=0.05),
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model(args.output_dir)  # the student adapter only; the teacher adapter stays in trainer.model
    print_last_step_metrics(trainer)


if __name__ == "__main__":
    main()
