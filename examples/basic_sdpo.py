"""SDPO in its simplest form: a reward function that also explains its failures through `last_feedback`.

python examples/basic_sdpo.py                     # the embedded SmolLM2-135M-Instruct, on CPU
python examples/basic_sdpo.py --model PATH --max-steps 50
"""

import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.models import load_model

QUESTIONS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")] * 4


def capital_reward(completions, answer, **kwargs):
    """1.0 when the answer names the capital. The feedback tells the teacher what went wrong, not the answer."""
    texts = [completion[0]["content"] for completion in completions]
    rewards = [1.0 if city.lower() in text.lower() else 0.0 for text, city in zip(texts, answer, strict=True)]
    capital_reward.last_feedback = ["" if r else "Incorrect: that city is not the capital." for r in rewards]
    return rewards


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--output-dir", default="outputs/basic_sdpo")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"What is the capital of {country}? Answer with the city."}],
                "answer": city,
            }
            for country, city in QUESTIONS
        ]
    )
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir=args.output_dir,
            max_steps=args.max_steps,
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=24,
            learning_rate=1e-5,
            logging_steps=1,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available(),
        ),
        sdpo_config=SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[capital_reward],
        train_dataset=dataset,
    )
    trainer.train()
    print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith(("reward", "self_distillation/"))})


if __name__ == "__main__":
    main()
