"""SDPO with rich environment feedback: generated programs run against tests; failures reach the teacher.

`CodeTestsReward` runs the code of each completion in a sandbox (docs/rewards.md) and scores the fraction of tests
passed; its feedback is what a judge says: the syntax error, the traceback, the time limit, or the failing input
with the expected and the actual output.

python examples/sdpo_rich_feedback.py             # the embedded SmolLM2-135M-Instruct, on CPU
python examples/sdpo_rich_feedback.py --model PATH --max-steps 50
"""

import json

from common import parse_args, print_last_step_metrics, small_grpo_config
from datasets import Dataset

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.models import load_model
from sdpo_rl.rewards import CodeTestsReward

PROGRAM = "Write a Python program that reads standard input and prints the answer. Put it in a ```python block."
FUNCTION = "Write the Python function only, in a ```python block."


def io(*pairs):
    return [{"input": given, "output": expected} for given, expected in pairs]


# (task, instruction, tests): stdin/stdout cases or assert statements
PROBLEMS = [
    ("Read two integers on one line and print their sum.", PROGRAM, io(("2 3\n", "5\n"), ("-4 10\n", "6\n"))),
    (
        "Read one line of text and print it reversed.",
        PROGRAM,
        io(("abc\n", "cba\n"), ("hello world\n", "dlrow olleh\n")),
    ),
    ("Read an integer n and print n squared.", PROGRAM, io(("7\n", "49\n"), ("-3\n", "9\n"))),
    ("Read integers separated by spaces and print the largest.", PROGRAM, io(("3 9 2\n", "9\n"), ("-5 -1\n", "-1\n"))),
    ("Read a word and print it in upper case.", PROGRAM, io(("sdpo\n", "SDPO\n"), ("Mixed\n", "MIXED\n"))),
    ("Write `is_even(n)`: True when n is even.", FUNCTION, ["assert is_even(4) is True", "assert is_even(7) is False"]),
    ("Write `count_vowels(s)`: the number of vowels (aeiou) in s.", FUNCTION, ["assert count_vowels('banana') == 3"]),
    ("Write `factorial(n)` for n >= 0.", FUNCTION, ["assert factorial(0) == 1", "assert factorial(5) == 120"]),
]


def main():
    args = parse_args(__doc__, __file__)

    model, tokenizer = load_model(args.model)
    dataset = Dataset.from_list(
        [
            # JSON text: one Arrow column cannot hold both lists of dicts and lists of strings
            {"prompt": [{"role": "user", "content": f"{task}\n{instruction}"}], "tests": json.dumps(tests)}
            for task, instruction, tests in PROBLEMS
        ]
    )
    reward = CodeTestsReward(timeout_s=2.0)  # checks the sandbox now; reward.isolation says which one runs
    print(f"Programs run in the {reward.isolation!r} sandbox (see docs/rewards.md, Security).")
    trainer = SDPOTrainer(
        model=model,
        args=small_grpo_config(
            args,
            max_completion_length=128,
            learning_rate=1e-6,  # the reference's code-task learning rate
        ),
        sdpo_config=SDPOConfig(),
        processing_class=tokenizer,
        reward_funcs=[reward],
        train_dataset=dataset,
    )
    trainer.train()
    print("Feedback on the last completion scored:", reward.last_feedback[-1] or "(none: all tests passed)", sep="\n")
    print_last_step_metrics(trainer)


if __name__ == "__main__":
    main()
