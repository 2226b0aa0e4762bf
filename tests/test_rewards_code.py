"""CodeTestsReward: code extraction, test parsing, verdicts and the judge-like feedback texts."""

import asyncio
import json
import time

import pytest
from test_rewards_sandbox import sandbox_settings
from trl.trainer.utils import is_async_callable

from sdpo_rl import Scored
from sdpo_rl.feedback import collect_feedback, record_returns, snapshot_feedback
from sdpo_rl.rewards import AsyncReward, CodeTestsReward
from sdpo_rl.rewards.cases import AssertCase, IOCase, outputs_match, parse_tests
from sdpo_rl.rewards.code import NO_CODE_FEEDBACK, UNCLOSED_CODE_FEEDBACK, extract_code
from sdpo_rl.rewards.judge import Outcome, Verdict, judge, judge_report
from sdpo_rl.rewards.sandbox import Limits, RunResult

ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
SQUARE_TESTS = ["assert square(3) == 9", "assert square(-2) == 4"]


def fenced(code: str, tag: str = "python") -> str:
    return f"Here is my solution.\n```{tag}\n{code}\n```\n"


def make_reward(**options) -> CodeTestsReward:
    settings = sandbox_settings("bwrap") or sandbox_settings("process")
    if settings is None:
        pytest.skip("no working sandbox on this machine")
    return CodeTestsReward(**{"timeout_s": 2.0, **settings, **options})


@pytest.fixture(scope="module")
def reward():
    return make_reward()


def score(reward, code, tests):
    (value,) = reward(prompts=["task"], completions=[fenced(code)], tests=[tests])
    return value


def result(report=None, stdout=b"", stderr=b"", returncode=0, timed_out=False, output_exceeded=False):
    return RunResult(stdout, stderr, report, returncode, timed_out, output_exceeded, 0.1)


# Extraction and test parsing


def test_the_last_python_or_plain_block_is_the_code():
    text = "```python\nfirst\n```\ntext\n```bash\nls\n```\n```\nsecond\n```\n```py\nthird\n```\n```text\nnot code\n```"
    assert extract_code(text) == "third\n"
    assert extract_code("```Python3 solution.py\nx = 1\n```") == "x = 1\n"
    assert extract_code("no code here") is None


def test_parse_tests_accepts_io_cases_asserts_and_json_text():
    assert parse_tests(ADD_TESTS, "row") == [IOCase("1 2\n", "3\n"), IOCase("10 -4\n", "6\n")]
    assert parse_tests(json.dumps(SQUARE_TESTS), "row") == [AssertCase(s) for s in SQUARE_TESTS]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([], ValueError, "Row 3 of the column 'tests' must be a non-empty list"),
        ("not json", ValueError, "Row 3 of the column 'tests' is a string but not JSON"),
        ([{"input": "1"}], TypeError, r"Row 3 of the column 'tests', test 0 must be an assert statement"),
        (["assert f(1) =="], ValueError, "test 0 is not valid Python"),
    ],
)
def test_bad_tests_name_the_row_and_the_test(value, error, message):
    with pytest.raises(error, match=message):
        parse_tests(value, "Row 3 of the column 'tests'")


def test_outputs_are_compared_line_by_line_with_whitespace_normalised():
    assert outputs_match("1 2\n3\n", "  1   2 \n3")
    assert outputs_match("a\n", "\n\na\n\n")
    assert not outputs_match("1 2\n3\n", "1 2 3\n")
    assert not outputs_match("12\n", "1 2\n")


# Verdicts and feedback texts (no sandbox)


def test_judge_maps_each_kind_of_run_to_its_verdict():
    io_case, assert_case = IOCase("1\n", "2\n"), AssertCase("assert f() == 2")
    assert judge(io_case, result({"status": "ok"}, stdout=b"2\n")).verdict is Verdict.PASSED
    assert judge(io_case, result({"status": "ok"}, stdout=b"3\n")) == Outcome(Verdict.WRONG_ANSWER, "", "2\n", "3\n")
    assert judge(io_case, result(timed_out=True, returncode=-9)).verdict is Verdict.TIME_LIMIT
    assert judge(io_case, result(returncode=-24)).verdict is Verdict.TIME_LIMIT  # SIGXCPU
    assert judge(io_case, result(output_exceeded=True)).verdict is Verdict.OUTPUT_LIMIT
    assert judge(io_case, result(stderr=b"MemoryError", returncode=1)).verdict is Verdict.MEMORY_LIMIT
    failed = judge(assert_case, result({"status": "failed", "expected": "2", "actual": "1"}))
    assert failed == Outcome(Verdict.WRONG_ANSWER, "", "2", "1")
    assert judge(io_case, result(stdout=b"2\n", returncode=0)).verdict is Verdict.PASSED  # os._exit(0) after printing
    exited = judge(assert_case, result(returncode=0))
    assert exited.verdict is Verdict.RUNTIME_ERROR and "before the test ran" in exited.detail
    crashed = judge(io_case, result(returncode=-11, stderr=b"Fatal Python error"))
    assert crashed.detail == "The program was killed by SIGSEGV.\nFatal Python error"
    exit_call = judge(io_case, result({"status": "exit", "code": 3, "message": "3"}))
    assert exit_call == Outcome(Verdict.RUNTIME_ERROR, "The program called exit with 3.")


def test_report_shows_a_summary_and_the_first_two_failures():
    cases = [IOCase(f"{i}\n", f"{i * 2}\n") for i in range(5)]
    outcomes = [
        Outcome(Verdict.PASSED),
        Outcome(Verdict.WRONG_ANSWER, expected="2\n", actual="1\n"),
        Outcome(Verdict.RUNTIME_ERROR, "Traceback (most recent call last):\n  line\n    code\nZeroDivisionError: x"),
        Outcome(Verdict.TIME_LIMIT),
        Outcome(Verdict.PASSED),
    ]
    report = judge_report(cases, outcomes, Limits(timeout_s=2), traceback_lines=2)
    assert report == (
        "Passed 2 of 5 tests.\n\n"
        "Test 2: wrong answer.\nInput:\n1\nExpected output:\n2\nYour output:\n1\n\n"
        "Test 3: runtime error.\nInput:\n2\n    code\nZeroDivisionError: x\n\n"
        "1 more failing test not shown."
    )


def test_report_names_the_limits_and_repeated_errors_once():
    cases = [AssertCase("assert f(1) == 1"), AssertCase("assert f(2) == 2"), AssertCase("assert f(3) == 3")]
    error = "Traceback (most recent call last):\nNameError: name 'f' is not defined"
    outcomes = [Outcome(Verdict.RUNTIME_ERROR, error), Outcome(Verdict.RUNTIME_ERROR, error)]
    report = judge_report(cases, outcomes, Limits())
    assert (
        report.count("NameError") == 1
        and "Test 2: runtime error.\nTest: assert f(2) == 2\nSame error as test 1." in report
    )
    assert report.startswith("Failed test 2 of 3; the remaining tests were not run.")
    limits = Limits(timeout_s=1.5, memory_mb=256, max_output_bytes=1000)
    for verdict, text in [
        (Verdict.TIME_LIMIT, "time limit exceeded (more than 1.5 s)"),
        (Verdict.MEMORY_LIMIT, "memory limit exceeded (more than 256 MB)"),
        (Verdict.OUTPUT_LIMIT, "output limit exceeded (more than 1000 bytes)"),
    ]:
        assert f"Test 1: {text}." in judge_report(cases[:1], [Outcome(verdict)], limits)


def test_report_is_empty_when_all_passed_and_truncated_to_the_maximum():
    assert judge_report([IOCase("", "")], [Outcome(Verdict.PASSED)], Limits()) == ""
    long_case = IOCase("x" * 5000, "y")
    report = judge_report(
        [long_case], [Outcome(Verdict.WRONG_ANSWER, expected="y", actual="z" * 5000)], Limits(), max_chars=300
    )
    assert len(report) == 300 and report.endswith("… [truncated]")
    full = judge_report([long_case], [Outcome(Verdict.WRONG_ANSWER, expected="y", actual="z")], Limits())
    assert "x" * 380 in full and "x" * 401 not in full  # each quoted field is shortened too


# End to end through the sandbox


def test_correct_program_scores_one_with_no_feedback(reward):
    value = score(reward, "a, b = map(int, input().split())\nprint(a + b)", ADD_TESTS)
    assert value == 1.0 and value.feedback == ""


def test_wrong_answer_shows_input_expected_and_actual(reward):
    value = score(reward, "a, b = map(int, input().split())\nprint(a - b)", ADD_TESTS)
    assert value == 0.0
    assert value.feedback == (
        "Passed 0 of 2 tests.\n\n"
        "Test 1: wrong answer.\nInput:\n1 2\nExpected output:\n3\nYour output:\n-1\n\n"
        "Test 2: wrong answer.\nInput:\n10 -4\nExpected output:\n6\nYour output:\n14"
    )


def test_partial_credit_is_the_fraction_passed(reward):
    value = score(reward, "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", ADD_TESTS)
    assert value == 0.5 and value.feedback.startswith("Passed 1 of 2 tests.\n\nTest 2: wrong answer.")


def test_syntax_error_gives_the_line(reward):
    value = score(reward, "def square(x):\n    return x *\n", SQUARE_TESTS)
    assert value == 0.0 and value.feedback == "SyntaxError on line 2: invalid syntax\n    return x *"


def test_runtime_error_gives_the_last_traceback_lines(reward):
    value = score(reward, "def square(x):\n    return helper(x)\n", SQUARE_TESTS)
    assert value.feedback.startswith("Passed 0 of 2 tests.\n\nTest 1: runtime error.\nTest: assert square(3) == 9\n")
    assert 'File "solution.py", line 2, in square\n    return helper(x)' in value.feedback
    assert "NameError: name 'helper' is not defined" in value.feedback
    assert "Same error as test 1." in value.feedback and "_harness" not in value.feedback


def test_failed_assert_shows_expected_and_actual(reward):
    value = score(reward, "def square(x):\n    return x * 3\n", SQUARE_TESTS)
    assert value == 0.5
    assert value.feedback == (
        "Passed 1 of 2 tests.\n\nTest 2: wrong answer.\nTest: assert square(-2) == 4\nExpected: 4\nGot: -6"
    )


def test_an_assertion_inside_the_program_is_a_runtime_error(reward):
    value = score(reward, "def square(x):\n    assert x > 0, 'positive only'\n    return x * x\n", SQUARE_TESTS)
    assert (
        value == 0.5
        and "Test 2: runtime error." in value.feedback
        and "AssertionError: positive only" in value.feedback
    )


def test_exiting_early_does_not_pass_assert_tests(reward):
    value = score(reward, "import os\nos._exit(0)\n", SQUARE_TESTS)
    assert value == 0.0 and "ended abruptly with exit status 0 before the test ran" in value.feedback


def test_limits_reach_the_feedback():
    reward = make_reward(timeout_s=1.0, memory_mb=256, max_workers=2)
    loop, memory = reward(
        completions=[fenced("while True:\n    pass"), fenced("data = bytearray(4 * 1024**3)")],
        tests=[ADD_TESTS[:1], ADD_TESTS[:1]],
    )
    assert loop.feedback == "Passed 0 of 1 tests.\n\nTest 1: time limit exceeded (more than 1 s).\nInput:\n1 2"
    assert memory.feedback == "Passed 0 of 1 tests.\n\nTest 1: memory limit exceeded (more than 256 MB).\nInput:\n1 2"


def test_all_or_nothing_stops_at_the_first_failure():
    reward = make_reward(all_or_nothing=True)
    half = "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)"
    right = "a, b = map(int, input().split())\nprint(a + b)"
    half_value, right_value = reward(completions=[fenced(half), fenced(right)], tests=[ADD_TESTS, ADD_TESTS])
    assert half_value == 0.0 and half_value.feedback.startswith("Passed 1 of 2 tests.")
    assert right_value == 1.0
    (first_fails,) = reward(completions=[fenced("print(0)")], tests=[ADD_TESTS])
    assert first_fails.feedback.startswith("Failed test 1 of 2; the remaining tests were not run.")


def test_missing_or_unclosed_code_block(reward):
    missing, unclosed = reward(completions=["print(3)", "```python\nprint(3)"], tests=[ADD_TESTS, ADD_TESTS])
    assert (missing, missing.feedback) == (0.0, NO_CODE_FEEDBACK)
    assert (unclosed, unclosed.feedback) == (0.0, UNCLOSED_CODE_FEEDBACK)


def test_conversational_completions_and_last_feedback(reward):
    completions = [
        [{"role": "assistant", "content": fenced("print(sum(map(int, input().split())))")}],
        [{"role": "assistant", "content": "I don't know"}],
    ]
    values = reward(prompts=[[{"role": "user", "content": "add"}]] * 2, completions=completions, tests=[ADD_TESTS] * 2)
    assert [float(v) for v in values] == [1.0, 0.0] and all(isinstance(v, Scored) for v in values)
    assert reward.last_feedback == ["", NO_CODE_FEEDBACK]
    assert reward.__name__ == "code_tests_reward"


def test_a_missing_tests_column_is_named(reward):
    with pytest.raises(ValueError, match=r"needs the dataset column 'tests', but the dataset has only \['answer'\]"):
        reward(prompts=["p"], completions=["c"], answer=["1"], trainer_state=None)


def test_bad_options_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="max_workers must be an int >= 1, got 0"):
        CodeTestsReward(max_workers=0)
    with pytest.raises(ValueError, match="memory_mb=10 is too small"):
        CodeTestsReward(memory_mb=10)


def test_completions_are_scored_in_parallel_by_a_bounded_pool():
    sleeper = fenced("import time\ntime.sleep(0.5)\nprint(3)")
    for workers, fastest, slowest in [(4, 0.0, 1.9), (1, 2.0, 60.0)]:
        reward = make_reward(max_workers=workers)
        started = time.monotonic()
        values = reward(completions=[sleeper] * 4, tests=[ADD_TESTS[:1]] * 4)
        assert fastest <= time.monotonic() - started < slowest, workers
        assert values == [1.0] * 4


def test_async_calls_keep_each_feedback_with_its_completion():
    """Two overlapping calls of one reward: the returned Scored values stay right; `last_feedback` cannot."""
    shared = make_reward(max_workers=2)
    async_reward = AsyncReward(shared)
    assert is_async_callable(async_reward) and async_reward.__name__ == "code_tests_reward"
    slow = [fenced("import time\ntime.sleep(0.8)\nprint('slow')"), fenced("print('slow two')")]
    fast = [fenced("print('fast')"), "no code"]

    async def both():
        return await asyncio.gather(
            async_reward(completions=slow, tests=[ADD_TESTS[:1]] * 2),
            async_reward(completions=fast, tests=[ADD_TESTS[:1]] * 2),
        )

    slow_values, fast_values = asyncio.run(both())
    assert "Your output:\nslow" in slow_values[0].feedback and "Your output:\nslow two" in slow_values[1].feedback
    assert "Your output:\nfast" in fast_values[0].feedback and fast_values[1].feedback == NO_CODE_FEEDBACK
    assert shared.last_feedback == [value.feedback for value in slow_values]  # the slower call overwrote it

    recorder = record_returns(async_reward)
    before = snapshot_feedback([recorder])
    asyncio.run(recorder(completions=fast, tests=[ADD_TESTS[:1]] * 2))
    assert collect_feedback([recorder], ["code"], before, 2) == [v.feedback for v in fast_values]
