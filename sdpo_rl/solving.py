"""Test-time self-distillation: search for a solution to one hard problem, learning from the failed attempts.

`solve` points SDPO at a single prompt (the SDPO paper's test-time setting): each round samples
`attempts_per_round` completions from the current model and scores them with the reward function; the search stops
at the first success, otherwise one SDPO step is taken, whose teacher reads the feedback of the failed attempts. It
is an `SDPOTrainer` on a one-row dataset (one optimizer step per round), so the loss, the teacher prompt and the
teacher are the trainer's. GRPO could not learn here: until the first success every reward is 0.

`best_of_k` and `multi_turn` are the baselines with the same attempt budget and result type: sampling the unchanged
model until a success, and conversations that append each failed attempt and its feedback and ask again.

Counting. Attempts are numbered in sampling order (round by round, in each round's order); `SolveResult.attempts`
is the number of the first successful attempt, as if attempts were made one at a time (a round is scored in one
call of the reward function, and the attempts after the first success of that round are not counted), or the whole
budget when none succeeded. No method ever scores more than `max_attempts` attempts: a last round with fewer
attempts left samples a full round but scores (and counts) only as many as are left.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback
from trl.trainer.utils import is_async_callable

from .config import SDPOConfig
from .feedback import ReturnRecorder, Scored, collect_feedback, snapshot_feedback
from .model_state import restored
from .reprompt import TeacherSignal, build_reprompt_text, last_user_text

# Sampling settings shared by every method (TRL's defaults: temperature 1, no top-k or top-p).
TEMPERATURE = 1.0
DEFAULT_LEARNING_RATE = 1e-5
DEFAULT_MAX_COMPLETION_LENGTH = 256


@dataclass
class Round:
    """One round of a search: its scored attempts, their rewards and feedback, and the step taken after it."""

    attempts: list[str]
    rewards: list[float]
    feedback: list[str]
    loss: float | None = None  # the SDPO step's loss after this round; None when no step followed it


@dataclass
class SolveResult:
    """The outcome of `solve`, `best_of_k` or `multi_turn`."""

    method: str
    solved: bool
    solution: str | None  # the first successful completion's text
    attempts: int  # the number of the first successful attempt, else every attempt scored
    max_attempts: int
    best_reward: float
    steps: int = 0  # SDPO optimizer steps taken (always 0 for the baselines)
    rounds: list[Round] = field(default_factory=list)


class _SearchOver(Exception):
    """Raised from the reward function to end `SDPOTrainer.train()` before a step that no round would use."""


class _Search:
    """The bookkeeping shared by every method: scores rounds, numbers attempts, stops, shows progress."""

    def __init__(self, method: str, problem: Problem, max_attempts: int, threshold: float, require_feedback: bool,
                 progress: bool):  # fmt: skip
        from tqdm.auto import tqdm

        self.method, self.problem, self.max_attempts = method, problem, max_attempts
        self.threshold, self.require_feedback = threshold, require_feedback
        self.name = getattr(problem.reward_func, "__name__", type(problem.reward_func).__name__)
        self.used = 0
        self.solution: str | None = None
        self.best = -math.inf
        self.steps = 0
        self.rounds: list[Round] = []
        self.bar = tqdm(total=max_attempts, desc=method, unit="attempt", disable=not progress, dynamic_ncols=True)

    @property
    def done(self) -> bool:
        return self.solution is not None or self.used >= self.max_attempts

    def score(self, texts: list[str], completion_ids: list[list[int]]) -> list[Scored]:
        """Score the first attempts of a round that fit in the budget; record the round and any success."""
        left = self.max_attempts - self.used
        texts, completion_ids = texts[:left], completion_ids[:left]
        rewards, feedback = self._call_reward(texts, completion_ids)
        first = next((i for i, r in enumerate(rewards) if r >= self.threshold), None)  # NaN is never a success
        if first is None and self.require_feedback and not any(f.strip() for f in feedback):
            raise ValueError(
                f"reward_func {self.name!r} gave no feedback for any of the {len(texts)} failed attempts of round "
                f"{len(self.rounds) + 1}, so the {self.method} method has nothing to learn from. Give feedback with "
                "Scored(value, feedback) items or a fresh `last_feedback` list (docs/rewards.md), or use best_of_k."
            )
        self.rounds.append(Round(list(texts), rewards, feedback))
        self.used += len(texts) if first is None else first + 1
        if first is not None:
            self.solution = texts[first]
        self.best = max([self.best, *(r for r in rewards if not math.isnan(r))])
        self.bar.update(self.used - self.bar.n)
        self.bar.set_postfix(best_reward=f"{self.best:.3g}")
        return [Scored(r, f) for r, f in zip(rewards, feedback, strict=True)]

    def _call_reward(self, texts: list[str], completion_ids: list[list[int]]) -> tuple[list[float], list[str]]:
        """Call the reward function as the trainer does; its rewards (None -> NaN) and feedback."""
        count = len(texts)
        problem = self.problem
        recorder = ReturnRecorder(problem.reward_func)
        before = snapshot_feedback([problem.reward_func])
        try:
            values = recorder(
                prompts=[problem.messages] * count,
                completions=[[{"role": "assistant", "content": text}] for text in texts],
                completion_ids=completion_ids,
                **{name: [value] * count for name, value in problem.columns.items()},
            )
        except Exception as error:
            raise RuntimeError(
                f"reward_func {self.name!r} raised {type(error).__name__} ({error}) while scoring {count} attempts "
                "(it is called with prompts=, completions=, completion_ids= and the columns "
                f"{sorted(problem.columns)}). "
                "Fix the reward function; try it on one completion first."
            ) from error
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != count:
            raise ValueError(
                f"reward_func {self.name!r} returned {values!r} for {count} attempts: return a list with one float "
                "(or Scored) per completion."
            )
        try:
            rewards = [math.nan if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise TypeError(
                f"reward_func {self.name!r} returned {values!r}: every reward must be a number, Scored or None."
            ) from None
        return rewards, collect_feedback([recorder], [self.name], before, count)

    def result(self) -> SolveResult:
        self.bar.close()
        return SolveResult(
            method=self.method,
            solved=self.solution is not None,
            solution=self.solution,
            attempts=self.used,
            max_attempts=self.max_attempts,
            best_reward=self.best,
            steps=self.steps,
            rounds=self.rounds,
        )


class _TrainerReward:
    """The trainer's reward function: scores through the search, and ends training when the search is over.

    TRL's dataset columns, `trainer_state`, `log_extra` and `log_metric` are not forwarded: the user's reward
    function gets the same arguments as in the baselines (the problem's `columns`).
    """

    def __init__(self, search: _Search):
        self.search = search
        self.__name__ = search.name

    def __call__(self, prompts, completions, completion_ids, **trainer_arguments):
        values = self.search.score([_text(c) for c in completions], completion_ids)
        if self.search.done:
            raise _SearchOver
        return values


class _RecordSteps(TrainerCallback):
    """Counts the optimizer steps and puts each step's logged loss on the round it learned from."""

    def __init__(self, search: _Search):
        self.search = search

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.search.steps += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.search.rounds[-1].loss = float(logs["loss"])


def _text(completion: Any) -> str:
    """The text of a completion in TRL's conversational or plain format."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if isinstance(m.get("content"), str))


# ---- argument checks ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}: {fix}.")


def check_budget(
    max_attempts: Any,
    attempts_per_round: Any,
    minimum: int,
    names: tuple[str, str] = ("max_attempts", "attempts_per_round"),
) -> None:
    """Check the attempt budget: integers, `attempts_per_round` >= `minimum` (2 for SDPO: a group needs peers) and
    <= `max_attempts`. `names` are the names the errors use (the CLI passes its flags)."""
    total, per_round = names
    _check_int(per_round, attempts_per_round, minimum, "sample at least that many attempts per round")
    _check_int(total, max_attempts, 1, "give a positive attempt budget")
    if max_attempts < attempts_per_round:
        raise ValueError(
            f"{total} ({max_attempts}) must be >= {per_round} ({attempts_per_round}): raise {total} or set "
            f"{per_round} <= {max_attempts}."
        )


@dataclass(frozen=True)
class Problem:
    """The problem a search works on: the prompt as chat messages ending with the user turn, the reward function,
    and this problem's dataset columns, passed to the reward function with every attempt. `of` checks and builds it."""

    messages: list[dict]
    reward_func: Callable
    columns: dict[str, Any]

    @classmethod
    def of(cls, prompt: str | list[dict], reward_func: Callable, columns: dict[str, Any] | None) -> Problem:
        """The problem of a method's `prompt`, `reward_func` and `columns` arguments; errors name the argument."""
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = [dict(m) for m in prompt]
            if messages[-1].get("role") != "user":
                raise ValueError(
                    f"prompt must end with a user turn, got a last turn with role {messages[-1].get('role')!r}: the "
                    "problem is the last user message."
                )
        else:
            raise TypeError(f"prompt must be a str or a non-empty list of chat messages (dicts), got {prompt!r}.")
        if not callable(reward_func) or isinstance(reward_func, type):
            raise TypeError(f"reward_func must be a reward function (callable), got {reward_func!r}.")
        if columns is None:
            columns = {}
        if not isinstance(columns, dict) or not all(isinstance(k, str) for k in columns):
            raise TypeError(
                f"columns must be a dict of dataset column name -> this problem's value (e.g. {{'tests': [...]}}), "
                f"got {columns!r}."
            )
        reserved = {"prompts", "completions", "completion_ids"} & set(columns)
        if reserved:
            raise ValueError(f"columns may not be named {sorted(reserved)}: the reward function gets those itself.")
        return cls(messages, reward_func, dict(columns))


def _open(
    caller: str,
    model,
    tokenizer,
    problem: Problem,
    *,
    max_attempts: Any,
    attempts_per_round: Any,
    max_completion_length: Any,
    seed: Any,
    threshold: float,
    progress: bool,
) -> _Search:
    """The opening every method shares: check the model, the tokenizer and the settings, and start the search.

    `caller` is the public function (`solve`, `best_of_k`, `multi_turn`); SDPO's rounds need two attempts or more (a
    group needs peers), and every method but best-of-k learns from feedback, so it must be given.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "generate"):
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module with generate), got {model!r}.")
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"tokenizer must be the model's tokenizer (with a chat template), got {tokenizer!r}.")
    if is_async_callable(problem.reward_func):
        raise TypeError(
            f"reward_func {problem.reward_func!r} is async; {caller} calls it synchronously. Pass a sync function "
            "(e.g. the function that sdpo_rl.rewards.AsyncReward wraps)."
        )
    check_budget(max_attempts, attempts_per_round, 2 if caller == "solve" else 1)
    _check_int("max_completion_length", max_completion_length, 1, "allow at least one generated token")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    method = "sdpo" if caller == "solve" else caller
    return _Search(method, problem, max_attempts, threshold, caller != "best_of_k", progress)


# ---- SDPO ----------------------------------------------------------------------------------------------------------


def solve(
    model,
    tokenizer,
    prompt: str | list[dict],
    reward_func: Callable,
    *,
    max_attempts: int,
    attempts_per_round: int = 8,
    sdpo_config: SDPOConfig | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    peft_config=None,
    seed: int = 0,
    progress: bool = True,
    columns: dict[str, Any] | None = None,
    max_completion_length: int = DEFAULT_MAX_COMPLETION_LENGTH,
) -> SolveResult:
    """Search for a completion of `prompt` that `reward_func` accepts, taking an SDPO step after every failed round.

    `prompt` is the problem (a user message, or a list of chat messages ending with one); `reward_func` a reward
    function as for training, called with `prompts`, `completions` (conversational), `completion_ids` and every
    entry of `columns` (this problem's dataset columns, e.g. `{"tests": [...]}` for `CodeTestsReward`), one value per
    attempt. It must give feedback (`Scored(value, feedback)` items or `last_feedback`): success is a reward >=
    `sdpo_config.success_reward_threshold`, and the teacher learns from the failures' feedback. `sdpo_config`
    defaults to `SDPOConfig()`, or `SDPOConfig(teacher_mode="lora_ema")` with a `peft_config`.

    The caller's model is never changed. Without `peft_config` a copy of it is trained (one more copy of the
    weights in memory, besides the EMA teacher's). With one (e.g. `peft.LoraConfig`, also with `modules_to_save` or
    `trainable_token_indices`), the adapter is added to the caller's model for the search, whose base weights stay
    frozen; afterwards, also after an error, every module is the same object with the same attributes as before, the
    config too, and the `requires_grad` flags and train/eval mode are restored (docs/test-time.md). The tokenizer is
    copied. Like `transformers.Trainer`, it seeds the global random number generators (`seed`). Rounds sample at
    temperature 1 with up to `max_completion_length` tokens.
    """
    from datasets import Dataset

    from .trainer import SDPOTrainer

    problem = Problem.of(prompt, reward_func, columns)
    sdpo_config = _sdpo_config(sdpo_config, peft_config)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}: e.g. 1e-5.")
    search = _open(
        "solve", model, tokenizer, problem, max_attempts=max_attempts, attempts_per_round=attempts_per_round,
        max_completion_length=max_completion_length, seed=seed, threshold=sdpo_config.success_reward_threshold,
        progress=progress,
    )  # fmt: skip
    on_cpu = next(model.parameters()).device.type == "cpu"
    with tempfile.TemporaryDirectory(prefix="sdpo-solve-") as output_dir, _student(model, peft_config) as student:
        trainer = SDPOTrainer(
            model=student,
            args=_grpo_config(
                output_dir,
                math.ceil(max_attempts / attempts_per_round),
                attempts_per_round,
                learning_rate,
                max_completion_length,
                seed,
                on_cpu,
            ),  # fmt: skip
            sdpo_config=sdpo_config,
            processing_class=copy.deepcopy(tokenizer),
            reward_funcs=[_TrainerReward(search)],
            train_dataset=Dataset.from_list([{"prompt": problem.messages}]),
            peft_config=peft_config,
            callbacks=[_RecordSteps(search)],
        )
        _quiet(trainer)
        try:
            trainer.train()
        except _SearchOver:
            pass
        if not search.done:
            raise RuntimeError(f"SDPOTrainer stopped after {search.used} attempts, before the search was over.")
    return search.result()


def _sdpo_config(sdpo_config: SDPOConfig | None, peft_config) -> SDPOConfig:
    if sdpo_config is None:
        return SDPOConfig(teacher_mode="lora_ema") if peft_config is not None else SDPOConfig()
    if not isinstance(sdpo_config, SDPOConfig):
        raise TypeError(f"sdpo_config must be an SDPOConfig or None, got {sdpo_config!r}.")
    if not sdpo_config.distills:
        raise ValueError(
            f"sdpo_config={sdpo_config!r} does not distil (enabled=False or grpo_weight=1): until the first success "
            "every reward is 0, so GRPO alone learns nothing. Use SDPOConfig() or a grpo_weight < 1."
        )
    return sdpo_config


def _grpo_config(output_dir, rounds, attempts_per_round, learning_rate, max_length, seed, on_cpu):
    """One prompt per step, `attempts_per_round` completions of it, one optimizer step per round, constant rate."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir,
        max_steps=rounds,
        per_device_train_batch_size=attempts_per_round,
        num_generations=attempts_per_round,
        max_completion_length=max_length,
        temperature=TEMPERATURE,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        beta=0.0,
        seed=seed,
        activation_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=on_cpu,
        **({"bf16": False} if on_cpu else {}),
    )


def _quiet(trainer) -> None:
    """Remove the trainer's own progress bar and printed logs: the search shows its own bar."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


@contextmanager
def _student(model, peft_config):
    """The model the trainer trains: a copy of `model`, or, with a PEFT config, `model` itself, restored afterwards.

    PEFT and TRL change the model in place: adapter layers and wrappers (`modules_to_save`, trainable tokens) replace
    its modules inside their parents, TRL's fused head sets a `forward` attribute, PEFT a `peft_config`, and the base
    weights are frozen. On exit (also after an error) every module's attributes are put back as they were (`restored`)
    and every parameter's `requires_grad` flag; the base weights themselves are never trained. An error in the search
    propagates; one in the restoring is raised after it, chained to it.
    """
    if peft_config is None:
        yield copy.deepcopy(model)
        return
    with restored(model, who="solve"):
        yield model


# ---- baselines -----------------------------------------------------------------------------------------------------


def best_of_k(
    model,
    tokenizer,
    prompt: str | list[dict],
    reward_func: Callable,
    *,
    max_attempts: int,
    attempts_per_round: int = 8,
    success_reward_threshold: float | None = None,
    seed: int = 0,
    progress: bool = True,
    columns: dict[str, Any] | None = None,
    max_completion_length: int = DEFAULT_MAX_COMPLETION_LENGTH,
) -> SolveResult:
    """Sample the unchanged model, `attempts_per_round` at a time, until an attempt succeeds or the budget is spent.

    Arguments as for `solve`; success is a reward >= `success_reward_threshold` (default: `SDPOConfig`'s). Feedback
    is recorded but not used. The model is not changed (sampling runs in eval mode, restored afterwards) and the
    global random state is left as it was.
    """
    search = _open(
        "best_of_k", model, tokenizer, Problem.of(prompt, reward_func, columns), max_attempts=max_attempts,
        attempts_per_round=attempts_per_round, max_completion_length=max_completion_length, seed=seed,
        threshold=_success(success_reward_threshold), progress=progress,
    )  # fmt: skip
    while not search.done:
        prompts = [search.problem.messages]
        texts = _sample(model, tokenizer, prompts, attempts_per_round, max_completion_length, seed, search)
        search.score(texts, _token_ids(tokenizer, texts))
    return search.result()


def multi_turn(
    model,
    tokenizer,
    prompt: str | list[dict],
    reward_func: Callable,
    *,
    max_attempts: int,
    attempts_per_round: int = 8,
    sdpo_config: SDPOConfig | None = None,
    seed: int = 0,
    progress: bool = True,
    columns: dict[str, Any] | None = None,
    max_completion_length: int = DEFAULT_MAX_COMPLETION_LENGTH,
) -> SolveResult:
    """In-context learning from feedback: `attempts_per_round` conversations, each retrying after its own feedback.

    Each round samples one attempt per conversation; a failed attempt is appended as an assistant turn, followed by a
    user turn with the text SDPO's teacher would read for it (`sdpo_config`'s reprompt with the feedback and no
    demonstration: the problem, the feedback, "Correctly solve the original question."). A conversation longer than
    `sdpo_config.max_reprompt_length` tokens loses its oldest attempts (with their feedback) until it fits; the
    original prompt always stays. Otherwise as `best_of_k`; the reward function must give feedback.
    """
    problem = Problem.of(prompt, reward_func, columns)
    if sdpo_config is not None and not isinstance(sdpo_config, SDPOConfig):
        raise TypeError(f"sdpo_config must be an SDPOConfig or None, got {sdpo_config!r}.")
    config = sdpo_config or SDPOConfig()
    search = _open(
        "multi_turn", model, tokenizer, problem, max_attempts=max_attempts, attempts_per_round=attempts_per_round,
        max_completion_length=max_completion_length, seed=seed, threshold=config.success_reward_threshold,
        progress=progress,
    )  # fmt: skip
    messages = problem.messages
    conversations = [list(messages) for _ in range(attempts_per_round)]
    while not search.done:
        texts = _sample(model, tokenizer, conversations, 1, max_completion_length, seed, search)
        scored = search.score(texts, _token_ids(tokenizer, texts))
        for conversation, text, value in zip(conversations, texts, scored, strict=False):
            retry = build_reprompt_text(
                last_user_text(messages),
                TeacherSignal(None, value.feedback if value.feedback.strip() else None, None),
                config.template_settings(),
            )
            conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": retry}]
            _fit(conversation, len(messages), tokenizer, config.max_reprompt_length)
    return search.result()


def _success(threshold: float | None) -> float:
    if threshold is None:
        return SDPOConfig().success_reward_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise TypeError(f"success_reward_threshold must be a number or None, got {threshold!r}.")
    return float(threshold)


def _sample(model, tokenizer, prompts, per_prompt, max_length, seed, search) -> list[str]:
    """One round of attempts (`per_prompt` for each prompt), seeded by the seed and the round number."""
    from .evaluation import sample_completions

    groups = sample_completions(
        model,
        tokenizer,
        prompts,
        samples_per_prompt=per_prompt,
        temperature=TEMPERATURE,
        max_new_tokens=max_length,
        seed=seed * 1_000_003 + len(search.rounds),
    )
    return [text for group in groups for text, _ in group]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _fit(conversation: list[dict], kept: int, tokenizer, max_length: int) -> None:
    """Drop the oldest (attempt, feedback) pairs after the first `kept` messages until the chat fits `max_length`."""

    def length() -> int:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    while len(conversation) > kept and length() > max_length:
        del conversation[kept : kept + 2]
