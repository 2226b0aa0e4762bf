"""What every example shares: its command line, a small GRPOConfig for the device at hand, and its closing report.

Nothing here imports TRL at module level, so `sdpo_with_unsloth.py` can import Unsloth first.
"""

import argparse
from pathlib import Path


def parse_args(doc: str, script: str) -> argparse.Namespace:
    """`--model`, `--max-steps` and `--output-dir` (default `outputs/<script name>`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model path or hub id (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--output-dir", default=f"outputs/{Path(script).stem}")
    return parser.parse_args()


def small_grpo_config(args: argparse.Namespace, **settings):
    """A GRPOConfig for a few quick steps: 2 prompts x 4 completions per step, bf16 on a GPU, float32 on CPU."""
    import torch
    from trl import GRPOConfig

    on_gpu = torch.cuda.is_available()
    defaults = dict(
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=24,
        logging_steps=1,
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu,
    )
    return GRPOConfig(output_dir=args.output_dir, max_steps=args.max_steps, **{**defaults, **settings})


def print_last_step_metrics(trainer) -> None:
    """The rewards and `self_distillation/*` metrics of the last logged step."""
    from sdpo_rl.metrics import PREFIX, REWARD

    print({k: v for k, v in trainer.state.log_history[-2].items() if k.startswith((REWARD, PREFIX))})
