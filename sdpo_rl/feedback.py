"""Collect per-completion environment feedback from reward functions and from the dataset.

A reward function gives feedback in one of two ways:

- recommended: it returns `Scored(value, feedback)` items instead of plain floats. Score and feedback travel
  together, so they cannot be mixed up, whatever runs concurrently (async reward functions included);
- it assigns a new list to its `last_feedback` attribute each time it is called: one string per completion it just
  scored ("" or None = no feedback for that completion). Ignored for a call whose returned values carry feedback.

A dataset column named `feedback` (one string per prompt, repeated by TRL for each of its completions) is read too,
or under TRL's name for it, `privileged_context` (a reference solution or hint: SDPO as on-policy distillation from
privileged information, docs/rewards.md); a dataset with both is rejected. Several non-empty sources for one
completion are joined with a blank line, dataset first, then reward functions in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from trl.trainer.utils import is_async_callable

FEEDBACK_ATTRIBUTE = "last_feedback"
FEEDBACK_COLUMN = "feedback"
PRIVILEGED_CONTEXT_COLUMN = "privileged_context"  # TRL's name (trl.experimental.sdpo) for the same column
_SEPARATOR = "\n\n"

logger = logging.getLogger(__name__)


class Scored(float):
    """A reward value that carries the feedback for its completion: `Scored(0.0, "expected 4, got 5")`.

    It is a float, so TRL (and any code that only wants the score) treats it as the reward itself.
    """

    feedback: str

    def __new__(cls, value: float, feedback: str = "") -> Scored:
        if not isinstance(feedback, str):
            raise TypeError(f"Scored feedback must be a str, got {type(feedback).__name__} ({feedback!r}).")
        scored = super().__new__(cls, value)
        scored.feedback = feedback
        return scored

    def __getnewargs__(self) -> tuple[float, str]:
        return float(self), self.feedback

    def __repr__(self) -> str:
        return f"Scored({float(self)!r}, feedback={self.feedback!r})"


def returned_feedback(values: Sequence[Any] | None) -> list[str | None] | None:
    """The feedback carried by a reward function's returned values, or None when none of them is `Scored`."""
    if values is None or not any(isinstance(value, Scored) for value in values):
        return None
    return [value.feedback if isinstance(value, Scored) else None for value in values]


class ReturnRecorder:
    """Wraps a reward function to keep what its latest call returned; everything else is the wrapped function's.

    Each trainer gets its own recorders, so a reward function object shared between trainers stays untouched.
    """

    def __init__(self, func: Callable):
        self.func = func
        self.returned: Sequence[Any] | None = None
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._named_errors():
            self.returned = self.func(*args, **kwargs)
        return self.returned

    @contextmanager
    def _named_errors(self) -> Iterator[None]:
        """Add a note naming the wrapped function to any error it raises (shown under the traceback); the error itself,
        its type included, is unchanged, so callers that catch it (or stop a search with it) still do."""
        try:
            yield
        except Exception as error:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"Raised by the reward function {self.__name__!r}.")
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.func, name)


class AsyncReturnRecorder(ReturnRecorder):
    """`ReturnRecorder` for an async reward function (TRL awaits it on its event loop)."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._named_errors():
            self.returned = await self.func(*args, **kwargs)
        return self.returned


def record_returns(func: Callable) -> ReturnRecorder:
    """Wrap a reward function (sync or async) in the matching `ReturnRecorder`."""
    return AsyncReturnRecorder(func) if is_async_callable(func) else ReturnRecorder(func)


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


def dataset_feedback(inputs: Sequence[Mapping[str, Any]]) -> list[str | None] | None:
    """The dataset's feedback for each input (TRL's rows, one per completion): its `feedback` or `privileged_context`
    column, None when it has neither; a `ValueError` when it has both, as either is the text the teacher reads."""
    columns = [name for name in (FEEDBACK_COLUMN, PRIVILEGED_CONTEXT_COLUMN) if inputs and name in inputs[0]]
    if len(columns) == 2:
        raise ValueError(
            f"The dataset has both a {FEEDBACK_COLUMN!r} and a {PRIVILEGED_CONTEXT_COLUMN!r} column; SDPOTrainer reads "
            "either one as the feedback the teacher sees (they are aliases): merge them into one column or remove one "
            "(docs/rewards.md)."
        )
    if not columns:
        return None
    return validate_feedback_list([x[columns[0]] for x in inputs], len(inputs), f"The dataset column {columns[0]!r}")


def collect_feedback(
    reward_funcs: Sequence[Callable],
    reward_func_names: Sequence[str],
    before: Sequence[Any],
    num_completions: int,
    dataset_feedback: Sequence[Any] | None = None,
) -> list[str]:
    """Join the fresh feedback of every source into one string per completion ("" = no feedback).

    A reward function wrapped by `record_returns` whose latest call returned `Scored` values gives their feedback.
    Otherwise its `last_feedback` is read: `before` is `snapshot_feedback(reward_funcs)` taken just before the
    reward functions ran, and a `last_feedback` that is still the very same object was not refreshed by this call and
    is ignored (with a warning), so feedback meant for an earlier batch never reaches this one.
    """
    sources: list[list[str | None]] = []
    if dataset_feedback is not None:
        sources.append(
            validate_feedback_list(
                dataset_feedback,
                num_completions,
                f"The dataset column {FEEDBACK_COLUMN!r} (or {PRIVILEGED_CONTEXT_COLUMN!r})",
            )
        )
    for func, name, previous in zip(reward_funcs, reward_func_names, before, strict=True):
        returned = returned_feedback(func.returned) if isinstance(func, ReturnRecorder) else None
        if returned is not None:
            sources.append(validate_feedback_list(returned, num_completions, f"Reward function {name!r}'s returns"))
            continue
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
