"""`CPUFastPath`: the CPU savings of TRL's sampling and scoring, for the distilling configurations.

On a CPU TRL's fused head projects every prompt position too, and its sampling and forwards run each group's shared
prompt once per completion. This mixin of `SDPOTrainer` overrides TRL's `_generate_single_turn` (each distinct
prompt prefilled once, `generation.prompts_prefilled_once`) and `_get_per_token_logps_and_entropies` (the completion
tokens only, each distinct prompt run once where `_shares_prompts`), with the same values up to float rounding
(docs/verification.md). Without a distillation term both are TRL's own code, so that training is exactly GRPO's.

It also receives the one-pass hybrid's scores (`scored_completions`, `sdpo_rl.hybrid`), and logs which fast path
runs (`_note_fast_path`, in `_fast_path_notices`, a set `SDPOTrainer.__init__` makes). It reads the trainer's
`sdpo_config`, `accelerator`, `temperature`, `args` and `_metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as TRL_LOGPROB_VOCAB_CHUNK

from .forward import completion_hidden, linear_head, logit_scale, logit_softcap, prompt_sharing_blocker
from .generation import prompts_prefilled_once
from .metrics import PROMPT_SHARING

logger = logging.getLogger(__name__)


class CPUFastPath:
    """TRL's sampling and completion scoring, each distinct prompt run once and the completion tokens alone scored on
    a CPU (the module docstring); a mixin placed before `GRPOTrainer`."""

    # The one-pass hybrid's log-probs and entropies of the completions while `scored_completions` holds them.
    _handed_scores: tuple[torch.Tensor, torch.Tensor] | None = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's sampling, with `generation.prompts_prefilled_once` on the model TRL unwraps for it where prompts are
        shared (`_shares_prompts`; TRL turns gradient checkpointing off to generate) and TRL samples text prompts with
        transformers' `generate`. Without a distillation term, TRL's alone (the module docstring)."""
        student = self.accelerator.unwrap_model(self.model_wrapped)
        prefills_once = (
            self.sdpo_config.distills
            and not (
                self.use_vllm or self.use_transformers_continuous_batching or images is not None or multimodal_fields
            )
            and self._shares_prompts(student, training_forward=False)
        )
        with prompts_prefilled_once(student) if prefills_once else nullcontext():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )

    def _shares_prompts(self, model, training_forward: bool = True) -> bool:
        """Whether forwards of the student's model run each distinct prompt once (`forward.completion_hidden`; in
        generation, `generation.prompts_prefilled_once`): on a CPU in one process, where it is measured; for a model
        `forward.prompt_sharing_blocker` allows (attention-only caches); and, for a `training_forward`, not under
        gradient checkpointing, which turns the key/value cache off (TRL turns it off to generate; the teachers run in
        eval mode, where it does not apply). On a CPU in one process it logs `PROMPT_SHARING` (`_note_fast_path`)."""
        if self.accelerator.device.type != "cpu" or self.accelerator.num_processes != 1:
            return False
        student = self.accelerator.unwrap_model(model)
        blocker = prompt_sharing_blocker(student)
        if blocker is None and training_forward:
            if any(getattr(module, "gradient_checkpointing", False) for module in student.modules()):
                blocker = "gradient checkpointing turns the key/value cache off in the student's training forwards"
        self._note_fast_path(PROMPT_SHARING, "Running each distinct prompt once", blocker)
        return blocker is None

    def _note_fast_path(self, metric: str, fast_path: str, blocker: str | None) -> None:
        """Log `metric` 1 where `fast_path` runs and 0 where `blocker` turns it off; the first time each blocker does,
        one info line naming it."""
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][metric].append(float(blocker is None))
        if blocker is not None and (metric, blocker) not in self._fast_path_notices:
            self._fast_path_notices.add((metric, blocker))
            logger.info("%s is off (%s logs 0): %s.", fast_path, metric, blocker)

    @contextmanager
    def scored_completions(self, logps: torch.Tensor, entropies: torch.Tensor) -> Iterator[None]:
        """Inside, `_get_per_token_logps_and_entropies` returns these ``[B, T]`` log-probs and entropies of the
        completions instead of running a forward: the hand-off of the one-pass hybrid (`sdpo_rl.hybrid`), whose one
        student forward computed them, to TRL's `_compute_loss`, which computes its loss and metrics from them."""
        self._handed_scores = (logps, entropies)
        try:
            yield
        finally:
            self._handed_scores = None

    def _score_completion_tokens(self, hidden, head: nn.Linear, completion_ids, where, logps, entropies=None):
        """`logps` and `entropies` ``[B, T]`` with the tokens `where` set to their log-probs and entropies under
        ``logit_scale * cap(head(hidden)) / temperature`` (``cap``: the model's soft cap, or none); `entropies` None:
        not computed.

        TRL's chunked kernel with TRL's precision settings computes them, as its fused head does; `masked_scatter`
        keeps the result connected to the model when `where` is empty, as TRL's own compact scoring does.
        """
        cast_to_float32 = self.args.cast_lm_head_to_fp32
        outputs = ("entropy",) if entropies is not None else ()
        student = self.accelerator.unwrap_model(self.model)
        with torch.autocast(hidden.device.type, enabled=False) if cast_to_float32 else self.accelerator.autocast():
            token_logps, token_entropies, *_ = ChunkedLogProbFunction.apply(
                hidden[where].float() if cast_to_float32 else hidden[where],
                head.weight,
                None,
                completion_ids[where],
                self.temperature,
                TRL_LOGPROB_VOCAB_CHUNK,
                logit_softcap(student),
                logit_scale(student),
                outputs,
            )
        logps = logps.masked_scatter(where, token_logps.to(logps.dtype))
        if entropies is not None:
            entropies = entropies.masked_scatter(where, token_entropies.to(entropies.dtype))
        return logps, entropies

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **model_inputs,
    ):
        """TRL's per-token log-probs and entropies of the completions: those handed over by `scored_completions`;
        else, on a CPU, of the completion tokens only; else TRL's.

        TRL's fused head projects the prompt positions too where it has no Triton kernel (a CPU among them), so that
        compiled backends see one tile shape; a CPU compiles nothing, and skipping the prompt positions skips most
        of the head's work, with the same values up to float rounding. The backbone runs each group's prompt once
        where `_shares_prompts`. Images, an MoE aux loss, a head that is not a plain linear layer or no distillation
        term (the module docstring) go to TRL's.
        """
        if self._handed_scores is not None:
            logps, entropies = self._handed_scores
            return logps, entropies, None
        head = linear_head(self.accelerator.unwrap_model(model))
        text_only = all(value is None for value in model_inputs.values())
        trls = not self.sdpo_config.distills or head is None or compute_aux_loss or not text_only
        if trls or input_ids.device.type != "cpu":
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **model_inputs,
            )
        batch_size = batch_size or input_ids.size(0)
        share_prompts = self._shares_prompts(model)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            with self.accelerator.autocast():
                hidden = completion_hidden(model, head, ids, mask, logits_to_keep, share_prompts)
            scored = mask[:, -logits_to_keep:] > 0
            zeros = hidden.new_zeros(scored.shape, dtype=torch.float32)
            logps, entropies = self._score_completion_tokens(
                hidden, head, ids[:, -logits_to_keep:], scored, zeros, zeros if compute_entropy else None
            )
            all_logps.append(logps)
            all_entropies.append(entropies)
        return torch.cat(all_logps), torch.cat(all_entropies) if compute_entropy else None, None
