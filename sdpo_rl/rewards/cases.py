"""The test cases of a coding task (one row of the dataset column `tests`) and how a program's output is compared."""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IOCase:
    """The program reads `input` on stdin; its stdout must match `output` (see `outputs_match`)."""

    input: str
    output: str


@dataclass(frozen=True)
class AssertCase:
    """`statement` (e.g. "assert add(1, 2) == 3") runs after the program; the test passes when it raises nothing."""

    statement: str


TestCase = IOCase | AssertCase


def normalized_lines(text: str) -> list[str]:
    """The lines of `text` with runs of whitespace collapsed and leading/trailing blank lines dropped."""
    return [" ".join(line.split()) for line in text.strip().splitlines()]


def outputs_match(expected: str, actual: str) -> bool:
    return normalized_lines(expected) == normalized_lines(actual)


def parse_tests(value: Any, where: str) -> list[TestCase]:
    """The test cases in one dataset value: a list (or its JSON text) of `{"input": str, "output": str}` cases or
    of assert statements. `where` names the value in errors (e.g. "row 3 of the column 'tests'")."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError(
                f"{where} is a string but not JSON ({error}); give a list of test cases or its JSON text."
            ) from None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise ValueError(
            f"{where} must be a non-empty list of test cases ({{'input': str, 'output': str}} or assert statements), "
            f"got {value!r:.200}."
        )
    return [_parse_case(item, f"{where}, test {index}") for index, item in enumerate(value)]


def _parse_case(item: Any, where: str) -> TestCase:
    if isinstance(item, str):
        try:
            ast.parse(item)
        except SyntaxError as error:
            raise ValueError(f"{where} is not valid Python ({error.msg}, line {error.lineno}): {item!r:.200}") from None
        return AssertCase(item)
    if isinstance(item, Mapping) and isinstance(item.get("input"), str) and isinstance(item.get("output"), str):
        return IOCase(item["input"], item["output"])
    raise TypeError(
        f"{where} must be an assert statement (str) or a dict {{'input': str, 'output': str}}, got {item!r:.200}."
    )
