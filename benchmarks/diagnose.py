"""Why does pure SDPO degrade a small model? Teacher-versus-student measurements on real SDPO batches.

Builds SDPO batches exactly as `SDPOTrainer` does (generation, rewards, feedback, teacher prompts) from the
untrained SmolLM2-135M-Instruct, then measures, on the completions that get a teacher signal:

- whether the teacher prefers the correct answer: log-probability of a group's successful completion under the
  teacher (reading the reprompt) minus under the student (reading the prompt), for the failed completions;
- the per-token divergence (the loss's JSD) by position in the completion;
- the teacher's and the student's entropy;
- which next tokens the teacher promotes at the first completion position (teacher minus student probability);
- how much of the loss comes from completions whose whole group succeeded.

    python benchmarks/diagnose.py [--task capitals] [--batches 4] [--json benchmarks/results/diagnosis_capitals.json]
        [--sdpo-config '{"solution_template": "..."}']
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import provenance  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="capitals")
    parser.add_argument("--batches", type=int, default=4, help="generation batches of 16 completions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--sdpo-config", type=json.loads, default={}, help="SDPOConfig fields as JSON, e.g. '{\"alpha\": 1.0}'"
    )
    options = parser.parse_args(argv)

    from trl import GRPOConfig

    from sdpo_rl import SDPOConfig, SDPOTrainer
    from sdpo_rl.apps.tasks import get_task
    from sdpo_rl.forward import completion_logits
    from sdpo_rl.loss import per_token_divergence, sampled_token_logps, token_entropy
    from sdpo_rl.models import load_default_model

    task = get_task(options.task)
    model, tokenizer = load_default_model()
    config = SDPOConfig(**options.sdpo_config)
    trainer = SDPOTrainer(
        model=model,
        args=GRPOConfig(
            output_dir="/tmp/sdpo-rl-diagnose",
            per_device_train_batch_size=16,
            num_generations=4,
            max_completion_length=24,
            temperature=1.0,
            use_cpu=True,
            report_to="none",
            seed=options.seed,
            gradient_checkpointing=False,
        ),
        sdpo_config=config,
        processing_class=tokenizer,
        reward_funcs=[task.reward_func()],
        train_dataset=task.train_dataset(),
    )
    dataset = task.train_dataset()
    positions: dict[int, list[float]] = {}
    margins, student_entropy, teacher_entropy = [], [], []
    promoted: Counter = Counter()
    loss_all_success, loss_total = 0.0, 0.0
    torch.manual_seed(options.seed)
    for batch_index in range(options.batches):
        rows = [dataset[(4 * batch_index + i) % len(dataset)] for i in range(4) for _ in range(4)]
        batch = trainer._generate_and_score_completions(rows)
        rewards = trainer._logs["rewards"][f"{task.name}_reward"]
        rewards = list(rewards)[-16:]
        mask = batch["self_distillation_mask"].bool()
        ids, cmask = batch["completion_ids"], batch["completion_mask"]
        with torch.no_grad():
            student = completion_logits(
                model,
                torch.cat([batch["prompt_ids"], ids], 1),
                torch.cat([batch["prompt_mask"], cmask], 1),
                ids.size(1),
            )
            teacher = trainer.teacher.completion_logits(
                model,
                torch.cat([batch["teacher_prompt_ids"], ids], 1),
                torch.cat([batch["teacher_prompt_mask"], cmask], 1),
                ids.size(1),
            )
            settings = dataclasses.replace(config.loss_settings(), full_logit_distillation=True)
            divergence = per_token_divergence(student, teacher, ids, settings=settings)
            s_entropy, t_entropy = token_entropy(student), token_entropy(teacher)
            s_probs, t_probs = student[:, 0].softmax(-1), teacher[:, 0].softmax(-1)
        # GRPO's order: groups of 4 consecutive completions share a prompt (the batch is not shuffled here).
        for i in range(16):
            if not mask[i]:
                continue
            length = int(cmask[i].sum())
            group = range(4 * (i // 4), 4 * (i // 4) + 4)
            for t in range(length):
                positions.setdefault(t, []).append(float(divergence[i, t]))
            student_entropy.append(float(s_entropy[i, :length].mean()))
            teacher_entropy.append(float(t_entropy[i, :length].mean()))
            share = float(divergence[i, :length].sum())
            loss_total += share
            if all(rewards[j] >= config.success_reward_threshold for j in group):
                loss_all_success += share
            for token in (t_probs[i] - s_probs[i]).topk(3).indices.tolist():
                promoted[tokenizer.decode([token])] += 1
            success = next((j for j in group if j != i and rewards[j] >= config.success_reward_threshold), None)
            if rewards[i] < config.success_reward_threshold and success is not None:
                # The correct completion scored by both models, each reading its own prompt.
                correct = ids[success : success + 1]
                correct_mask = cmask[success : success + 1]
                n = int(correct_mask.sum())
                with torch.no_grad():
                    s = completion_logits(
                        model,
                        torch.cat([batch["prompt_ids"][i : i + 1], correct], 1),
                        torch.cat([batch["prompt_mask"][i : i + 1], correct_mask], 1),
                        correct.size(1),
                    )
                    q = trainer.teacher.completion_logits(
                        model,
                        torch.cat([batch["teacher_prompt_ids"][i : i + 1], correct], 1),
                        torch.cat([batch["teacher_prompt_mask"][i : i + 1], correct_mask], 1),
                        correct.size(1),
                    )
                margins.append(float((sampled_token_logps(q, correct) - sampled_token_logps(s, correct))[0, :n].sum()))
        print(
            f"batch {batch_index + 1}/{options.batches}: {int(mask.sum())} completions with a teacher signal",
            flush=True,
        )

    report = {
        **provenance(__file__, sys.argv[1:] if argv is None else argv),
        "task": options.task,
        "sdpo_config": options.sdpo_config,
        "completions_measured": len(student_entropy),
        "teacher_minus_student_logp_of_correct_completion": {
            "count": len(margins),
            "mean": statistics.mean(margins) if margins else None,
            "fraction_positive": sum(m > 0 for m in margins) / len(margins) if margins else None,
        },
        "divergence_by_position": {t: statistics.mean(v) for t, v in sorted(positions.items())},
        "student_entropy_mean": statistics.mean(student_entropy),
        "teacher_entropy_mean": statistics.mean(teacher_entropy),
        "loss_share_of_all_success_groups": loss_all_success / loss_total if loss_total else None,
        "tokens_teacher_promotes_at_position_0": promoted.most_common(15),
    }
    print(json.dumps(report, indent=1))
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
