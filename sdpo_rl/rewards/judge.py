"""Turn a sandbox run into a verdict per test, and the verdicts into short, judge-like feedback for the teacher."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from ._harness import PROGRAM_FILENAME
from .cases import AssertCase, IOCase, TestCase, outputs_match
from .sandbox import Limits, RunResult

FIELD_CHARS = 400  # the most of any one input, output or statement quoted in feedback
TRUNCATION_MARK = "… [truncated]"


class Verdict(enum.Enum):
    PASSED = "passed"
    WRONG_ANSWER = "wrong answer"
    RUNTIME_ERROR = "runtime error"
    TIME_LIMIT = "time limit exceeded"
    MEMORY_LIMIT = "memory limit exceeded"
    OUTPUT_LIMIT = "output limit exceeded"
    SYNTAX_ERROR = "syntax error"


@dataclass(frozen=True)
class Outcome:
    """One test's verdict. `detail`: the traceback or error text; `expected`/`actual`: for a wrong answer."""

    verdict: Verdict
    detail: str = ""
    expected: str | None = None
    actual: str | None = None


def shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max(max_chars - len(TRUNCATION_MARK), 0)] + TRUNCATION_MARK


def without_markers(traceback: str) -> str:
    """A traceback without the `^^^^` lines that point into a source line (they cost lines and say little)."""
    return "\n".join(line for line in traceback.rstrip().splitlines() if line.strip(" ^~"))


def same_error_key(traceback: str) -> str:
    """The part of a traceback that is the same when tests fail for one reason: from the program's first frame on."""
    start = traceback.find(f'File "{PROGRAM_FILENAME}"')
    return traceback[start:] if start >= 0 else traceback


def judge(case: TestCase, result: RunResult) -> Outcome:
    """The verdict of one run of the program on `case`."""
    report = result.report or {}
    status = report.get("status")
    if result.timed_out or (result.report is None and result.returncode == -signal.SIGXCPU):
        return Outcome(Verdict.TIME_LIMIT)
    if result.output_exceeded:
        return Outcome(Verdict.OUTPUT_LIMIT)
    if status == "memory" or (result.report is None and b"MemoryError" in result.stderr):
        return Outcome(Verdict.MEMORY_LIMIT)
    if status == "syntax_error":
        where = f" on line {report['line']}" if report.get("line") else ""
        source_line = f"\n    {report['text'].strip()}" if report.get("text") else ""
        return Outcome(Verdict.SYNTAX_ERROR, f"SyntaxError{where}: {report['message']}{source_line}")
    if status == "error":
        return Outcome(Verdict.RUNTIME_ERROR, without_markers(report["traceback"]))
    if status == "exit":
        return Outcome(Verdict.RUNTIME_ERROR, f"The program called exit with {report['message']}.")
    if status == "failed":
        detail = without_markers(report.get("traceback", ""))
        return Outcome(Verdict.WRONG_ANSWER, detail, report.get("expected"), report.get("actual"))
    if result.report is None and not (isinstance(case, IOCase) and result.returncode == 0):
        return Outcome(Verdict.RUNTIME_ERROR, _unfinished_run(case, result))
    if isinstance(case, IOCase):
        actual = result.stdout.decode(errors="replace")
        if not outputs_match(case.output, actual):
            return Outcome(Verdict.WRONG_ANSWER, expected=case.output, actual=actual)
    return Outcome(Verdict.PASSED)


def _unfinished_run(case: TestCase, result: RunResult) -> str:
    """Why a run ended without the runner's report (killed by a signal, or `os._exit`)."""
    if result.returncode is not None and result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        reason = " (file size limit exceeded)" if name == "SIGXFSZ" else ""
        text = f"The program was killed by {name}{reason}."
    else:
        text = f"The program ended abruptly with exit status {result.returncode}"
        text += " before the test ran." if isinstance(case, AssertCase) else "."
    stderr = result.stderr.decode(errors="replace").strip()
    return f"{text}\n{stderr}" if stderr else text


def judge_report(
    cases: list[TestCase],
    outcomes: list[Outcome],
    limits: Limits,
    max_failures_shown: int = 2,
    traceback_lines: int = 6,
    max_chars: int = 2000,
) -> str:
    """Feedback on the tests run so far ("" when all passed): a summary, then the first failing tests in detail.

    `outcomes` may be shorter than `cases` when testing stopped at a failure. A syntax error is reported alone.
    """
    failures = [
        (number, case, outcome)
        for number, (case, outcome) in enumerate(zip(cases[: len(outcomes)], outcomes, strict=True), 1)
        if outcome.verdict is not Verdict.PASSED
    ]
    if not failures:
        return ""
    if failures[0][2].verdict is Verdict.SYNTAX_ERROR:
        return shorten(failures[0][2].detail, max_chars)
    if len(outcomes) < len(cases):
        summary = f"Failed test {failures[-1][0]} of {len(cases)}; the remaining tests were not run."
    else:
        summary = f"Passed {len(outcomes) - len(failures)} of {len(cases)} tests."
    blocks = [summary]
    details_shown: dict[str, int] = {}
    for number, case, outcome in failures[:max_failures_shown]:
        blocks.append(_describe_failure(number, case, outcome, limits, traceback_lines, details_shown))
    hidden = len(failures) - max_failures_shown
    if hidden > 0:
        blocks.append(f"{hidden} more failing test{'s' if hidden > 1 else ''} not shown.")
    return shorten("\n\n".join(blocks), max_chars)


def _describe_failure(
    number: int, case: TestCase, outcome: Outcome, limits: Limits, traceback_lines: int, details_shown: dict[str, int]
) -> str:
    limit = {
        Verdict.TIME_LIMIT: f" (more than {limits.timeout_s:g} s)",
        Verdict.MEMORY_LIMIT: f" (more than {limits.memory_mb} MB)",
        Verdict.OUTPUT_LIMIT: f" (more than {limits.max_output_bytes} bytes)",
    }.get(outcome.verdict, "")
    lines = [f"Test {number}: {outcome.verdict.value}{limit}."]
    if isinstance(case, IOCase):
        lines += ["Input:", shorten(case.input.rstrip("\n"), FIELD_CHARS)]
    else:
        lines.append(f"Test: {shorten(case.statement, FIELD_CHARS)}")
    if outcome.verdict is Verdict.WRONG_ANSWER and outcome.expected is not None:
        if isinstance(case, IOCase):
            lines += ["Expected output:", shorten(outcome.expected.rstrip("\n"), FIELD_CHARS)]
            lines += ["Your output:", shorten(outcome.actual.rstrip("\n"), FIELD_CHARS) or "(nothing)"]
        else:
            lines += [
                f"Expected: {shorten(outcome.expected, FIELD_CHARS)}",
                f"Got: {shorten(outcome.actual, FIELD_CHARS)}",
            ]
    elif outcome.detail:
        key = same_error_key(outcome.detail)
        if key in details_shown:
            lines.append(f"Same error as test {details_shown[key]}.")
        else:
            details_shown[key] = number
            lines.append("\n".join(outcome.detail.splitlines()[-traceback_lines:]))
    return "\n".join(lines)
