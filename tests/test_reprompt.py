"""Tests for sdpo_rl.reprompt: teacher-signal selection, reprompt text and rendering, truncation.

What they check is described in docs/how-it-works.md (sections 2 and 3) and docs/deviations.md (D1, D2).

Expected teacher prompts are written out by hand from the ChatML format of ``tiny.make_tokenizer``:
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import make_tokenizer
from tokenizers.processors import TemplateProcessing

from sdpo_rl.reprompt import (
    DEFAULT_FEEDBACK_TEMPLATE,
    DEFAULT_REPROMPT_TEMPLATE,
    DEFAULT_SOLUTION_TEMPLATE,
    SignalSettings,
    TeacherPrompt,
    TeacherSignal,
    TemplateSettings,
    build_reprompt_text,
    last_user_text,
    remove_thinking,
    render_teacher_prompt,
    select_teacher_signals,
    teacher_prompt_messages,
)

TOKENIZER = make_tokenizer()
DEFAULT_TEMPLATES = {
    "solution_template": DEFAULT_SOLUTION_TEMPLATE,
    "feedback_template": DEFAULT_FEEDBACK_TEMPLATE,
    "reprompt_template": DEFAULT_REPROMPT_TEMPLATE,
}
GENERATION_HEADER = "<|im_start|>assistant\n"
INSTRUCTION_TAIL = "\n\nCorrectly solve the original question.<|im_end|>\n" + GENERATION_HEADER

SYSTEM_USER = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
]
MULTI_TURN = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]

DEMO_ONLY = TeacherSignal(demonstration="4", feedback=None, demonstration_index=1)
FEEDBACK_ONLY = TeacherSignal(demonstration=None, feedback="Wrong: expected 4", demonstration_index=None)
BOTH = TeacherSignal(demonstration="4", feedback="Wrong: expected 4", demonstration_index=1)


def template_settings(max_reprompt_length=10_000, reprompt_truncation="right", templates=None):
    return TemplateSettings(
        **(templates or DEFAULT_TEMPLATES),
        max_reprompt_length=max_reprompt_length,
        reprompt_truncation=reprompt_truncation,
    )


def render(prompt, signal, *, max_reprompt_length=10_000, reprompt_truncation="right", templates=None, **kwargs):
    settings = template_settings(max_reprompt_length, reprompt_truncation, templates)
    return render_teacher_prompt(prompt, signal, TOKENIZER, settings, chat_template_kwargs={}, **kwargs)


def select(completions, rewards, feedback, num_generations, **overrides):
    options = {
        "success_reward_threshold": 1.0,
        "dont_reprompt_on_self_success": True,
        "remove_thinking_from_demonstration": True,
        "include_environment_feedback": True,
        "environment_feedback_only_without_solution": True,
    }
    options.update(overrides)
    return select_teacher_signals(completions, rewards, feedback, num_generations, SignalSettings(**options))


# --------------------------------------------------------------------------------------------------------------------
# Rendering: byte-for-byte teacher prompts
# --------------------------------------------------------------------------------------------------------------------

SYSTEM_USER_EXPECTED = {
    "demonstration": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
    "feedback": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "Wrong: expected 4\n\nCorrectly solve the original question."
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
    "both": (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?\nCorrect solution:\n\n4"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "Wrong: expected 4\n\nCorrectly solve the original question."
        "<|im_end|>\n<|im_start|>assistant\n"
    ),
}
SIGNALS = {"demonstration": DEMO_ONLY, "feedback": FEEDBACK_ONLY, "both": BOTH}


@pytest.mark.parametrize("kind", ["demonstration", "feedback", "both"])
def test_system_and_user_prompt_renders_exactly(kind):
    result = render(SYSTEM_USER, SIGNALS[kind])
    assert result.text == SYSTEM_USER_EXPECTED[kind]
    assert result.text.count("<|im_start|>user\n") == 1
    assert result.truncated is False
    # The ids are what TRL computes for a conversational prompt (apply_chat_template with tokenize=True).
    expected_messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": SYSTEM_USER_EXPECTED[kind].split("<|im_start|>user\n")[1].split("<|im_end|>")[0]},
    ]
    trl_ids = TOKENIZER.apply_chat_template(
        expected_messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert result.input_ids == trl_ids


def test_multi_turn_keeps_earlier_turns_and_replaces_only_last_user_turn():
    result = render(MULTI_TURN, DEMO_ONLY)
    assert result.text == (
        "<|im_start|>system\nBe kind.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    ("signal", "expected"),
    [
        (DEMO_ONLY, "What is 2+2?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."),
        (
            FEEDBACK_ONLY,
            "What is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
            "Wrong: expected 4\n\nCorrectly solve the original question.",
        ),
        (
            BOTH,
            "What is 2+2?\nCorrect solution:\n\n4\nThe following is feedback from your unsuccessful earlier "
            "attempt:\n\nWrong: expected 4\n\nCorrectly solve the original question.",
        ),
    ],
)
def test_standard_prompt_renders_exactly(signal, expected):
    result = render("What is 2+2?", signal)
    assert result.text == expected
    assert result.input_ids == TOKENIZER(expected)["input_ids"]


def test_special_tokens_follow_trl():
    """TRL adds the tokenizer's special tokens to standard prompts only; chat templates carry their own."""
    tokenizer = make_tokenizer()
    bos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)]
    )
    settings = template_settings(max_reprompt_length=1000)
    standard = render_teacher_prompt("What is 2+2?", DEMO_ONLY, tokenizer, settings, chat_template_kwargs={})
    assert standard.input_ids == [bos_id] + TOKENIZER(standard.text)["input_ids"]
    conversational = render_teacher_prompt(SYSTEM_USER, DEMO_ONLY, tokenizer, settings, chat_template_kwargs={})
    assert conversational.input_ids == TOKENIZER(SYSTEM_USER_EXPECTED["demonstration"])["input_ids"]


def test_custom_templates():
    templates = {
        "solution_template": "[SOL {successful_previous_attempt}]",
        "feedback_template": "[FB {feedback_raw}]",
        "reprompt_template": "Q: {prompt} | {feedback} | {solution} | again",
    }
    assert render(SYSTEM_USER, BOTH, templates=templates).text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nQ: What is 2+2? | [FB Wrong: expected 4] | [SOL 4] | again<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render("2+2?", FEEDBACK_ONLY, templates=templates).text == "Q: 2+2? | [FB Wrong: expected 4] |  | again"


def test_chat_template_kwargs_are_passed_to_the_chat_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ prefix }}{{ messages[-1]['content'] }}"
    result = render_teacher_prompt(
        SYSTEM_USER,
        DEMO_ONLY,
        tokenizer,
        template_settings(max_reprompt_length=1000),
        chat_template_kwargs={"prefix": "P:"},
    )
    assert result.text == "P:What is 2+2?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."


def test_list_content_parts_give_the_prompt_text():
    prompt = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "what?"}],
        }
    ]
    assert last_user_text(prompt) == "Look: what?"
    assert render(prompt, DEMO_ONLY).text == (
        "<|im_start|>user\nLook: what?\nCorrect solution:\n\n4\n\nCorrectly solve the original question."
        "<|im_end|>\n<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------------------------------
# Messages and prompt text
# --------------------------------------------------------------------------------------------------------------------


def test_teacher_prompt_messages_returns_new_list_and_does_not_mutate():
    prompt = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U", "name": "alice"},
    ]
    before = copy.deepcopy(prompt)
    messages = teacher_prompt_messages(prompt, "R")
    assert messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "R", "name": "alice"}]
    assert messages is not prompt
    assert prompt == before


def test_teacher_prompt_messages_standard_prompt_is_the_reprompt_text():
    assert teacher_prompt_messages("original", "R") == "R"


@pytest.mark.parametrize("function", [lambda p: teacher_prompt_messages(p, "R"), last_user_text])
def test_last_turn_must_be_user(function):
    prompt = [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(ValueError, match="'assistant'"):
        function(prompt)
    with pytest.raises(ValueError):
        function([])


def test_last_user_text():
    assert last_user_text(MULTI_TURN) == "What is 2+2?"
    assert last_user_text("plain {prompt}") == "plain {prompt}"


# --------------------------------------------------------------------------------------------------------------------
# Literal pass-through of braces, backslashes and unicode
# --------------------------------------------------------------------------------------------------------------------

ODD_PROMPT = "Use {prompt} and {0} {solution}; path C:\\new\\x \\n ünï 日本 {"
ODD_DEMO = "}{feedback_raw} \\t {successful_previous_attempt} 🙂"
ODD_FEEDBACK = "{0}{1} Traceback:\n  File \\x00 {prompt} é"


def test_build_reprompt_text_passes_values_through_literally():
    signal = TeacherSignal(ODD_DEMO, ODD_FEEDBACK, 0)
    text = build_reprompt_text(ODD_PROMPT, signal, template_settings())
    assert text == (
        "Use {prompt} and {0} {solution}; path C:\\new\\x \\n ünï 日本 {"
        "\nCorrect solution:\n\n}{feedback_raw} \\t {successful_previous_attempt} 🙂"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "{0}{1} Traceback:\n  File \\x00 {prompt} é"
        "\n\nCorrectly solve the original question."
    )


def test_odd_characters_survive_selection_and_rendering():
    signals = select(
        ["wrong", ODD_DEMO], [0.0, 1.0], [ODD_FEEDBACK, None], 2, environment_feedback_only_without_solution=False
    )
    prompt = [{"role": "user", "content": ODD_PROMPT}]
    result = render(prompt, signals[0])
    assert signals[0] == TeacherSignal(ODD_DEMO, ODD_FEEDBACK, 1)
    assert result.text == (
        "<|im_start|>user\nUse {prompt} and {0} {solution}; path C:\\new\\x \\n ünï 日本 {"
        "\nCorrect solution:\n\n}{feedback_raw} \\t {successful_previous_attempt} 🙂"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
        "{0}{1} Traceback:\n  File \\x00 {prompt} é"
        "\n\nCorrectly solve the original question.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert TOKENIZER.decode(result.input_ids) == result.text


def test_empty_signal_renders_the_bare_template():
    assert render("Q", TeacherSignal(None, None, None)).text == "Q\n\nCorrectly solve the original question."


# --------------------------------------------------------------------------------------------------------------------
# remove_thinking
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("no block here", "no block here"),
        ("<think>plan</think>answer", "answer"),
        ("<think>plan</think> \n\t answer", "answer"),
        ("<think>a\nb\n</think>\n\nx <think>c</think>  y", "x y"),
        ("keep <think>a</think>middle<think>b</think>\nend", "keep middleend"),
        ("trailing space kept   ", "trailing space kept   "),
        ("<think>unclosed", "<think>unclosed"),
        ("", ""),
    ],
)
def test_remove_thinking(text, expected):
    assert remove_thinking(text) == expected


# --------------------------------------------------------------------------------------------------------------------
# select_teacher_signals
# --------------------------------------------------------------------------------------------------------------------


def test_self_success_is_excluded_and_first_success_is_chosen():
    completions = ["c0", "c1", "c2", "c3"]
    signals = select(completions, [0.0, 1.0, 0.0, 1.0], [None] * 4, 4)
    assert [s.demonstration_index for s in signals] == [1, 3, 1, 1]
    assert [s.demonstration for s in signals] == ["c1", "c3", "c1", "c1"]
    assert all(s.has_signal for s in signals)


def test_only_success_gets_no_demonstration_when_self_excluded():
    signals = select(["c0", "c1", "c2"], [0.0, 1.0, 0.0], [None] * 3, 3)
    assert [s.demonstration_index for s in signals] == [1, None, 1]
    assert signals[1] == TeacherSignal(None, None, None)
    assert not signals[1].has_signal


def test_self_success_allowed_when_not_excluded():
    signals = select(["c0", "c1", "c2"], [1.0, 1.0, 0.0], [None] * 3, 3, dont_reprompt_on_self_success=False)
    assert [s.demonstration_index for s in signals] == [0, 0, 0]


def test_threshold_boundary_is_a_success():
    signals = select(["a", "b", "c"], [0.5, 0.4999, 0.0], [None] * 3, 3, success_reward_threshold=0.5)
    assert [s.demonstration_index for s in signals] == [None, 0, 0]


def test_nan_reward_is_never_a_success():
    signals = select(["nan", "ok", "bad"], [math.nan, 2.0, -1.0], [None] * 3, 3, success_reward_threshold=-math.inf)
    # Everything but the NaN clears a threshold of -inf; the NaN is never chosen as a demonstration.
    assert [s.demonstration_index for s in signals] == [1, 2, 1]
    signals = select(["nan", "x"], [math.nan, math.nan], [None] * 2, 2, success_reward_threshold=-math.inf)
    assert [s.demonstration_index for s in signals] == [None, None]


def test_groups_are_independent():
    signals = select(["a", "b", "c", "d"], [0.0, 1.0, 0.0, 0.0], [None] * 4, 2)
    assert [s.demonstration_index for s in signals] == [1, None, None, None]
    signals = select(["a", "b", "c", "d"], [0.0, 0.0, 1.0, 0.0], [None] * 4, 2)
    assert [s.demonstration_index for s in signals] == [None, None, None, 2]


@pytest.mark.parametrize("remove", [True, False])
def test_remove_thinking_from_demonstration(remove):
    signals = select(
        ["x", "<think>hmm</think>\n42"], [0.0, 1.0], [None, None], 2, remove_thinking_from_demonstration=remove
    )
    assert signals[0].demonstration == ("42" if remove else "<think>hmm</think>\n42")


# Completion 0 failed with a demonstration available, 1 succeeded (no peer success) and 2 failed in a group without
# success; each carries feedback.
FEEDBACK_CASES = {
    # (include_environment_feedback, environment_feedback_only_without_solution): feedback used by 0, 1, 2, 3
    (True, True): [None, "fb1", "fb2", "fb3"],
    (True, False): ["fb0", "fb1", "fb2", "fb3"],
    (False, True): [None, None, None, None],
    (False, False): [None, None, None, None],
}


@pytest.mark.parametrize(("include", "only_without_solution"), list(FEEDBACK_CASES))
def test_feedback_rules(include, only_without_solution):
    signals = select(
        ["a", "b", "c", "d"],
        [0.0, 1.0, 0.0, 0.0],
        ["fb0", "fb1", "fb2", "fb3"],
        2,
        include_environment_feedback=include,
        environment_feedback_only_without_solution=only_without_solution,
    )
    assert [s.feedback for s in signals] == FEEDBACK_CASES[include, only_without_solution]
    assert [s.demonstration_index for s in signals] == [1, None, None, None]
    assert [s.has_signal for s in signals] == [True, include, include, include]


def test_empty_or_whitespace_feedback_is_ignored_and_used_feedback_is_verbatim():
    feedback = ["", "  \n\t", None, "  line 3\n    detail\n"]
    signals = select(["a", "b", "c", "d"], [0.0] * 4, feedback, 4)
    assert [s.feedback for s in signals] == [None, None, None, "  line 3\n    detail\n"]
    assert [s.has_signal for s in signals] == [False, False, False, True]


@pytest.mark.parametrize(
    ("completions", "rewards", "feedback", "num_generations", "message"),
    [
        (["a", "b"], [1.0], [None, None], 2, "2, 1 and 2"),
        (["a", "b"], [1.0, 0.0], [None], 2, "2, 2 and 1"),
        (["a", "b", "c"], [1.0] * 3, [None] * 3, 2, r"\(3\).*\(2\)"),
        (["a"], [1.0], [None], 0, r"\(1\).*\(0\)"),
    ],
)
def test_bad_lengths_raise(completions, rewards, feedback, num_generations, message):
    with pytest.raises(ValueError, match=message):
        select(completions, rewards, feedback, num_generations)


def test_empty_batch_gives_no_signals():
    assert select([], [], [], 4) == []


# --------------------------------------------------------------------------------------------------------------------
# Truncation (D2)
# --------------------------------------------------------------------------------------------------------------------

LONG_DEMO = "START " + "the answer is 42, " * 40 + "END"
LONG_FEEDBACK = "BEGIN " + "wrong answer, expected 7. " * 40 + "FINISH"
SOLUTION_RE = re.compile(r"\nCorrect solution:\n\n(.*?)(?:\nThe following|\n\nCorrectly solve)", re.DOTALL)
FEEDBACK_RE = re.compile(r"earlier attempt:\n\n(.*)\n\nCorrectly solve", re.DOTALL)
USER_HEADER = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?"


def fixed_length(prompt, signal):
    emptied = TeacherSignal(None if signal.demonstration is None else "", None if signal.feedback is None else "", None)
    return len(render(prompt, emptied).input_ids)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_shortens_demonstration_and_keeps_scaffolding(side):
    signal = TeacherSignal(LONG_DEMO, None, 1)
    full = render(SYSTEM_USER, signal)
    limit = fixed_length(SYSTEM_USER, signal) + 20
    assert len(full.input_ids) > limit
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit, reprompt_truncation=side)

    assert isinstance(result, TeacherPrompt)
    assert result.truncated is True
    assert len(result.input_ids) <= limit
    assert result.input_ids == TOKENIZER(result.text, add_special_tokens=False)["input_ids"]
    assert result.text.startswith(USER_HEADER + "\nCorrect solution:\n\n")
    assert result.text.endswith(INSTRUCTION_TAIL)
    kept = SOLUTION_RE.search(result.text).group(1)
    assert 0 < len(kept) < len(LONG_DEMO)
    if side == "right":
        assert LONG_DEMO.startswith(kept) and "START" in kept and "END" not in kept
    else:
        assert LONG_DEMO.endswith(kept) and "END" in kept and "START" not in kept


def test_truncation_fits_within_a_few_tokens_of_the_limit():
    signal = TeacherSignal(LONG_DEMO, None, 1)
    limit = fixed_length(SYSTEM_USER, signal) + 30
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit)
    # The budget is used, not thrown away: at most a couple of tokens are lost to re-tokenization at the cut.
    assert limit - 3 <= len(result.input_ids) <= limit


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_rerenders_when_tokenization_is_not_additive(side):
    # " answer" is one word (2 tokens) in the fixed part but splits into extra tokens around the demonstration, so
    # the first cut overshoots the budget and must be re-rendered with a smaller one.
    templates = {**DEFAULT_TEMPLATES, "solution_template": " an{successful_previous_attempt}swer"}
    signal = TeacherSignal(LONG_DEMO, None, 1)
    empty = TeacherSignal("", None, None)
    limit = len(render(SYSTEM_USER, empty, templates=templates).input_ids) + 30
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit, reprompt_truncation=side, templates=templates)
    assert limit - 4 <= len(result.input_ids) <= limit
    kept = result.text.split("What is 2+2? an")[1].split("swer\n\nCorrectly")[0]
    assert LONG_DEMO.startswith(kept) if side == "right" else LONG_DEMO.endswith(kept)


def test_truncation_shares_budget_between_demonstration_and_feedback():
    signal = TeacherSignal(LONG_DEMO, LONG_FEEDBACK, 1)
    limit = fixed_length(SYSTEM_USER, signal) + 40
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit, reprompt_truncation="right")
    assert len(result.input_ids) <= limit
    demo, feedback = SOLUTION_RE.search(result.text).group(1), FEEDBACK_RE.search(result.text).group(1)
    assert LONG_DEMO.startswith(demo) and LONG_FEEDBACK.startswith(feedback)
    demo_tokens = len(TOKENIZER(demo, add_special_tokens=False)["input_ids"])
    feedback_tokens = len(TOKENIZER(feedback, add_special_tokens=False)["input_ids"])
    assert abs(demo_tokens - feedback_tokens) <= 3
    assert demo_tokens + feedback_tokens >= 34


def test_short_feedback_is_kept_whole_when_the_demonstration_is_long():
    signal = TeacherSignal(LONG_DEMO, "expected 7", 1)
    limit = fixed_length(SYSTEM_USER, signal) + 30
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit, reprompt_truncation="left")
    assert FEEDBACK_RE.search(result.text).group(1) == "expected 7"
    demo = SOLUTION_RE.search(result.text).group(1)
    assert LONG_DEMO.endswith(demo) and len(demo) > 20


def test_truncation_of_standard_prompt_keeps_prompt_and_instruction():
    signal = TeacherSignal(None, LONG_FEEDBACK, None)
    limit = fixed_length("What is 2+2?", signal) + 10
    result = render("What is 2+2?", signal, max_reprompt_length=limit, reprompt_truncation="left")
    assert len(result.input_ids) <= limit
    assert result.text.startswith("What is 2+2?\nThe following is feedback from your unsuccessful earlier attempt:\n\n")
    assert result.text.endswith("\n\nCorrectly solve the original question.")
    assert LONG_FEEDBACK.endswith(FEEDBACK_RE.search(result.text).group(1))


def test_truncation_to_the_fixed_part_empties_the_texts():
    signal = TeacherSignal(LONG_DEMO, LONG_FEEDBACK, 1)
    limit = fixed_length(SYSTEM_USER, signal)
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit)
    assert result.text == (
        USER_HEADER + "\nCorrect solution:\n\n\nThe following is feedback from your unsuccessful earlier attempt:"
        "\n\n" + INSTRUCTION_TAIL
    )


def test_prompt_that_fits_is_not_truncated():
    signal = TeacherSignal(LONG_DEMO, None, 1)
    full = render(SYSTEM_USER, signal)
    exact = render(SYSTEM_USER, signal, max_reprompt_length=len(full.input_ids), reprompt_truncation="error")
    assert exact == TeacherPrompt(full.text, full.input_ids, truncated=False)


def test_error_mode_raises_with_sample_index_and_lengths():
    signal = TeacherSignal(LONG_DEMO, None, 1)
    full_length = len(render(SYSTEM_USER, signal).input_ids)
    fixed = fixed_length(SYSTEM_USER, signal)
    with pytest.raises(
        ValueError, match=rf"sample 7 has {full_length} tokens.*{fixed}.*max_reprompt_length is {fixed + 5}: raise"
    ):
        render(SYSTEM_USER, signal, max_reprompt_length=fixed + 5, reprompt_truncation="error", sample_index=7)


@pytest.mark.parametrize("side", ["right", "left", "error"])
def test_impossible_fit_raises(side):
    signal = TeacherSignal(LONG_DEMO, LONG_FEEDBACK, 1)
    fixed = fixed_length(SYSTEM_USER, signal)
    with pytest.raises(ValueError, match=rf"sample 3 .*{fixed}.*max_reprompt_length is {fixed - 1}.*cannot fit"):
        render(SYSTEM_USER, signal, max_reprompt_length=fixed - 1, reprompt_truncation=side, sample_index=3)


@pytest.mark.parametrize(
    ("change", "needle"),
    [(dict(reprompt_truncation="middle"), "reprompt_truncation='middle'"), (dict(max_reprompt_length=0), "=0")],
)
def test_invalid_template_settings_raise(change, needle):
    with pytest.raises(ValueError, match=needle):
        render(SYSTEM_USER, DEMO_ONLY, **change)


@pytest.mark.parametrize("side", ["right", "left"])
def test_inputs_are_not_mutated(side):
    tokenizer = make_tokenizer()
    tokenizer.truncation_side = "left" if side == "right" else "right"
    truncation_side, padding_side = tokenizer.truncation_side, tokenizer.padding_side
    prompt = copy.deepcopy(MULTI_TURN)
    signal = TeacherSignal(LONG_DEMO, LONG_FEEDBACK, 1)
    result = render_teacher_prompt(
        prompt,
        signal,
        tokenizer,
        template_settings(fixed_length(MULTI_TURN, signal) + 20, side),
        chat_template_kwargs={},
    )
    assert result.truncated
    assert prompt == MULTI_TURN
    assert signal == TeacherSignal(LONG_DEMO, LONG_FEEDBACK, 1)
    assert (tokenizer.truncation_side, tokenizer.padding_side) == (truncation_side, padding_side)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    demonstration=st.one_of(st.none(), st.text(min_size=0, max_size=150)),
    feedback=st.one_of(st.none(), st.text(min_size=1, max_size=150)),
    extra=st.integers(min_value=0, max_value=120),
    side=st.sampled_from(["right", "left"]),
)
def test_truncation_property(demonstration, feedback, extra, side):
    """Any texts, any feasible limit: the result fits and holds a prefix (right) / suffix (left) of each text."""
    signal = TeacherSignal(demonstration, feedback, None if demonstration is None else 0)
    templates = {
        "solution_template": "<S>{successful_previous_attempt}</S>",
        "feedback_template": "<F>{feedback_raw}</F>",
        "reprompt_template": DEFAULT_REPROMPT_TEMPLATE,
    }
    empty = TeacherSignal(None if demonstration is None else "", None if feedback is None else "", None)
    limit = len(render(SYSTEM_USER, empty, templates=templates).input_ids) + extra
    result = render(SYSTEM_USER, signal, max_reprompt_length=limit, reprompt_truncation=side, templates=templates)

    assert len(result.input_ids) <= limit
    assert result.input_ids == TOKENIZER(result.text, add_special_tokens=False)["input_ids"]
    assert result.text.startswith(USER_HEADER)
    assert result.text.endswith(INSTRUCTION_TAIL)
    for original, pattern in ((demonstration, r"<S>(.*)</S>"), (feedback, r"<F>(.*)</F>")):
        match = re.search(pattern, result.text, re.DOTALL)
        assert (match is None) == (original is None)
        if original is not None:
            kept = match.group(1)
            assert original.startswith(kept) if side == "right" else original.endswith(kept)
            assert (kept == original) or result.truncated


PLACEHOLDER_LIKE = ["{prompt}", "{solution}", "{feedback}", "{feedback_raw}", "{successful_previous_attempt}", "{0}"]
tricky_text = st.lists(
    st.text(max_size=12) | st.sampled_from([*PLACEHOLDER_LIKE, "{", "}", "\\", "{{", "🙂"]), max_size=6
).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt_text=tricky_text.filter(bool),
    demonstration=tricky_text.filter(lambda text: text and "<think>" not in text),
    feedback=tricky_text.filter(str.strip),
)
def test_any_text_passes_through_selection_and_rendering_literally(prompt_text, demonstration, feedback):
    """Braces, placeholders, backslashes, any unicode: each text appears unchanged in the teacher prompt."""
    signals = select(
        ["wrong", demonstration],
        [0.0, 1.0],
        [feedback, None],
        2,
        environment_feedback_only_without_solution=False,
        remove_thinking_from_demonstration=False,
    )
    assert signals[0] == TeacherSignal(demonstration, feedback, 1)
    result = render([{"role": "user", "content": prompt_text}], signals[0])
    user_turn = DEFAULT_REPROMPT_TEMPLATE.format(  # one str.format pass: the values are never parsed
        prompt=prompt_text,
        solution=DEFAULT_SOLUTION_TEMPLATE.format(successful_previous_attempt=demonstration),
        feedback=DEFAULT_FEEDBACK_TEMPLATE.format(feedback_raw=feedback),
    )
    assert not result.truncated
    assert result.text == "<|im_start|>user\n" + user_turn + "<|im_end|>\n" + GENERATION_HEADER
