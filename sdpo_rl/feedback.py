"""Collect per-completion environment feedback from reward functions and from the dataset.

A reward function gives feedback by assigning a new list to its `last_feedback` attribute each time it is called:
one string per completion it just scored ("" or None = no feedback for that completion). A dataset column named
`feedback` (one string per prompt, repeated by TRL for each of its completions) is read too. Several non-empty
sources for one completion are joined with a blank line, dataset first, then reward functions in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

FEEDBACK_ATTRIBUTE = "last_feedback"
FEEDBACK_COLUMN = "feedback"
_SEPARATOR = "\n\n"

logger = logging.getLogger(__name__)


def snapshot_feedback(reward_funcs: Sequence[Callable]) -> list[Any]:
    """The `last_feedback` object of each reward function before a scoring call, to tell fresh feedback from stale."""
    return [getattr(func, FEEDBACK_ATTRIBUTE, None) for func in reward_funcs]


def validate_feedback_list(feedback: Any, num_completions: int, source: str) -> list[str | None]:
    """Check one source's feedback: a list of `num_completions` strings (or None) and return it as a list."""
    if isinstance(feedback, str) or not isinstance(feedback, Sequence):
        raise TypeError(
            f"{source} must be a list with one feedback string per completion, got {type(feedback).__name__}."
        )
    if len(feedback) != num_completions:
        raise ValueError(
            f"{source} has {len(feedback)} entries but {num_completions} completions were scored: give exactly one "
            "string per completion ('' when there is nothing to say)."
        )
    for index, entry in enumerate(feedback):
        if entry is not None and not isinstance(entry, str):
            raise TypeError(
                f"{source}[{index}] is {type(entry).__name__} ({entry!r}); each entry must be a str or None."
            )
    return list(feedback)


def collect_feedback(
    reward_funcs: Sequence[Callable],
    reward_func_names: Sequence[str],
    before: Sequence[Any],
    num_completions: int,
    dataset_feedback: Sequence[Any] | None = None,
) -> list[str]:
    """Join the fresh feedback of every source into one string per completion ("" = no feedback).

    `before` is `snapshot_feedback(reward_funcs)` taken just before the reward functions ran: a `last_feedback`
    that is still the very same object was not refreshed by this call and is ignored (with a warning), so feedback
    meant for an earlier batch never reaches this one.
    """
    sources: list[list[str | None]] = []
    if dataset_feedback is not None:
        sources.append(
            validate_feedback_list(dataset_feedback, num_completions, f"The dataset column {FEEDBACK_COLUMN!r}")
        )
    for func, name, previous in zip(reward_funcs, reward_func_names, before, strict=True):
        current = getattr(func, FEEDBACK_ATTRIBUTE, None)
        if current is None:
            continue
        if current is previous:
            logger.warning(
                "Reward function %r did not assign a new `%s` list in this call; its old feedback is ignored. "
                "Assign a fresh list on every call.",
                name,
                FEEDBACK_ATTRIBUTE,
            )
            continue
        sources.append(
            validate_feedback_list(current, num_completions, f"Reward function {name!r}.{FEEDBACK_ATTRIBUTE}")
        )
    return (
        [
            _SEPARATOR.join(text for text in texts if text is not None and text.strip())
            for texts in zip(*sources, strict=True)
        ]
        if sources
        else [""] * num_completions
    )
