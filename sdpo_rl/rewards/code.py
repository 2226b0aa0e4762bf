"""`CodeTestsReward`: run the completion's Python code against the task's tests in a sandbox; explain failures."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..feedback import Scored
from .base import FeedbackReward, dataset_column
from .cases import IOCase, TestCase, parse_tests
from .judge import Outcome, Verdict, judge, judge_report
from .sandbox import NOBODY, Limits, Sandbox

CODE_BLOCK = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_TAGS = {"", "python", "python3", "py"}
NO_CODE_FEEDBACK = "No Python code block found: put your complete program in a ```python code block."
UNCLOSED_CODE_FEEDBACK = (
    "Your code block is never closed with ``` (was the answer cut off by the length limit?); nothing was run."
)


def extract_code(text: str) -> str | None:
    """The content of the last fenced code block tagged python (or py, python3, or untagged), or None."""
    blocks = [code for tag, code in CODE_BLOCK.findall(text) if tag.lower() in PYTHON_TAGS]
    return blocks[-1] if blocks else None


def missing_code_feedback(text: str) -> str:
    return UNCLOSED_CODE_FEEDBACK if text.count("```") % 2 == 1 else NO_CODE_FEEDBACK


class CodeTestsReward(FeedbackReward):
    """Score = fraction of the row's tests passed by the code in the completion's last ```python block (1 or 0
    with `all_or_nothing`, which also stops at the first failing test). The dataset column `tests` (`tests_column`)
    holds a list of `{"input": str, "output": str}` cases (the program reads stdin; stdout is compared line by line
    with whitespace normalised) or of assert statements (run after the program), or that list as JSON text.

    Feedback ("" when all tests passed): no code block; the syntax error; or a summary and the first
    `max_failures_shown` failing tests (input, expected and actual output, the last `traceback_lines` lines of a
    traceback, or the limit exceeded), at most `max_feedback_chars` characters.

    Each test runs in a fresh sandbox (see `sandbox.py` and docs/rewards.md): `timeout_s` of wall-clock time,
    `memory_mb` of address space, `max_output_bytes` of stdout and stderr. Completions are scored in parallel by
    `max_workers` threads (default: the CPUs this process may use). The sandbox is checked once at construction;
    `isolation` says which one is used ("bwrap" or "process").
    """

    __name__ = "code_tests_reward"

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        all_or_nothing: bool = False,
        max_feedback_chars: int = 2000,
        max_workers: int | None = None,
        max_output_bytes: int = 1_000_000,
        max_failures_shown: int = 2,
        traceback_lines: int = 6,
        tests_column: str = "tests",
        python_executable: str | None = None,
        unprivileged_ids: tuple[int, int] | None = NOBODY,
        use_bwrap: bool | None = None,
    ):
        super().__init__()
        for name, value, minimum in (
            ("max_feedback_chars", max_feedback_chars, 100),
            ("max_failures_shown", max_failures_shown, 1),
            ("traceback_lines", traceback_lines, 1),
            ("max_workers", 1 if max_workers is None else max_workers, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
        self.limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        self.sandbox = Sandbox(self.limits, python_executable, unprivileged_ids, use_bwrap)
        self.all_or_nothing = all_or_nothing
        self.max_feedback_chars = max_feedback_chars
        self.max_workers = max_workers or len(os.sched_getaffinity(0))
        self.max_failures_shown = max_failures_shown
        self.traceback_lines = traceback_lines
        self.tests_column = tests_column
        self.isolation = self.sandbox.isolation

    def score(self, texts: list[str], columns: Mapping[str, Any]) -> list[Scored]:
        values = dataset_column(columns, self.tests_column, len(texts), type(self).__name__)
        cases_per_row = [
            parse_tests(value, f"Row {row} of the column {self.tests_column!r}") for row, value in enumerate(values)
        ]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(texts)) or 1) as pool:
            return list(pool.map(self.score_one, texts, cases_per_row))

    def score_one(self, text: str, cases: list[TestCase]) -> Scored:
        """Run the code in `text` on each of `cases` in turn and score it."""
        code = extract_code(text)
        if code is None:
            return Scored(0.0, missing_code_feedback(text))
        outcomes: list[Outcome] = []
        for case in cases:
            if isinstance(case, IOCase):
                result = self.sandbox.run(code, stdin=case.input)
            else:
                result = self.sandbox.run(code, assertion=case.statement)
            outcomes.append(judge(case, result))
            if outcomes[-1].verdict is Verdict.SYNTAX_ERROR:
                break
            if self.all_or_nothing and outcomes[-1].verdict is not Verdict.PASSED:
                break
        passed = sum(outcome.verdict is Verdict.PASSED for outcome in outcomes)
        value = float(passed == len(cases)) if self.all_or_nothing else passed / len(cases)
        feedback = judge_report(
            cases, outcomes, self.limits, self.max_failures_shown, self.traceback_lines, self.max_feedback_chars
        )
        return Scored(value, feedback)
