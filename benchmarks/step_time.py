"""Training-step time of SDPO (sdpo_rl) vs GRPO (beta = 0) vs TRL's experimental SDPOTrainer, same model and batch.

A random-weight Qwen2 (hidden 256, 4 layers) with a synthetic word-level tokenizer, trained on 8 prompts x 4
completions x exactly 32 tokens per step (`min_new_tokens` = `max_completion_length`). Every trainer is timed the
same way: a `TrainerCallback` takes the wall time from `on_step_begin` to `on_step_end`, which covers generation,
rewards, teacher prompts, forwards, backward, the optimizer step and the teacher update; each run reports the median
over its steps after one warm-up step. Each run is a fresh process; the runs of one setting go in turn, rotating
their order every round, and each trainer's time is the median of its rounds' medians (2 rounds of 5 steps at the
small vocabulary, 1 round of 3 steps at the large one).

The reward controls the teacher signal: `mixed` gives 1 to every other completion, so that every group has two
successes and every completion gets a peer's demonstration; `zero` gives 0 to all, so that no completion has a
teacher signal (no success, no feedback).

- `grpo`: `trl.GRPOTrainer`, beta = 0;
- `sdpo`: `sdpo_rl.SDPOTrainer` with the default `SDPOConfig` (JSD alpha 0.5, top-100 + tail, EMA teacher);
- `hybrid`: the same with `grpo_weight=0.8` (TRL's GRPO term and the distillation term from one student forward);
- `trl_sdpo`: `trl.experimental.sdpo.SDPOTrainer` with `distillation_mode="topk_logits"` and the same divergence,
  K, tail, IS clip, EMA teacher and success threshold.

Two vocabularies: 8,192 (the small-model comparison) and 151,936 (Qwen2.5's: where the `[B, T, V]` logits dominate).

On a GPU, `--device cuda --model qwen2.5-0.5b --dtype bfloat16` times a random model of Qwen2.5-0.5B's shape
(hidden 896, 24 layers, 14 heads, 2 key-value heads, tied 151,936-token head), loaded in bfloat16 and trained with
`bf16=True`, at its own vocabulary only.

    python benchmarks/step_time.py            # both vocabularies (about 7 minutes on 2 cores)
    python benchmarks/step_time.py --quick    # a smoke run (under a minute): small vocabulary, one timed step
    python benchmarks/step_time.py --device cuda --model qwen2.5-0.5b --dtype bfloat16   # results/step_time_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import in_fresh_process, provenance, save_results, step_clock  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRAINERS = ("grpo", "sdpo", "hybrid", "trl_sdpo")
HYBRID_GRPO_WEIGHT = 0.8
REWARDS = ("mixed", "zero")
MODELS = {
    "tiny": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
BATCH = dict(prompts=8, num_generations=4, completion_tokens=32)
DISTILLATION = dict(alpha=0.5, topk=100, add_tail=True, is_clip=2.0, teacher_update_rate=0.05)
FULL = dict(
    vocab_sizes=(8_192, 151_936), rewards=REWARDS, timed_steps={8_192: 5, 151_936: 3}, rounds={8_192: 2, 151_936: 1}
)
QUICK = dict(vocab_sizes=(8_192,), rewards=REWARDS, timed_steps={8_192: 1}, rounds={8_192: 1})
QWEN = dict(vocab_sizes=(151_936,), rewards=("mixed",), timed_steps={151_936: 3}, rounds={151_936: 1})
# The targets: a ratio of median step times in one setting, at most (or, `strict`, below) `limit`.
TARGETS = (
    dict(vocab_size=8_192, reward="mixed", ratio="sdpo / grpo", limit=1.15, strict=False),
    dict(vocab_size=8_192, reward="zero", ratio="sdpo / grpo", limit=1.05, strict=False),
    dict(vocab_size=8_192, reward="mixed", ratio="hybrid / sdpo", limit=1.1, strict=False),
    dict(vocab_size=151_936, reward="mixed", ratio="sdpo / trl_sdpo", limit=1.0, strict=True),
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
COUNTRIES = ("France", "Japan", "Peru", "Kenya", "Chile", "Egypt", "Norway", "Vietnam")


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens and a ChatML template.

    The tokens: the special ones, the words of the prompts and of the teacher templates, then filler words `w0`,
    `w1`, ..., which is what a random model's completions decode to.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sdpo_rl import SDPOConfig

    config = SDPOConfig()
    text = " ".join(
        [config.solution_template, config.feedback_template, config.reprompt_template, "user assistant system"]
        + [f"What is the capital of {country}?" for country in COUNTRIES]
    )
    words = [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]
    vocab = list(dict.fromkeys(SPECIAL_TOKENS + words))
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        padding_side="left",
        additional_special_tokens=["<|im_start|>"],
    )
    wrapped.chat_template = CHATML
    return wrapped


def make_model(vocab_size: int, tokenizer, shape: str, dtype: str, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{"tie_word_embeddings": False, **MODELS[shape]},
    )
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_dataset(steps: int):
    from datasets import Dataset

    prompts = [[{"role": "user", "content": f"What is the capital of {country}?"}] for country in COUNTRIES]
    return Dataset.from_list([{"prompt": prompt} for prompt in prompts[: BATCH["prompts"]]] * steps)


def mixed_reward(completions, **kwargs):
    """1 for every other completion: two successes in each group of four, so every completion has a demonstration."""
    return [1.0 if i % 2 == 0 else 0.0 for i in range(len(completions))]


def zero_reward(completions, **kwargs):
    """0 for all: no success and no feedback, so no completion has a teacher signal."""
    return [0.0] * len(completions)


def training_arguments(output_dir: str, steps: int, device: str, dtype: str) -> dict:
    """The arguments every trainer's config gets: the same batch, generation, optimizer and schedule."""
    return dict(
        model_init_kwargs={"dtype": dtype},
        output_dir=output_dir,
        per_device_train_batch_size=BATCH["prompts"] * BATCH["num_generations"],
        num_generations=BATCH["num_generations"],
        max_completion_length=BATCH["completion_tokens"],
        generation_kwargs={"min_new_tokens": BATCH["completion_tokens"]},
        temperature=1.0,
        max_steps=steps,
        learning_rate=1e-5,
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=device == "cpu",
        bf16=dtype == "bfloat16",
        seed=0,
        disable_tqdm=True,
    )


def build_trainer(name: str, task: dict, steps: int, output_dir: str):
    vocab_size, reward = task["vocab_size"], task["reward"]
    tokenizer = make_tokenizer(vocab_size)
    # Given as a path to every trainer: TRL's experimental SDPOTrainer builds its teacher from the model's path.
    model_path = str(Path(output_dir) / "model")
    make_model(vocab_size, tokenizer, task["model"], task["dtype"]).save_pretrained(model_path)
    common = dict(
        model=model_path,
        processing_class=tokenizer,
        reward_funcs=[mixed_reward if reward == "mixed" else zero_reward],
        train_dataset=make_dataset(steps),
    )
    arguments = training_arguments(output_dir, steps, task["device"], task["dtype"])
    if name == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOTrainer(args=GRPOConfig(beta=0.0, **arguments), **common)
    if name in ("sdpo", "hybrid"):
        from trl import GRPOConfig

        from sdpo_rl import SDPOConfig, SDPOTrainer

        sdpo_config = SDPOConfig(
            grpo_weight=HYBRID_GRPO_WEIGHT if name == "hybrid" else 0.0,
            alpha=DISTILLATION["alpha"],
            distillation_topk=DISTILLATION["topk"],
            distillation_add_tail=DISTILLATION["add_tail"],
            is_clip=DISTILLATION["is_clip"],
            teacher_update_rate=DISTILLATION["teacher_update_rate"],
        )
        return SDPOTrainer(args=GRPOConfig(beta=0.0, **arguments), sdpo_config=sdpo_config, **common)
    from trl.experimental.sdpo import SDPOConfig as TRLSDPOConfig
    from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer

    config = TRLSDPOConfig(
        distillation_mode="topk_logits",
        distillation_alpha=DISTILLATION["alpha"],
        distillation_topk=DISTILLATION["topk"],
        distillation_add_tail=DISTILLATION["add_tail"],
        distillation_is_clip=DISTILLATION["is_clip"],
        teacher_model_kind="ema",
        teacher_update_rate=DISTILLATION["teacher_update_rate"],
        success_reward_threshold=1.0,
        **arguments,
    )
    return TRLSDPOTrainer(args=config, **common)


def step_seconds(task: dict) -> dict:
    """Run in a fresh process: train one warm-up and `timed_steps` steps, timing each step with a callback."""
    import torch

    def synchronize():
        if task["device"] == "cuda":
            torch.cuda.synchronize()

    name = task["trainer"]
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(name, task, 1 + task["timed_steps"], output_dir)
        timer = step_clock(synchronize)
        trainer.add_callback(timer)
        trainer.train()
    history = trainer.state.log_history
    return dict(
        trainer=name,
        vocab_size=task["vocab_size"],
        reward=task["reward"],
        warmup_seconds=timer.wall[0],
        seconds=timer.wall[1:],
        median_seconds=statistics.median(timer.wall[1:]),
        reprompt_sample_fraction=logged(history, "self_distillation/reprompt_sample_fraction"),
        mean_completion_length=logged(history, "completions/mean_length"),
        torch_threads=torch.get_num_threads(),
    )


def logged(history: list[dict], name: str) -> list[float]:
    return [entry[name] for entry in history if name in entry]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (vocabulary, reward): each trainer's median step time and its ratio to GRPO's."""
    rows = []
    for vocab_size in dict.fromkeys(r["vocab_size"] for r in runs):
        for reward in REWARDS:
            medians = {
                name: statistics.median(
                    r["median_seconds"]
                    for r in runs
                    if (r["vocab_size"], r["reward"], r["trainer"]) == (vocab_size, reward, name)
                )
                for name in TRAINERS
            }
            row = dict(vocab_size=vocab_size, reward=reward, seconds={k: round(v, 3) for k, v in medians.items()})
            row["sdpo / grpo"] = round(medians["sdpo"] / medians["grpo"], 3)
            row["trl_sdpo / grpo"] = round(medians["trl_sdpo"] / medians["grpo"], 3)
            row["sdpo / trl_sdpo"] = round(medians["sdpo"] / medians["trl_sdpo"], 3)
            row["hybrid / sdpo"] = round(medians["hybrid"] / medians["sdpo"], 3)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| vocabulary | reward (teacher signal) | GRPO s/step | SDPO s/step | hybrid 0.8 s/step | TRL SDPO s/step "
        "| SDPO / GRPO | TRL SDPO / GRPO | SDPO / TRL SDPO | hybrid / SDPO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        seconds = row["seconds"]
        signal = "mixed (all)" if row["reward"] == "mixed" else "zero (none)"
        lines.append(
            f"| {row['vocab_size']:,} | {signal} | {seconds['grpo']} | {seconds['sdpo']} | {seconds['hybrid']} "
            f"| {seconds['trl_sdpo']} | {row['sdpo / grpo']}x | {row['trl_sdpo / grpo']}x | {row['sdpo / trl_sdpo']}x "
            f"| {row['hybrid / sdpo']}x |"
        )
    return "\n".join(lines)


def run(size: dict, setup: dict) -> dict:
    """Every run in its own process, the trainers of a setting in turn; returns the report for the results JSON."""
    started = time.time()
    runs = []
    for vocab_size in size["vocab_sizes"]:
        for reward in size["rewards"]:
            for round_index in range(size["rounds"][vocab_size]):
                shift = round_index % len(TRAINERS)
                for name in TRAINERS[shift:] + TRAINERS[:shift]:
                    steps = size["timed_steps"][vocab_size]
                    task = dict(trainer=name, vocab_size=vocab_size, reward=reward, timed_steps=steps, **setup)
                    runs.append(in_fresh_process(__file__, task))
                    print(
                        f"V={vocab_size} {reward} {name}: {runs[-1]['median_seconds']:.3f} s/step "
                        f"(reprompt fraction {runs[-1]['reprompt_sample_fraction']})",
                        flush=True,
                    )
    rows = summarise(runs)
    return dict(
        **setup,
        model_shape=MODELS[setup["model"]],
        batch=BATCH,
        distillation=DISTILLATION,
        table=rows,
        targets=verdicts(rows),
        runs=runs,
        wall_seconds=round(time.time() - started),
    )


def verdicts(rows: list[dict]) -> list[dict]:
    """Each target whose setting was measured, with the measured ratio and whether it is met."""
    results = []
    for target in TARGETS:
        for row in rows:
            if (row["vocab_size"], row["reward"]) == (target["vocab_size"], target["reward"]):
                value = row[target["ratio"]]
                met = value < target["limit"] if target["strict"] else value <= target["limit"]
                results.append(dict(target, value=value, met=met))
    return results


def print_report(report: dict) -> None:
    print(markdown(report["table"]))
    for verdict in report["targets"]:
        relation = "<" if verdict["strict"] else "<="
        print(
            f"target V={verdict['vocab_size']} {verdict['reward']}: {verdict['ratio']} {relation} {verdict['limit']}: "
            f"{verdict['value']} {'met' if verdict['met'] else 'MISSED'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small vocabulary, one timed step")
    parser.add_argument("--results", type=Path, help="output JSON (default: results/step_time[_quick].json)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the trainers run")
    parser.add_argument("--model", choices=tuple(MODELS), default="tiny", help="the random model's shape")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and bf16")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(step_seconds(json.loads(args.worker))))
        return
    size = QUICK if args.quick else QWEN if args.model == "qwen2.5-0.5b" else FULL
    setup = dict(device=args.device, model=args.model, dtype=args.dtype)
    report = {**provenance(__file__, sys.argv[1:]), **run(size, setup)}
    name = "step_time" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    results_path = args.results or RESULTS_DIR / f"{name}.json"
    save_results(results_path, report)
    print_report(report)
    print(f"wrote {results_path} in {report['wall_seconds']} s")


if __name__ == "__main__":
    main()
