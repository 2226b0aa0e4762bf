"""The `self_distillation/*` signal fractions, and the metric names every module imports from `sdpo_rl.metrics`."""

import pytest

from sdpo_rl import metrics
from sdpo_rl.reprompt import SignalSettings, select_teacher_signals

COMPLETIONS = ["Paris", "Lyon", "Nice", "Rome"]
REWARDS = [1.0, 0.0, 0.0, 0.0]
FEEDBACK = ["", "Wrong city.", "Wrong city.", "  "]


def fractions(include_environment_feedback: bool) -> dict[str, float]:
    settings = SignalSettings(
        success_reward_threshold=1.0,
        dont_reprompt_on_self_success=True,
        remove_thinking_from_demonstration=False,
        include_environment_feedback=include_environment_feedback,
        environment_feedback_only_without_solution=True,
    )
    signals = select_teacher_signals(COMPLETIONS, REWARDS, FEEDBACK, 4, settings)
    return metrics.teacher_signal_metrics(
        signals, REWARDS, FEEDBACK, 4, 1.0, include_environment_feedback=include_environment_feedback
    )


def test_fractions_count_the_batch():
    result = fractions(include_environment_feedback=True)
    assert result[metrics.SUCCESS_GROUP_FRACTION] == 1.0
    assert result[metrics.SUCCESS_SAMPLE_FRACTION] == 0.75  # the three failures see "Paris"
    assert result[metrics.FEEDBACK_AVAILABLE_FRACTION] == 0.5  # blank feedback does not count
    assert result[metrics.FEEDBACK_USED_FRACTION] == 0.0  # feedback only without a demonstration
    assert result[metrics.REPROMPT_SAMPLE_FRACTION] == 0.75


def test_no_feedback_is_available_when_the_teacher_never_reads_it():
    result = fractions(include_environment_feedback=False)
    assert result[metrics.FEEDBACK_AVAILABLE_FRACTION] == 0.0
    assert result[metrics.FEEDBACK_USED_FRACTION] == 0.0
    assert result[metrics.REPROMPT_SAMPLE_FRACTION] == 0.75


def test_an_empty_batch_has_no_fractions():
    assert metrics.teacher_signal_metrics([], [], [], 4, 1.0) == {}


@pytest.mark.parametrize("name", [n for n in dir(metrics) if n.isupper() and n != "PREFIX"])
def test_metric_names_are_distinct_and_sdpo_names_share_the_prefix(name):
    names = [getattr(metrics, n) for n in dir(metrics) if n.isupper() and n != "PREFIX"]
    assert names.count(getattr(metrics, name)) == 1
    assert getattr(metrics, name).startswith(metrics.PREFIX) == (
        name not in ("REWARD", "ENTROPY", "COMPLETION_LENGTH", "STEP_TIME")
    )
