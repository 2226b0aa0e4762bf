"""What the built-in reward functions share: reading TRL's call, returning `Scored` values, and an async adapter."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..feedback import Scored

# Keyword arguments TRL passes to every reward function that are not dataset columns.
TRL_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric", "environments"}


def completion_text(completion: Any) -> str:
    """The text of one completion: the string itself (standard format), or the content of the last assistant
    message (conversational format; content given as a list of parts keeps the text parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role") == "assistant":
                content = message.get("content") or ""
                if isinstance(content, str):
                    return content
                return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
        return ""
    raise TypeError(
        f"A completion must be a string or a list of chat messages, got {type(completion).__name__} "
        f"({completion!r:.100})."
    )


def dataset_column(columns: Mapping[str, Any], name: str, num_completions: int, reward_name: str) -> list[Any]:
    """The values of dataset column `name`, one per completion, with an error that says what is missing."""
    if name not in columns:
        available = sorted(set(columns) - TRL_ARGUMENTS)
        raise ValueError(
            f"{reward_name} needs the dataset column {name!r}, but the dataset has only {available}. Add the column "
            f"or pass the name of the column to use."
        )
    values = list(columns[name])
    if len(values) != num_completions:
        raise ValueError(f"The column {name!r} has {len(values)} values for {num_completions} completions.")
    return values


class FeedbackReward:
    """Base class of the built-in reward functions (TRL calls them like any reward function).

    A call returns one `Scored` per completion (score and feedback together; safe with concurrent calls) and also
    sets `last_feedback` to a new list with the same feedback, for code that reads it outside the trainer.
    """

    __name__ = "feedback_reward"

    def __init__(self):
        self.last_feedback: list[str] | None = None

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] | None = None, **columns):
        if completions is None:
            raise TypeError(f"{self.__name__} needs the keyword argument `completions` (TRL passes it).")
        scored = self.score([completion_text(completion) for completion in completions], columns)
        self.last_feedback = [value.feedback for value in scored]
        return scored

    def score(self, texts: list[str], columns: Mapping[str, Any]) -> list[Scored]:
        """Score the completions' texts; `columns` holds the dataset columns (one value per completion)."""
        raise NotImplementedError


class AsyncReward:
    """An async version of a sync reward function: TRL awaits it on its event loop, concurrently with the other
    async reward functions, while the work runs in a thread. Return `Scored` values from `func`: a `last_feedback`
    attribute is not forwarded, since concurrent calls would overwrite it."""

    def __init__(self, func: Callable[..., Sequence[Any]]):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    async def __call__(self, *args: Any, **kwargs: Any) -> Sequence[Any]:
        return await asyncio.to_thread(self.func, *args, **kwargs)
