"""SDPO in its simplest form: a reward function that explains each failure by returning `Scored(value, feedback)`.

python examples/basic_sdpo.py                     # the embedded SmolLM2-135M-Instruct, on CPU
python examples/basic_sdpo.py --model PATH --max-steps 50
"""

from common import parse_args, print_last_step_metrics, small_grpo_config
from datasets import Dataset

from sdpo_rl import Scored, SDPOConfig, SDPOTrainer
from sdpo_rl.models import load_model

QUESTIONS = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi"), ("Peru", "Lima")] * 4


def capital_reward(completions, answer, **kwargs):
    """1.0 when the answer names the capital. The feedback tells the teacher what went wrong, not the answer."""
    texts = [completion[0]["content"] for completion in completions]
    return [
        Scored(1.0) if city.lower() in text.lower() else Scored(0.0, "Incorrect: that city is not the capital.")
        for text, city in zip(texts, answer, strict=True)
    ]


def main():
    args = parse_args(__doc__, __file__)

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
        args=small_grpo_config(args, learning_rate=1e-5),
        sdpo_config=SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[capital_reward],
        train_dataset=dataset,
    )
    trainer.train()
    print_last_step_metrics(trainer)


if __name__ == "__main__":
    main()
