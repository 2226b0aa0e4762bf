"""The teacher prompt ("reprompt") of SDPO: which signal each completion gets and how it is rendered.

Pure functions, no trainer or model code (docs/how-it-works.md sections 2-3; deviations D1 and D2 in
docs/deviations.md).

Demonstration. Completions come in groups of ``num_generations`` consecutive entries that share a prompt (TRL's
layout). A completion is successful when its reward is ``>= success_reward_threshold`` (a NaN reward never is). The
demonstration for completion ``i`` is the *first* successful completion of ``i``'s group in batch order, skipping
``i`` itself when ``dont_reprompt_on_self_success`` is set, so a successful completion can still learn from a peer's
success. This is the reference's choice: it is deterministic (no RNG state to seed or checkpoint) and every failed
sibling sees the same demonstration. With ``remove_thinking_from_demonstration`` its ``<think>...</think>`` blocks are
removed.

Feedback. A feedback string counts only when it is non-empty after ``strip()``; it is then inserted verbatim (not
stripped, like the reference's ``feedback_raw``, so tracebacks keep their indentation). It is used when
``include_environment_feedback`` is set and, with ``environment_feedback_only_without_solution``, only for
completions without a demonstration.

Text. ``{prompt}`` in the reprompt template is the raw text of the last user turn (D1). For conversational prompts
the earlier turns (system, previous exchanges) are kept as messages, the last user turn is replaced by the reprompt
text and the whole conversation is rendered with the student's chat template and a generation prompt.

Truncation (D2). When the rendered teacher prompt exceeds ``max_reprompt_length`` tokens, only the demonstration and
the feedback are shortened (``"right"`` cuts their end, ``"left"`` their start, on the texts' own token boundaries);
the prompt, the templates' fixed text and the chat scaffolding, generation header included, always stay. The token
budget left by that fixed part is shared so that each of the two texts is guaranteed half of it (the demonstration
gets the odd token) and whatever one of them does not need goes to the other. Because tokenization is not additive,
the result is re-rendered and the budget lowered by the overshoot until it fits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

# The templates the reference's experiments load from its actor.yaml (docs/deviations.md).
DEFAULT_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
DEFAULT_FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
DEFAULT_REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."

REPROMPT_TRUNCATIONS = ("right", "left", "error")
# Non-greedy so that text between two blocks survives; DOTALL because thinking spans lines. Same as the reference.
_THINK_BLOCK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


@dataclass(frozen=True)
class SignalSettings:
    """How :func:`select_teacher_signals` chooses demonstrations and feedback (``SDPOConfig.signal_settings()``).

    Attributes:
        success_reward_threshold: a completion whose reward is ``>=`` this is a success.
        dont_reprompt_on_self_success: never use a completion's own success as its demonstration.
        remove_thinking_from_demonstration: strip ``<think>...</think>`` blocks from the demonstration.
        include_environment_feedback: use non-empty feedback strings.
        environment_feedback_only_without_solution: use feedback only for completions without a demonstration.
    """

    success_reward_threshold: float
    dont_reprompt_on_self_success: bool
    remove_thinking_from_demonstration: bool
    include_environment_feedback: bool
    environment_feedback_only_without_solution: bool


@dataclass(frozen=True)
class TemplateSettings:
    """How :func:`render_teacher_prompt` writes and fits the teacher prompt (``SDPOConfig.template_settings()``).

    Attributes:
        solution_template: the demonstration block, placeholder ``{successful_previous_attempt}``.
        feedback_template: the feedback block, placeholder ``{feedback_raw}``.
        reprompt_template: the teacher's task text, placeholders ``{prompt}``, ``{solution}``, ``{feedback}``.
        max_reprompt_length: the most tokens a rendered teacher prompt may have (>= 1).
        reprompt_truncation: one of :data:`REPROMPT_TRUNCATIONS` (module docstring, D2).
    """

    solution_template: str
    feedback_template: str
    reprompt_template: str
    max_reprompt_length: int
    reprompt_truncation: str

    def __post_init__(self) -> None:
        if self.reprompt_truncation not in REPROMPT_TRUNCATIONS:
            raise ValueError(
                f"TemplateSettings.reprompt_truncation={self.reprompt_truncation!r} is invalid: expected one of "
                f"{REPROMPT_TRUNCATIONS}."
            )
        length = self.max_reprompt_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"TemplateSettings.max_reprompt_length={length!r} is invalid: expected an int >= 1.")


@dataclass(frozen=True)
class TeacherSignal:
    """What the teacher sees beyond the original prompt for one completion.

    ``demonstration_index`` is the index, in the batch given to :func:`select_teacher_signals`, of the peer whose
    completion is the demonstration. ``None`` fields mean "not used"; an empty string is a used, empty text.
    """

    demonstration: str | None
    feedback: str | None
    demonstration_index: int | None

    @property
    def has_signal(self) -> bool:
        """Whether the teacher gets any extra context; completions without one are masked out of the loss."""
        return self.demonstration is not None or self.feedback is not None


@dataclass(frozen=True)
class TeacherPrompt:
    """A rendered teacher prompt; ``truncated`` says whether its demonstration or feedback was shortened to fit."""

    text: str
    input_ids: list[int]
    truncated: bool


def remove_thinking(text: str) -> str:
    """Remove every ``<think>...</think>`` block and the whitespace right after it.

    A demonstration should show the answer, not the peer's (possibly long and wrong-footed) reasoning.
    """
    return _THINK_BLOCK.sub("", text)


def select_teacher_signals(
    completions: Sequence[str],
    rewards: Sequence[float],
    feedback: Sequence[str | None],
    num_generations: int,
    settings: SignalSettings,
) -> list[TeacherSignal]:
    """Choose each completion's demonstration and feedback (rules in the module docstring, options in ``settings``).

    ``completions``, ``rewards`` and ``feedback`` hold one entry per completion, in groups of ``num_generations``
    consecutive entries sharing a prompt. Raises ``ValueError`` when the lengths differ or are not a multiple of
    ``num_generations``.
    """
    if not len(completions) == len(rewards) == len(feedback):
        raise ValueError(
            f"completions, rewards and feedback must have one entry per completion, got lengths "
            f"{len(completions)}, {len(rewards)} and {len(feedback)}"
        )
    if num_generations < 1 or len(completions) % num_generations:
        raise ValueError(
            f"the number of completions ({len(completions)}) must be a positive multiple of num_generations "
            f"({num_generations})"
        )
    # NaN compares False with everything, so a NaN reward is never a success.
    successful = [float(reward) >= settings.success_reward_threshold for reward in rewards]

    signals = []
    for i in range(len(completions)):
        group_start = i - i % num_generations
        demonstration_index = next(
            (
                j
                for j in range(group_start, group_start + num_generations)
                if successful[j] and not (settings.dont_reprompt_on_self_success and j == i)
            ),
            None,
        )
        demonstration = None
        if demonstration_index is not None:
            demonstration = completions[demonstration_index]
            if settings.remove_thinking_from_demonstration:
                demonstration = remove_thinking(demonstration)

        text = feedback[i]
        use_feedback = (
            settings.include_environment_feedback
            and text is not None
            and text.strip() != ""
            and not (settings.environment_feedback_only_without_solution and demonstration is not None)
        )
        signals.append(TeacherSignal(demonstration, text if use_feedback else None, demonstration_index))
    return signals


def without_hindsight(signal: TeacherSignal) -> TeacherSignal:
    """The same signal with its demonstration and feedback emptied: the reprompt's frame, sub-template text kept."""
    return replace(
        signal,
        demonstration=None if signal.demonstration is None else "",
        feedback=None if signal.feedback is None else "",
    )


def build_reprompt_text(prompt_text: str, signal: TeacherSignal, settings: TemplateSettings) -> str:
    """Fill the templates of ``settings`` for one completion; ``{solution}``/``{feedback}`` are "" when the signal
    lacks them.

    Each template is formatted exactly once and ``str.format`` never re-parses substituted values, so braces,
    backslashes and any unicode in the prompt, demonstration or feedback come through literally.
    """
    solution = ""
    if signal.demonstration is not None:
        solution = settings.solution_template.format(successful_previous_attempt=signal.demonstration)
    feedback = ""
    if signal.feedback is not None:
        feedback = settings.feedback_template.format(feedback_raw=signal.feedback)
    return settings.reprompt_template.format(prompt=prompt_text, solution=solution, feedback=feedback)


def check_prompts_end_with_user_turn(prompts: list) -> None:
    """Fail on the first conversational prompt of a batch that does not end with a user turn, naming its row.

    The teacher prompt rewrites the last user turn (D1), so a prompt ending with an assistant or tool turn has no
    place for the demonstration and feedback. Checked for the whole batch, so the error does not depend on which
    completions happen to get a teacher signal.
    """
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            continue
        role = prompt[-1].get("role") if prompt else None
        if role != "user":
            raise ValueError(
                f"The dataset column 'prompt' has a conversational prompt (row {row} of this batch) whose last turn "
                f"has role {role!r}: SDPO writes the demonstration and feedback into the last user turn, so every "
                "prompt must end with a user message. Drop or fix such rows (e.g. remove a trailing assistant turn)."
            )


def _last_user_turn(messages: list[dict]) -> dict:
    """The final message of a conversational prompt, which must be the user turn that the teacher re-asks."""
    if not messages:
        raise ValueError("a conversational prompt needs at least one message")
    role = messages[-1].get("role")
    if role != "user":
        raise ValueError(f"the last turn of a conversational prompt must be a user turn, got role {role!r}")
    return messages[-1]


def last_user_text(prompt: str | list[dict]) -> str:
    """The raw text that fills ``{prompt}`` (D1): the last user turn's text, or the standard prompt itself.

    Content given as a list of parts contributes its ``{"type": "text"}`` parts, joined without separator.
    """
    if isinstance(prompt, str):
        return prompt
    content = _last_user_turn(prompt)["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def teacher_prompt_messages(prompt: str | list[dict], reprompt_text: str) -> str | list[dict]:
    """The teacher's prompt in the student prompt's format.

    Conversational: a new list with the earlier turns unchanged and the last user turn's content replaced by
    ``reprompt_text`` (its other keys kept). Standard: ``reprompt_text`` itself. The input is never mutated.
    """
    if isinstance(prompt, str):
        return reprompt_text
    return [*prompt[:-1], {**_last_user_turn(prompt), "content": reprompt_text}]


def _split_budget(budget: int, demonstration_tokens: int, feedback_tokens: int) -> tuple[int, int]:
    """How many tokens of the demonstration and of the feedback to keep within ``budget`` tokens.

    Each text is guaranteed half the budget (the demonstration gets the odd token); what one does not need goes to
    the other, so a short feedback is never cut because of a long demonstration, nor the other way round.
    """
    budget = max(budget, 0)
    if demonstration_tokens + feedback_tokens <= budget:
        return demonstration_tokens, feedback_tokens
    feedback_share = budget // 2
    if feedback_tokens <= feedback_share:
        return budget - feedback_tokens, feedback_tokens
    if demonstration_tokens <= budget - feedback_share:
        return demonstration_tokens, budget - demonstration_tokens
    return budget - feedback_share, feedback_share


def _shorten(text: str | None, offsets: list[tuple[int, int]], keep: int, side: str) -> str | None:
    """Keep the first (``side="right"``) or last (``"left"``) ``keep`` of the tokens whose character spans are
    ``offsets``.

    Slicing the original string (rather than decoding token ids) gives an exact prefix/suffix of the text, with no
    replacement characters where a token boundary falls inside a multi-byte character. The cut is made at the start
    of the first dropped token (right) or the end of the last dropped one (left), so a character split between a kept
    and a dropped token is dropped rather than half kept.
    """
    if text is None or keep >= len(offsets):
        return text
    if keep <= 0:
        return ""
    if side == "right":
        return text[: offsets[keep][0]]
    return text[offsets[len(offsets) - keep - 1][1] :]


def _offsets(tokenizer, text: str | None) -> list[tuple[int, int]]:
    """Character spans of ``text``'s own tokens (no special tokens); empty for ``None``."""
    if text is None:
        return []
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]


def render_teacher_prompt(
    prompt: str | list[dict],
    signal: TeacherSignal,
    tokenizer,
    settings: TemplateSettings,
    *,
    chat_template_kwargs: dict,
    sample_index: int = 0,
) -> TeacherPrompt:
    """Render and tokenize the teacher prompt for one completion, truncating per D2 (see the module docstring).

    Tokenization matches TRL's for the student's prompt: conversational prompts go through
    ``tokenizer.apply_chat_template(..., add_generation_prompt=True, **chat_template_kwargs)`` and the text is then
    tokenized without adding special tokens; standard prompts are tokenized with the tokenizer's defaults. Pass the
    trainer's ``tools`` / ``chat_template`` in ``chat_template_kwargs`` when the student's prompt used them.
    Truncation needs a fast tokenizer (it uses offset mappings). The tokenizer is never modified.

    Raises ``ValueError``, naming ``sample_index`` and the lengths, when the prompt is too long with
    ``reprompt_truncation="error"`` or does not fit even with the demonstration and feedback emptied.
    """
    max_reprompt_length, reprompt_truncation = settings.max_reprompt_length, settings.reprompt_truncation
    prompt_text = last_user_text(prompt)

    def render(sig: TeacherSignal) -> tuple[str, list[int]]:
        reprompt = build_reprompt_text(prompt_text, sig, settings)
        if isinstance(prompt, str):
            return reprompt, tokenizer(reprompt)["input_ids"]
        text = tokenizer.apply_chat_template(
            teacher_prompt_messages(prompt, reprompt),
            add_generation_prompt=True,
            tokenize=False,
            **chat_template_kwargs,
        )
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    text, ids = render(signal)
    if len(ids) <= max_reprompt_length:
        return TeacherPrompt(text, ids, truncated=False)

    # The fixed part keeps the sub-templates' own text (e.g. "Correct solution:") around an empty demonstration and
    # feedback, since truncation can empty those texts but never drops a section.
    fixed_length = len(render(without_hindsight(signal))[1])
    lengths = (
        f"the teacher prompt of sample {sample_index} has {len(ids)} tokens, its fixed part (prompt, template text and "
        f"chat scaffolding, without demonstration and feedback) {fixed_length}, max_reprompt_length is "
        f"{max_reprompt_length}"
    )
    if fixed_length > max_reprompt_length:
        raise ValueError(
            f"{lengths}: it cannot fit even with the demonstration and feedback removed; raise max_reprompt_length "
            f"or shorten the prompt or the templates"
        )
    if reprompt_truncation == "error":
        raise ValueError(
            f"{lengths}: raise max_reprompt_length or set reprompt_truncation to 'right' or 'left' to shorten the "
            f"demonstration and feedback"
        )

    demonstration_offsets = _offsets(tokenizer, signal.demonstration)
    feedback_offsets = _offsets(tokenizer, signal.feedback)
    budget = max_reprompt_length - fixed_length
    # Terminates: the budget drops by at least one token per round, and a budget of 0 renders the fixed part.
    while True:
        keep_demonstration, keep_feedback = _split_budget(budget, len(demonstration_offsets), len(feedback_offsets))
        shortened = replace(
            signal,
            demonstration=_shorten(
                signal.demonstration, demonstration_offsets, keep_demonstration, reprompt_truncation
            ),
            feedback=_shorten(signal.feedback, feedback_offsets, keep_feedback, reprompt_truncation),
        )
        text, ids = render(shortened)
        if len(ids) <= max_reprompt_length:
            return TeacherPrompt(text, ids, truncated=True)
        budget -= len(ids) - max_reprompt_length
