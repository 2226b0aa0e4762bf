"""Every TRL / transformers internal that `SDPOTrainer` relies on, checked once at import.

`SDPOTrainer` includes its mixins (`cpu_fast_path.CPUFastPath`, `distillation.DistillationStep`, `hybrid.HybridLoss`)
and what it hands `teacher_batch.TeacherBatchBuilder`.

`SDPOTrainer` extends `trl.GRPOTrainer` through private methods and attributes that TRL may change in any release.
Listing them here, and checking them when `sdpo_rl` is imported, turns a silent misbehaviour after a TRL upgrade into
one clear error that names the supported versions.
"""

from __future__ import annotations

import inspect

import transformers
import trl
from packaging.version import Version
from transformers import Trainer
from trl import GRPOConfig, GRPOTrainer
from trl import kernels as trl_kernels
from trl.trainer import utils as trl_utils

SUPPORTED_TRL = (Version("1.16.0"), Version("1.17.0"))  # [low, high)
SUPPORTED_TRL_TEXT = ">=1.16.0,<1.17.0"

# Methods we override or call, with the parameters we pass or receive, in order.
GRPO_METHODS = {
    "_generate_single_turn": (
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "num_generations",
        "has_tool_images",
    ),
    "_generate_and_score_completions": ("self", "inputs"),
    "_calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "_compute_loss": ("self", "model", "inputs"),
    "_get_per_token_logps_and_entropies": (
        "self",
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "batch_size",
        "compute_entropy",
        "compute_aux_loss",
    ),
}
TRAINER_METHODS = {
    "_get_grad_norm": ("self", "model", "grad_norm"),
    "_save_checkpoint": ("self", "model", "trial"),
    "_prepare_for_training": ("self", "max_steps", "train_dataloader", "resume_from_checkpoint"),
    "_save": ("self", "output_dir", "state_dict"),
    "_get_output_dir": ("self", "trial"),
}
# Helpers of trl.trainer.utils that sdpo_rl imports.
TRL_UTILS = ("pad", "is_async_callable", "_CHUNKED_LOGPROB_CHUNK_SIZE")
# TRL's chunked log-prob kernel (what its fused LM head runs), which scores the completion tokens that the distillation
# does not: its forward's parameters, in order.
LOGPROB_KERNEL = (
    "ctx",
    "hidden",
    "weight",
    "bias",
    "targets",
    "temperature",
    "chunk_size",
    "final_logit_softcapping",
    "logit_scale",
    "outputs",
)
# Attributes GRPOTrainer.__init__ sets and SDPOTrainer reads; checked on each new trainer (they only exist then).
GRPO_ATTRIBUTES = (
    "accelerator",
    "num_generations",
    "num_generations_eval",
    "temperature",
    "reward_funcs",
    "reward_func_names",
    "reward_weights",
    "chat_template",
    "chat_template_kwargs",
    "tools",
    "aux_loss_enabled",
    "router_aux_loss_coef",
    "_tokenizer",
    "_metrics",
    "_logs",
    "loss_type",
    "epsilon_high",
    "importance_sampling_level",
    "off_policy_mask_threshold",
    "use_vllm",
    "use_transformers_continuous_batching",
    "vllm_importance_sampling_correction",
    "beta",
    "top_entropy_quantile",
    "_entropy_bonus_enabled",
)
# Keys of the batch dict produced by `_generate_and_score_completions` that SDPO reads.
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
# Keys TRL adds to that batch only in some settings, read with `.get`: a rename would silently switch a correction
# off, so the source of TRL's methods is checked for them (`output[...]` where the batch is built, `inputs[...]` or
# `inputs.get(...)` where the loss reads it; routing masks TRL's loss through its `tool_mask`).
OPTIONAL_BATCH_KEYS = ("tool_mask", "old_per_token_logps", "importance_sampling_ratio")
# GRPOConfig fields SDPOTrainer reads.
GRPO_CONFIG_FIELDS = (
    "beta",
    "entropy_coef",
    "use_adaptive_entropy",
    "top_entropy_quantile",
    "loss_type",
    "steps_per_generation",
    "per_device_train_batch_size",
    "max_completion_length",
    "cast_lm_head_to_fp32",
)


class IncompatibleTRLError(ImportError):
    """The installed TRL does not provide what SDPOTrainer builds on."""


def _fail(problem: str) -> None:
    raise IncompatibleTRLError(
        f"sdpo_rl supports trl{SUPPORTED_TRL_TEXT} (found trl {trl.__version__}, transformers "
        f"{transformers.__version__}): {problem}. Install a supported version, e.g. "
        f"pip install 'trl{SUPPORTED_TRL_TEXT}'."
    )


def _check_methods(cls: type, methods: dict[str, tuple[str, ...]]) -> None:
    for name, expected in methods.items():
        method = getattr(cls, name, None)
        if method is None:
            _fail(f"{cls.__name__}.{name} no longer exists")
        parameters = tuple(inspect.signature(method).parameters)[: len(expected)]
        if parameters != expected:
            _fail(f"{cls.__name__}.{name} takes {parameters}, expected {expected}")


def _check_optional_batch_keys() -> None:
    built = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    read = inspect.getsource(GRPOTrainer._compute_loss)
    for key in OPTIONAL_BATCH_KEYS:
        if f'output["{key}"]' not in built:
            _fail(f"GRPOTrainer._generate_and_score_completions no longer sets the batch key {key!r}")
        if f'inputs["{key}"]' not in read and f'inputs.get("{key}")' not in read:
            _fail(f"GRPOTrainer._compute_loss no longer reads the batch key {key!r}")


def check_trl() -> None:
    """Fail with `IncompatibleTRLError` unless the installed TRL has the internals listed above."""
    low, high = SUPPORTED_TRL
    if not low <= Version(trl.__version__) < high:
        _fail("this version is not supported")
    _check_methods(GRPOTrainer, GRPO_METHODS)
    missing_utils = [name for name in TRL_UTILS if not hasattr(trl_utils, name)]
    if missing_utils:
        _fail(f"trl.trainer.utils no longer has {', '.join(missing_utils)}")
    _check_methods(Trainer, TRAINER_METHODS)
    kernel = getattr(trl_kernels, "ChunkedLogProbFunction", None)
    if kernel is None:
        _fail("trl.kernels no longer has ChunkedLogProbFunction")
    _check_methods(kernel, {"forward": LOGPROB_KERNEL})
    _check_optional_batch_keys()
    missing_fields = [name for name in GRPO_CONFIG_FIELDS if name not in GRPOConfig.__dataclass_fields__]
    if missing_fields:
        _fail(f"GRPOConfig no longer has {', '.join(missing_fields)}")
    if getattr(GRPOTrainer, "loss_is_scaled_for_ga", None) is not True:
        _fail("GRPOTrainer no longer scales its loss for gradient accumulation itself (loss_is_scaled_for_ga)")


def check_trainer_attributes(trainer: GRPOTrainer) -> None:
    """Fail unless a freshly built GRPOTrainer has every attribute SDPOTrainer reads."""
    missing = [name for name in GRPO_ATTRIBUTES if not hasattr(trainer, name)]
    if missing:
        _fail(f"GRPOTrainer no longer sets {', '.join(missing)}")


def check_batch(batch: dict) -> None:
    """Fail unless the batch TRL produced has every key SDPO reads."""
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        _fail(f"GRPOTrainer._generate_and_score_completions no longer returns {', '.join(missing)}")


check_trl()
