"""AnswerMatchReward: extraction, normalisation, scores, and feedback that never reveals the expected answer."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdpo_rl import Scored
from sdpo_rl.rewards import AnswerMatchReward
from sdpo_rl.rewards.answer import (
    NO_ANSWER_FEEDBACK,
    NO_MATCH_FEEDBACK,
    WRONG_UNQUOTED_FEEDBACK,
    answer_forms,
    extract_answer,
    normalize_answer,
)


def score(text, expected, **options):
    (value,) = AnswerMatchReward(**options)(prompts=["q"], completions=[text], answer=[expected])
    return value


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [
        ("First 3, then 4, so the answer is 12.", None, "12"),
        ("It costs $1,234.50 in total", None, "1,234.50"),
        ("We get \\boxed{\\frac{1}{2}} and then 7 more", None, "\\frac{1}{2}"),
        ("\\boxed{3} no wait \\boxed{5}", None, "5"),
        ("Answer: Paris\nAnswer: Lima", re.compile(r"Answer: (\w+)"), "Lima"),
        ("final=42", re.compile(r"\d+"), "42"),
        ("no numbers here", None, None),
        ("\\boxed{unclosed", None, None),
    ],
)
def test_extract_answer(text, pattern, expected):
    assert extract_answer(text, pattern) == expected


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (" $1,234.50. ", "1234.5"),
        ("12.0", "12"),
        ("-0.0", "0"),
        ("100", "100"),
        ("  Paris. ", "paris"),
        ("New  York", "new york"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_correct_answers_score_one_without_feedback():
    assert score("so the total is 1,000.", "1000") == Scored(1.0, "")
    assert score("\\boxed{PARIS}", "Paris").feedback == ""
    conversational = [{"role": "assistant", "content": "The answer is 7"}]
    assert AnswerMatchReward()(completions=[conversational], answer=[7]) == [1.0]


def test_feedback_texts():
    assert score("I am not sure", "12") == Scored(0.0, NO_ANSWER_FEEDBACK)
    assert score("Answer: 12", "12", pattern=r"\\boxed\{(\d+)\}") == Scored(0.0, NO_MATCH_FEEDBACK)
    assert score("the answer is 15", "12").feedback == 'Your answer "15" is incorrect.'


def test_a_wrong_answer_that_contains_the_expected_one_is_not_quoted():
    assert score("the answer is 123", "12").feedback == WRONG_UNQUOTED_FEEDBACK
    assert score("the answer is 1,000.5", "1000").feedback == WRONG_UNQUOTED_FEEDBACK
    assert score("\\boxed{Paris, France}", "paris").feedback == WRONG_UNQUOTED_FEEDBACK


def test_last_feedback_matches_the_returned_feedback():
    reward = AnswerMatchReward()
    values = reward(completions=["7", "8", "none"], answer=["7", "7", "7"])
    assert (
        reward.last_feedback
        == [v.feedback for v in values]
        == ["", 'Your answer "8" is incorrect.', NO_ANSWER_FEEDBACK]
    )


def test_fixed_feedback_texts_contain_no_digits():
    for text in (NO_ANSWER_FEEDBACK, NO_MATCH_FEEDBACK, WRONG_UNQUOTED_FEEDBACK):
        assert not re.search(r"\d", text)


numbers = st.one_of(
    st.integers(-(10**7), 10**7).map(str),
    st.integers(0, 10**7).map(lambda n: f"{n:,}"),
    st.decimals(-1000, 1000, places=2, allow_nan=False).map(str),
)
words = st.sampled_from(["the", "answer", "is", "so", "total", "\\boxed{", "}", "=", ",", ".", "$", "\n"])


@settings(max_examples=300, deadline=None)
@given(expected=numbers, pieces=st.lists(st.one_of(numbers, words), max_size=12))
def test_feedback_never_contains_the_expected_answer(expected, pieces):
    value = score(" ".join(pieces), expected)
    if value == 0.0:
        assert not any(form in value.feedback.casefold() for form in answer_forms(expected))
    else:
        assert value.feedback == ""


def test_bad_options_and_data_are_named():
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid regular expression"):
        AnswerMatchReward(pattern="(")
    with pytest.raises(TypeError, match="pattern must be a regex string or re.Pattern, got int"):
        AnswerMatchReward(pattern=5)
    with pytest.raises(ValueError, match=r"Row 1 of the column 'answer' is empty"):
        AnswerMatchReward()(completions=["1", "2"], answer=["1", " "])
    with pytest.raises(ValueError, match=r"needs the dataset column 'solution', but the dataset has only \['answer'\]"):
        AnswerMatchReward(answer_column="solution")(completions=["1"], answer=["1"], log_metric=None)
