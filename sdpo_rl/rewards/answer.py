"""`AnswerMatchReward`: compare the completion's final answer with the dataset's, with feedback that never reveals it.

Leak rule: the fixed feedback texts contain no digits, and the only completion-dependent text, the model's own
answer, is quoted only when it does not contain the expected answer (case-insensitively, also after removing commas
or normalising). Expected "12", answered "123": the feedback says "Your final answer is incorrect." without the quote.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ..feedback import Scored
from .base import FeedbackReward, dataset_column
from .judge import shorten

NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|-?\d+(?:\.\d+)?")
BOXED = "\\boxed{"
NO_ANSWER_FEEDBACK = "No final answer found: end your response with the final answer, e.g. as \\boxed{...}."
NO_MATCH_FEEDBACK = "No final answer found in the required format."
WRONG_FEEDBACK = 'Your answer "{answer}" is incorrect.'
WRONG_UNQUOTED_FEEDBACK = "Your final answer is incorrect."
MAX_QUOTE_CHARS = 80


def last_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth = 1
    for position in range(start + len(BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start + len(BOXED) : position]
    return None


def extract_answer(text: str, pattern: re.Pattern | None = None) -> str | None:
    """The final answer in `text`: the last match of `pattern` (its first group if it has one); without a pattern,
    the last `\\boxed{}` content, else the last number. None when there is none."""
    if pattern is not None:
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        return matches[-1].group(1) if pattern.groups else matches[-1].group(0)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Comparable form: surrounding spaces, `$` and a final period removed, whitespace collapsed, case folded; a
    number loses its thousands commas and trailing zeros (" $1,234.50. " -> "1234.5")."""
    text = " ".join(answer.strip().strip("$").strip().rstrip(".").split()).casefold()
    if NUMBER.fullmatch(text):
        value = Decimal(text.replace(",", ""))
        text = format(value.normalize() if value != 0 else Decimal(0), "f")
    return text


def answer_forms(answer: str) -> set[str]:
    """The ways an answer may be written that feedback must not contain."""
    folded = answer.strip().casefold()
    return {form for form in (folded, folded.replace(",", ""), normalize_answer(answer)) if form}


def reveals(text: str, answer: str) -> bool:
    """Whether `text` contains `answer` in any of the forms of `answer_forms`."""
    views = answer_forms(text) | {text.casefold()}
    return any(form in view for form in answer_forms(answer) for view in views)


def wrong_answer_feedback(given: str, expected: str) -> str:
    quote = shorten(given.strip(), MAX_QUOTE_CHARS)
    return WRONG_UNQUOTED_FEEDBACK if reveals(quote, expected) else WRONG_FEEDBACK.format(answer=quote)


class AnswerMatchReward(FeedbackReward):
    """Score 1.0 when the completion's final answer equals the dataset's `answer` column after `normalize_answer`,
    else 0.0. The final answer is the last match of `pattern` (a regex; its first group if it has one), else the
    last `\\boxed{}`, else the last number. Feedback ("" when correct): "No final answer found..." or 'Your answer
    "..." is incorrect.' — never the expected answer (see the module docstring for the rule)."""

    __name__ = "answer_match_reward"

    def __init__(self, pattern: str | re.Pattern | None = None, answer_column: str = "answer"):
        super().__init__()
        try:
            self.pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        except re.error as error:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {error}.") from None
        if self.pattern is not None and not isinstance(self.pattern, re.Pattern):
            raise TypeError(f"pattern must be a regex string or re.Pattern, got {type(pattern).__name__}.")
        self.answer_column = answer_column

    def score(self, texts: list[str], columns: Mapping[str, Any]) -> list[Scored]:
        expected_answers = dataset_column(columns, self.answer_column, len(texts), type(self).__name__)
        return [
            self.score_one(text, str(expected), row)
            for row, (text, expected) in enumerate(zip(texts, expected_answers, strict=True))
        ]

    def score_one(self, text: str, expected: str, row: int = 0) -> Scored:
        if not normalize_answer(expected):
            raise ValueError(f"Row {row} of the column {self.answer_column!r} is empty ({expected!r}).")
        given = extract_answer(text, self.pattern)
        if given is None:
            return Scored(0.0, NO_MATCH_FEEDBACK if self.pattern is not None else NO_ANSWER_FEEDBACK)
        if normalize_answer(given) == normalize_answer(expected):
            return Scored(1.0, "")
        return Scored(0.0, wrong_answer_feedback(given, expected))
