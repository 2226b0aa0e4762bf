"""`SDPOTrainer`: TRL's GRPOTrainer with the GRPO policy-gradient loss replaced by self-distillation.

The trainer is glue over GRPOTrainer's and Trainer's extension points (every one is listed in `_trl_compat`), in the
order a training step meets them; each hook delegates to the module named for its job:

0. `_generate_single_turn` (`sdpo_rl.cpu_fast_path.CPUFastPath`): TRL's sampling, each distinct prompt prefilled once
   on a CPU.
1. `_calculate_rewards`: after the reward functions ran, keep what the teacher needs (`teacher_batch._Rollout`:
   prompts, completion tokens, rewards, feedback).
2. `_generate_and_score_completions` → `rollout_with_teacher_batch`: after TRL built the batch,
   `teacher_batch.TeacherBatchBuilder.build` chooses each completion's demonstration and feedback over its whole
   group, decides which completions are distilled (all with a signal, or the routed ones), renders the teacher
   prompts and adds them, the distillation mask, the normaliser and the weights to the batch (TRL then shuffles and
   splits it like every other batch tensor).
3. `_compute_loss`: the distillation step (`sdpo_rl.distillation.DistillationStep._self_distillation_loss`: student
   forward on prompt + completion, teacher forward on teacher prompt + the same completion, the loss of
   `sdpo_rl.loss.chunked` or `sdpo_rl.loss`); with routing or the hybrid, TRL's own GRPO loss beside it, from the
   same student forward (`sdpo_rl.hybrid.HybridLoss`); TRL's scoring of the completions on a CPU
   (`CPUFastPath._get_per_token_logps_and_entropies`).
4. `_get_grad_norm` and a callback after each optimizer step: a non-finite step changes nothing; otherwise the
   teacher is updated.
5. `log`: after TRL logged a step, look for the signs of a collapse (`sdpo_rl.monitor`) and warn once.
6. `_save_checkpoint` / `_prepare_for_training` / `_save`: the teacher goes into every checkpoint and comes back on
   resume, whatever the backend; a saved model holds the student only.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from typing import Any

from accelerate.utils import DistributedType
from datasets import Dataset
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from . import _trl_compat
from .config import SDPOConfig
from .cpu_fast_path import CPUFastPath
from .distillation import DistillationStep
from .feedback import ReturnRecorder, collect_feedback, dataset_feedback, record_returns, snapshot_feedback
from .hybrid import HybridLoss
from .metrics import NONFINITE_STEP, TEACHER_EDGE
from .monitor import ADVICE, collapse_signs
from .preflight import EDGE_KINDS, pooled_edge, teacher_edge_counts
from .reprompt import check_prompts_end_with_user_turn
from .teacher import Teacher, build_teacher
from .teacher.checkpoint import hidden_teacher_adapter, load_teacher, save_teacher
from .teacher_batch import TeacherBatch, TeacherBatchBuilder, _Rollout

TEACHER_DIR = "teacher"
# Dataset columns through which TRL feeds images to vision-language models; SDPO's forwards carry no images.
IMAGE_COLUMNS = {"image", "images"}
# GRPO losses normalised by the generation batch's token count (`num_items_in_batch`), the denominator routing shares.
ROUTING_LOSS_TYPES = ("dapo", "cispo", "vespo")
logger = logging.getLogger(__name__)


class _TeacherUpdateCallback(TrainerCallback):
    """Updates the teacher after every optimizer step (docs/teachers.md)."""

    def __init__(self, trainer: SDPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._update_teacher()


class SDPOTrainer(CPUFastPath, DistillationStep, HybridLoss, GRPOTrainer):
    """Self-Distilled Policy Optimization on top of `trl.GRPOTrainer`.

    Accepts every argument of `GRPOTrainer`, plus `sdpo_config` (an `SDPOConfig`, default `SDPOConfig()`). Without
    a distillation term (`SDPOConfig(enabled=False)` or `grpo_weight=1.0`) every step runs TRL's own code, so that
    it trains exactly as GRPOTrainer does, to the bit on any CPU; the CPU savings of generation and scoring
    (`CPUFastPath`) serve the distilling configurations. The loss's steps are the mixins `DistillationStep` and
    `HybridLoss`; the teacher batch is `TeacherBatchBuilder`'s (the module docstring).
    """

    _tag_names = ["trl", "grpo", "sdpo"]

    def __init__(self, *args: Any, sdpo_config: SDPOConfig | None = None, **kwargs: Any):
        if sdpo_config is None:
            sdpo_config = SDPOConfig()
        if not isinstance(sdpo_config, SDPOConfig):
            raise TypeError(f"sdpo_config must be an SDPOConfig, got {type(sdpo_config).__name__}.")
        arguments = inspect.signature(GRPOTrainer.__init__).bind(self, *args, **kwargs)
        if isinstance(arguments.arguments.get("reward_funcs"), list):  # GRPOTrainer edits the list it is given
            arguments.arguments["reward_funcs"] = list(arguments.arguments["reward_funcs"])
        _check_grpo_config(sdpo_config, arguments.arguments.get("args"))
        self.sdpo_config = dataclasses.replace(sdpo_config)  # a private copy: later edits of the caller's do nothing
        self._sdpo_rollout: _Rollout | None = None
        self._last_grad_norm_finite = True
        self._collapse_warned = False
        self._fast_path_notices: set[tuple[str, str]] = set()  # see `CPUFastPath._note_fast_path`
        super().__init__(*arguments.args[1:], **arguments.kwargs)
        _trl_compat.check_trainer_attributes(self)
        self._check_chat_template()
        self._check_supported_inputs()
        # Keep each reward function's returned values, to read the feedback of `Scored` rewards.
        self.reward_funcs = [f if isinstance(f, nn.Module) else record_returns(f) for f in self.reward_funcs]
        if self.sdpo_config.teacher_edge_every is not None and self.accelerator.num_processes > 1:
            raise ValueError(
                f"SDPOConfig.teacher_edge_every={self.sdpo_config.teacher_edge_every} samples each process's own "
                "failed completions, so processes would call generate a different number of times; it runs in one "
                "process only. Set it to None under accelerate launch or torchrun, and measure with `sdpo-rl "
                "preflight` first."
            )
        self.teacher: Teacher | None = None
        if self.sdpo_config.distills:
            self.teacher = build_teacher(self.sdpo_config, self.model)
            self.add_callback(_TeacherUpdateCallback(self))

    def _check_chat_template(self) -> None:
        """Fail at construction, not mid-training, when conversational prompts meet a tokenizer without a template."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or len(dataset) == 0 or not is_conversational(dataset[0]):
            return
        if self.chat_template is None and getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError(
                "The train dataset's prompts are conversational (lists of messages) but the tokenizer "
                f"({type(self._tokenizer).__name__}) has no chat template and GRPOConfig.chat_template is not set. "
                "Use a chat (instruct) model's tokenizer, set tokenizer.chat_template, or give plain-text prompts."
            )

    def _check_supported_inputs(self) -> None:
        """Refuse, at construction, what the distillation loss would silently drop: images and MoE balancing."""
        if not self.sdpo_config.distills:
            return
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
            columns = {c for d in datasets if d is not None for c in (getattr(d, "column_names", None) or [])}
            if columns & IMAGE_COLUMNS:
                raise ValueError(
                    f"The {name} has an image column ({', '.join(sorted(columns & IMAGE_COLUMNS))}), but SDPOTrainer "
                    "supports text prompts only: the teacher prompt and both distillation forwards carry no image "
                    "inputs. Train vision-language data with GRPOTrainer, or drop the image column."
                )
        if _uses_grpo_term(self.sdpo_config) or not self.aux_loss_enabled:
            return
        raise ValueError(
            f"{type(self.accelerator.unwrap_model(self.model)).__name__} is a Mixture-of-Experts model whose "
            f"load-balancing loss (router_aux_loss_coef={self.router_aux_loss_coef}) GRPOTrainer adds to its GRPO "
            "loss, which pure SDPO replaces, so it would be silently dropped. Set "
            "GRPOConfig(router_aux_loss_coef=0.0) to train without it, or keep TRL's loss term with "
            "SDPOConfig(sample_routing=True) or grpo_weight > 0."
        )

    # ---- 1. rewards: keep what the teacher needs -------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        before = snapshot_feedback(self.reward_funcs)
        for func in self.reward_funcs:
            if isinstance(func, ReturnRecorder):
                func.returned = None
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.teacher is not None:
            feedback = collect_feedback(
                self.reward_funcs, self.reward_func_names, before, len(prompts), dataset_feedback(inputs)
            )
            self._sdpo_rollout = _Rollout(list(prompts), list(completion_ids_list), rewards_per_func, feedback)
        return rewards_per_func

    # ---- 2. the batch: teacher prompts -----------------------------------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        batch, teacher_batch = self.rollout_with_teacher_batch(inputs)
        if teacher_batch is not None:
            batch.update(teacher_batch.tensors)
            self._log_teacher_edge(inputs, teacher_batch)
        return batch

    def _log_teacher_edge(self, inputs, teacher_batch: TeacherBatch) -> None:
        """Every `teacher_edge_every` steps, `self_distillation/teacher_edge`: one teacher completion sampled from each
        failed completion's teacher prompt, its pass rate minus the student's on those prompts (`sdpo_rl.preflight`);
        NaN when no failed completion has a teacher prompt."""
        every = self.sdpo_config.teacher_edge_every
        if every is None or not self.model.training or self.state.global_step % every:
            return
        counts = teacher_edge_counts(self, inputs, teacher_batch, teacher_samples=1)
        edge = pooled_edge([counts], EDGE_KINDS)
        self._metrics["train"][TEACHER_EDGE].append(math.nan if edge is None else edge)

    def rollout_with_teacher_batch(self, inputs) -> tuple[dict[str, Any], TeacherBatch | None]:
        """TRL's generation batch of `inputs` and, when SDPO distills, its `TeacherBatch` (None otherwise).

        `_generate_and_score_completions` adds the teacher batch's tensors to TRL's batch; `sdpo_rl.preflight` reads
        its signals and teacher prompts, so that both see the same rollout, rewards, signals and prompts.
        """
        batch = super()._generate_and_score_completions(inputs)
        if self.teacher is None:
            return batch, None
        _trl_compat.check_batch(batch)
        rollout, self._sdpo_rollout = self._sdpo_rollout, None
        if rollout is None:
            raise RuntimeError("SDPOTrainer: the reward step did not run before the batch was built.")
        check_prompts_end_with_user_turn(rollout.prompts)
        if "pixel_values" in batch:
            raise ValueError(
                "This batch carries images (pixel_values), but SDPOTrainer supports text prompts only: the teacher "
                "prompt and both distillation forwards carry no image inputs. Train vision-language data with "
                "GRPOTrainer."
            )
        # A full-copy teacher is built where the student was: on the CPU under DeepSpeed.
        self.teacher.to(self.accelerator.device)
        return batch, self._teacher_batch_builder().build(rollout, batch)

    def _teacher_batch_builder(self) -> TeacherBatchBuilder:
        """The `TeacherBatchBuilder` of the batch being built, in training or evaluation (their group sizes differ)."""
        mode = "train" if self.model.training else "eval"
        template_kwargs = {
            "chat_template": self.chat_template,
            "tools": self.tools or None,
            **self.chat_template_kwargs,
            **self.sdpo_config.apply_chat_template_kwargs,
        }
        return TeacherBatchBuilder(
            config=self.sdpo_config,
            tokenizer=self._tokenizer,
            chat_template_kwargs=template_kwargs,
            accelerator=self.accelerator,
            num_generations=self.num_generations if mode == "train" else self.num_generations_eval,
            reward_weights=self.reward_weights,
            teacher_entropy=self._teacher_entropy,
            metrics=self._metrics[mode],
            logged_prompts=self._logs["extra"]["teacher_prompt"],
        )

    # ---- 3. the loss -----------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """The SDPO loss (`DistillationStep`); with TRL's GRPO loss as a second term, the routed sum or the
        `grpo_weight` blend (`HybridLoss`); without a teacher, TRL's."""
        if self.teacher is None:
            return super()._compute_loss(model, inputs)
        if _uses_grpo_term(self.sdpo_config):
            return self._hybrid_loss(model, inputs)
        return self._self_distillation_loss(model, inputs).loss

    # ---- 4. the optimizer step: skip a non-finite one, then update the teacher ---------------------------------------

    def _get_grad_norm(self, model, grad_norm=None):
        """Note whether the step's gradient norm is finite; if not, drop the gradients so the step changes nothing.

        A NaN/inf gradient would otherwise be applied by the optimizer and corrupt the student, and then the EMA
        teacher. With the gradients set to None, `optimizer.step()` skips every parameter (no weight or optimizer
        state changes); the learning-rate schedule still advances. Under DeepSpeed, its engine owns the gradients
        and only the teacher update is skipped.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self._last_grad_norm_finite = grad_norm is None or math.isfinite(float(grad_norm))
        if not self._last_grad_norm_finite and self.teacher is not None:
            logger.warning(
                "SDPO: step %d has a non-finite gradient norm (%s); its update of the student and the teacher is "
                "skipped.",
                self.state.global_step + 1,
                grad_norm,
            )
            if self.accelerator.distributed_type != DistributedType.DEEPSPEED:
                model.zero_grad(set_to_none=True)
        return grad_norm

    def _update_teacher(self) -> None:
        """EMA step of the teacher; skipped (and counted) when the step's gradient norm was not finite."""
        if self._last_grad_norm_finite:
            self.teacher.update(self.accelerator.unwrap_model(self.model))
        self._metrics["train"][NONFINITE_STEP].append(float(not self._last_grad_norm_finite))

    # ---- 5. logging: warn once when the signs of a collapse appear -------------------------------------------------

    def log(self, logs, start_time=None):
        super().log(logs, start_time)
        if self.teacher is None or self._collapse_warned or not self.model.training:
            return
        signs = collapse_signs(self.state.log_history)
        if signs:
            self._collapse_warned = True
            logger.warning("SDPO may be collapsing: %s. %s", "; ".join(signs), ADVICE)

    # ---- 6. checkpoints: the teacher is saved with every checkpoint and restored on resume (deviation D4) ------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.teacher is not None and self.args.should_save:
            checkpoint = os.path.join(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            save_teacher(self.teacher, os.path.join(checkpoint, TEACHER_DIR), self.sdpo_config.teacher_mode)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Restore the teacher when resuming, once the student, its optimizer and any engine are restored.

        Trainer restores the student in `_load_from_checkpoint` before `accelerator.prepare`, or after it under FSDP;
        under DeepSpeed it calls `deepspeed_load_checkpoint` instead and never reaches `_load_from_checkpoint`. Every
        backend ends here, with the resolved checkpoint path, once per training run and before `on_train_begin`; the
        teacher's weights are by then in the dtype and shards training uses, so its float32 EMA masters are made from
        them and hold the checkpoint's values exactly (docs/teachers.md).
        """
        prepared = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.teacher is not None and resume_from_checkpoint is not None:
            folder = os.path.join(resume_from_checkpoint, TEACHER_DIR)
            if not os.path.isdir(folder):
                raise FileNotFoundError(
                    f"{resume_from_checkpoint} has no {TEACHER_DIR}/ folder, so the SDPO teacher cannot be restored "
                    "(was the checkpoint written by GRPOTrainer or with SDPO disabled?). Resume from an SDPOTrainer "
                    "checkpoint."
                )
            load_teacher(self.teacher, folder, self.sdpo_config.teacher_mode)
        return prepared

    def _save(self, output_dir=None, state_dict=None):
        """Save the student only: a `lora_ema` teacher adapter is kept out of the saved PEFT model."""
        with hidden_teacher_adapter(self.accelerator.unwrap_model(self.model)):
            super()._save(output_dir, state_dict)


def _uses_grpo_term(config: SDPOConfig) -> bool:
    """Whether the loss keeps TRL's GRPO loss as a term (routing or the hybrid), besides the distillation loss."""
    return config.sample_routing or config.grpo_weight > 0.0


def _check_grpo_config(sdpo_config: SDPOConfig, grpo_config) -> None:
    """Refuse GRPOConfig settings that the SDPO loss would silently ignore, or that routing cannot normalise."""
    if not sdpo_config.distills or grpo_config is None:
        return
    if sdpo_config.sample_routing and grpo_config.loss_type not in ROUTING_LOSS_TYPES:
        raise ValueError(
            "SDPOConfig.sample_routing=True needs a GRPO loss normalised by the generation batch's token count, which "
            f"both routed losses share; GRPOConfig.loss_type={grpo_config.loss_type!r} is not. Use loss_type one of "
            f"{', '.join(repr(t) for t in ROUTING_LOSS_TYPES)} (TRL's default is 'dapo'), or "
            "SDPOConfig(grpo_weight=...) for the blended hybrid."
        )
    if _uses_grpo_term(sdpo_config):
        return
    ignored = {
        "beta": grpo_config.beta != 0.0,
        "entropy_coef": grpo_config.entropy_coef != 0.0,
        "use_adaptive_entropy": grpo_config.use_adaptive_entropy,
        "top_entropy_quantile": grpo_config.top_entropy_quantile < 1.0,
    }
    for name, is_set in ignored.items():
        if is_set:
            raise ValueError(
                f"GRPOConfig.{name}={getattr(grpo_config, name)!r} shapes TRL's GRPO loss (a KL penalty, the entropy "
                "bonus or the high-entropy token mask), which pure SDPO replaces, so it would be silently ignored. "
                "Reset it to its default, keep TRL's loss term with SDPOConfig(sample_routing=True) or grpo_weight > "
                "0, or train with GRPO (SDPOConfig(enabled=False))."
            )
