"""Fixed SDPO runs whose global batch does not depend on the number of processes (for tests/test_distributed.py).

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUTPUT_DIR NAME [NAME ...]

runs each named scenario on CPU processes (gloo) into OUTPUT_DIR/NAME; `run(NAME, FOLDER)` runs a training scenario
in the calling process. Sampling is replaced by fixed completions chosen by each sample's *global* index and the
generation number, and the reward depends only on the completion, so one process and several see the same global
batch and must choose the same demonstrations and feedback, log the same metrics and reach the same weights.

The global batch holds three groups of four completions. Over two processes of six, the middle group is split, and
its only success lies on the other process than some of its failures (in both directions over the two generations).
A training scenario writes, per process, `rank{R}.json` (the global prompts, completions and teacher prompts of each
generation, and the log history) and `rank{R}.safetensors` (initial and final student, final teacher). The checks
`FSDP2_CHECK` and `TEACHER_FORWARDS_CHECK` run on models sharded by FSDP2; the latter sets the process group's
timeout, and so must be the first name of its run.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from tiny import grpo_args, make_dataset, make_model, make_tokenizer
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from trl.trainer.utils import split_tensor_dict

from sdpo_rl import SDPOConfig, SDPOTrainer
from sdpo_rl.sharding import local_shard
from sdpo_rl.teacher import TEACHER_ADAPTER_NAME, CopiedWeightsTeacher, LoraEMATeacher

GLOBAL_BATCH = 12
NUM_GENERATIONS = 4
# Global indices of the successful completions at each generation (the pattern repeats after the last one).
SUCCESSES = ({1, 2, 7}, {4, 9, 10})
SCENARIOS = {
    # A full model, the EMA teacher, two micro-batches per optimizer step (steps_per_generation = 2).
    "ema": {"gradient_accumulation_steps": 2, "peft": False, "teacher_mode": "ema", "grpo_weight": 0.0},
    # A LoRA student (wrapped by DDP) with the lora_ema teacher adapter, one micro-batch per step, and the hybrid
    # loss: two forwards of the DDP-wrapped student (SDPO's and TRL's GRPO loss) before one backward.
    "lora_ema": {"gradient_accumulation_steps": 1, "peft": True, "teacher_mode": "lora_ema", "grpo_weight": 0.5},
    # Sample routing with both weightings: one token count shared by TRL's loss and the distillation loss, and
    # weights normalised over the generation batch of every process, over two micro-batches per step.
    "routing": {
        "gradient_accumulation_steps": 2,
        "peft": False,
        "teacher_mode": "ema",
        "grpo_weight": 0.0,
        "sample_routing": True,
        "teacher_entropy_weighting": 1.0,
        "pass_rate_weighting": True,
    },
}
STABILISERS = ("sample_routing", "teacher_entropy_weighting", "pass_rate_weighting")
FSDP2_CHECK = "fsdp2_lora_ema"
TEACHER_FORWARDS_CHECK = "fsdp2_teacher_forwards"
# A collective that one process never joins fails after this long instead of hanging (gloo's default is 30 minutes).
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def fixed_completion(global_index: int, generation: int, successes: tuple[set[int], ...] = SUCCESSES) -> str:
    """The completion of sample `global_index` at the `generation`-th generation; successes start with "Paris"."""
    city = "Paris" if global_index in successes[generation % len(successes)] else "Lima"
    return f"{city} {global_index} {generation}"


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


class CityReward:
    """1 for a completion starting with "Paris", else 0 with feedback naming the attempt."""

    __name__ = "city_reward"

    def __init__(self):
        self.last_feedback = None

    def __call__(self, completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        rewards = [1.0 if text.startswith("Paris") else 0.0 for text in texts]
        self.last_feedback = ["" if text.startswith("Paris") else f"Attempt '{text}' is wrong." for text in texts]
        return rewards


class FixedCompletionsTrainer(SDPOTrainer):
    """SDPOTrainer whose generation returns `fixed_completion`s and which records every global batch."""

    def __init__(self, *args, successes: tuple[set[int], ...] = SUCCESSES, **kwargs):
        super().__init__(*args, **kwargs)
        self.successes = successes
        self.generations: list[dict] = []

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        first_global_index = self.accelerator.process_index * len(prompt_ids)
        generation = len(self.generations)
        texts = [fixed_completion(first_global_index + i, generation, self.successes) for i in range(len(prompt_ids))]
        return [self._tokenizer.encode(text) + [self._tokenizer.eos_token_id] for text in texts], None

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        logs = self._logs  # TRL keeps the last generation batch here, gathered over the processes
        self.generations.append(
            {
                "prompts": [str(p) for p in logs["prompt"]],
                "completions": [str(c) for c in logs["completion"]],
                "teacher_prompts": list(logs["extra"]["teacher_prompt"]),
            }
        )
        return batch


def run(scenario: str, output_dir: str) -> None:
    """Train the scenario for two steps (two generations) and write this process's report."""
    settings = SCENARIOS[scenario]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = settings["gradient_accumulation_steps"]
    tokenizer = make_tokenizer()
    # Far from uniform logits, a visible distillation loss; float64, so that one process and two agree to rounding
    # whatever the order of their sums (float32 sums of nearly cancelling gradients differ by 1e-5 between them).
    model = make_model(tokenizer, initializer_range=0.5).double()
    torch.manual_seed(0)  # the LoRA initialisation
    trainer = FixedCompletionsTrainer(
        model=model,
        args=grpo_args(
            output_dir,
            per_device_train_batch_size=GLOBAL_BATCH // world_size // accumulation,
            gradient_accumulation_steps=accumulation,
            num_generations=NUM_GENERATIONS,
            max_completion_length=8,
            optim="sgd",  # the update is linear in the gradient: equal gradients give equal weights
            learning_rate=0.5,
            ddp_backend="gloo" if world_size > 1 else None,
        ),
        sdpo_config=SDPOConfig(
            teacher_mode=settings["teacher_mode"],
            teacher_update_rate=0.5,
            grpo_weight=settings["grpo_weight"],
            **{name: settings[name] for name in STABILISERS if name in settings},
        ),
        processing_class=tokenizer,
        reward_funcs=[CityReward()],
        train_dataset=make_dataset(n=8),
        peft_config=lora_config() if settings["peft"] else None,
    )
    initial = {"initial." + name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    student = trainer.accelerator.unwrap_model(trainer.model)
    tensors = {"student." + name: p for name, p in student.named_parameters() if TEACHER_ADAPTER_NAME not in name}
    tensors.update({"teacher." + name: t for name, t in trainer.teacher.state_tensors().items()})
    tensors.update({name: t for name, t in initial.items() if TEACHER_ADAPTER_NAME not in name})
    rank = trainer.accelerator.process_index
    weights = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    save_file(weights, os.path.join(output_dir, f"rank{rank}.safetensors"))
    report = {"generations": trainer.generations, "log_history": trainer.state.log_history}
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(report))


def shard_by_fsdp2(model: torch.nn.Module) -> None:
    """Shard `model` over every process with FSDP2, layer by layer (accelerate enables FSDP on GPUs only)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.get_decoder().layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def city_reward(completions, **kwargs):
    """1 for a completion starting with "Paris", else 0, without feedback: a failed group's only signal is a success."""
    return [1.0 if c[0]["content"].startswith("Paris") else 0.0 for c in completions]


def check_teacher_forwards(output_dir: str) -> None:
    """Every process runs as many forwards of a teacher sharded by FSDP2 as the others, whatever its signal rows.

    Each forward of a sharded model all-gathers its parameters, so a process that ran fewer would leave the others
    waiting in a collective (issue #26, item 7). Process 0's group has one success (three rows distilled from its
    demonstration), process 1's group fails silently (no row has a signal). With teacher-entropy weights and hindsight
    contrast, the batch is built and its two micro-batches are trained on a student, and `lora_ema` teacher, sharded
    by FSDP2. Writes `rank{R}.json` with the distilled rows and the teacher forwards of each stage.
    """
    if not dist.is_initialized():  # before the trainer's, whose collectives would wait for 30 minutes
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    micro_batch = 2
    trainer = FixedCompletionsTrainer(
        model=make_model(tokenizer),
        args=grpo_args(
            output_dir,
            per_device_train_batch_size=micro_batch,
            gradient_accumulation_steps=2,
            num_generations=NUM_GENERATIONS,
            max_completion_length=8,
            ddp_backend="gloo",
        ),
        sdpo_config=SDPOConfig(teacher_mode="lora_ema", teacher_entropy_weighting=1.0, hindsight_contrast=1.0),
        processing_class=tokenizer,
        reward_funcs=[city_reward],
        train_dataset=make_dataset(n=8),
        peft_config=lora_config(),
        successes=({1},),
    )
    shard_by_fsdp2(trainer.model)
    forwards = []
    for name in ("completion_logits", "completion_head_inputs"):
        forward = getattr(trainer.teacher, name)
        setattr(trainer.teacher, name, lambda *args, run=forward, **kwargs: forwards.append(1) or run(*args, **kwargs))

    rank = dist.get_rank()
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 2
    batch = trainer._generate_and_score_completions([trainer.train_dataset[rank]] * NUM_GENERATIONS)
    stages = {"build": len(forwards)}
    for inputs in split_tensor_dict(batch, NUM_GENERATIONS // micro_batch):
        trainer._self_distillation_loss(trainer.model, inputs).loss.backward()
    stages["loss"] = len(forwards) - stages["build"]
    report = {"distilled_rows": int(batch["self_distillation_mask"].sum()), "teacher_forwards": stages}
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(report))


def check_fsdp2_lora_ema(output_dir: str) -> None:
    """The `lora_ema` update on a student sharded by FSDP2 equals the EMA of the whole tensors; a full copy is refused.

    Accelerate enables FSDP on GPUs only, so the student is sharded here with `fully_shard` directly. Writes
    `rank{R}.json` with the largest error of the sharded update and the error that updating a full copy raised.
    """
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    student = get_peft_model(make_model(tokenizer), lora_config())
    rate = 0.25
    teacher = LoraEMATeacher(student, rate=rate)
    full_model = make_model(tokenizer)
    full_copy = CopiedWeightsTeacher(full_model, rate=rate)
    for model in (student, full_model):
        shard_by_fsdp2(model)

    with torch.no_grad():  # stands for an optimizer step: every process moves its shards of the student's adapter
        for name, param in student.named_parameters():
            if ".default." in name:
                shard = local_shard(param)
                shard.add_(torch.arange(shard.numel()).view_as(shard) / 7)
    student_params = dict(student.named_parameters())
    before = {name: t.full_tensor() for name, t in teacher.state_tensors().items()}
    expected = {name: torch.lerp(t, student_params[name].full_tensor(), rate) for name, t in before.items()}
    teacher.update(student)
    after = {name: t.full_tensor() for name, t in teacher.state_tensors().items()}
    try:
        full_copy.update(full_model)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    report = {
        "teacher_is_sharded": all(isinstance(t.data, DTensor) for t in teacher.state_tensors().values()),
        "max_error": max(float((after[n] - expected[n]).abs().max()) for n in expected),
        "max_change": max(float((after[n] - before[n]).abs().max()) for n in expected),
        "full_copy_refusal": refusal,
    }
    Path(output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    output, *names = sys.argv[1:]
    for name in names:
        folder = os.path.join(output, name)
        os.makedirs(folder, exist_ok=True)
        checks = {FSDP2_CHECK: check_fsdp2_lora_ema, TEACHER_FORWARDS_CHECK: check_teacher_forwards}
        checks.get(name, partial(run, name))(folder)
    if dist.is_initialized():
        # The finished trainers' DDP wrappers hold the process group: collected first, they let its destruction free it
        # and join gloo's threads, one of which can otherwise abort the exit (sdpo_rl/process_group.py). FSDP2's
        # `fully_shard` keeps the group alive on its own; there the barrier, which owns no tensors, is what comes last.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
