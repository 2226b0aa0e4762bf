import logging

import pytest

from sdpo_rl.feedback import collect_feedback, dataset_feedback, record_returns, snapshot_feedback


class Scorer:
    def __init__(self, feedback):
        self.next_feedback = feedback
        self.last_feedback = None

    def __call__(self):
        self.last_feedback = self.next_feedback


def run(funcs, num, dataset=None):
    before = snapshot_feedback(funcs)
    for func in funcs:
        func()
    return collect_feedback(funcs, [f"f{i}" for i in range(len(funcs))], before, num, dataset)


def test_single_function_feedback_passes_through():
    assert run([Scorer(["bad", "", None])], 3) == ["bad", "", ""]


def test_several_sources_are_joined_dataset_first_and_empties_skipped():
    funcs = [Scorer(["a", "  ", "c"]), Scorer(["x", "y", ""])]
    assert run(funcs, 3, dataset=["D", None, ""]) == ["D\n\na\n\nx", "y", "c"]


def test_no_feedback_anywhere_gives_empty_strings():
    plain = lambda: None  # noqa: E731  (a reward function without the attribute)
    assert run([plain], 2) == ["", ""]


def test_stale_feedback_is_ignored_with_warning(caplog):
    func = Scorer(["old", "old"])
    func()
    before = snapshot_feedback([func])
    with caplog.at_level(logging.WARNING):
        result = collect_feedback([func], ["stale_func"], before, 2)
    assert result == ["", ""]
    assert "stale_func" in caplog.text


def test_wrong_length_names_the_function():
    with pytest.raises(ValueError, match=r"'f0'.*2 entries but 3"):
        run([Scorer(["a", "b"])], 3)


def test_non_string_entry_names_index_and_type():
    with pytest.raises(TypeError, match=r"\[1\] is int"):
        run([Scorer(["a", 5])], 2)


def test_string_instead_of_list_is_rejected():
    with pytest.raises(TypeError, match="one feedback string per completion"):
        run([Scorer("abc")], 3)


def test_dataset_column_wrong_length():
    with pytest.raises(ValueError, match="dataset column 'feedback'"):
        run([], 2, dataset=["a"])


def test_scored_is_a_float_that_carries_feedback_and_pickles():
    import pickle

    from sdpo_rl.feedback import Scored

    value = Scored(0.25, "wrong answer on test 2")
    assert value == 0.25 and isinstance(value, float) and value.feedback == "wrong answer on test 2"
    assert pickle.loads(pickle.dumps(value)).feedback == "wrong answer on test 2"
    with pytest.raises(TypeError, match="feedback must be a str"):
        Scored(1.0, None)


def test_returned_feedback_wins_over_the_attribute_and_plain_floats_have_none():
    from sdpo_rl.feedback import Scored, record_returns

    class Both:
        __name__ = "both"

        def __init__(self):
            self.last_feedback = None

        def __call__(self):
            self.last_feedback = ["attribute", "attribute"]
            return [Scored(0.0, "returned"), 1.0]

    recorder = record_returns(Both())
    before = snapshot_feedback([recorder])
    recorder()
    assert recorder.__name__ == "both"
    assert collect_feedback([recorder], ["both"], before, 2) == ["returned", ""]


def test_async_recorder_stays_async_and_records():
    import asyncio

    from trl.trainer.utils import is_async_callable

    from sdpo_rl.feedback import Scored, record_returns

    async def judge(values):
        await asyncio.sleep(0)
        return [Scored(v, f"saw {v}") for v in values]

    recorder = record_returns(judge)
    assert is_async_callable(recorder)
    assert asyncio.run(recorder([1.0, 0.0])) == [1.0, 0.0]
    assert collect_feedback([recorder], ["judge"], [None], 2) == ["saw 1.0", "saw 0.0"]


def test_a_reward_function_that_raises_is_named_in_a_note_on_its_own_error():
    def exact_match(completions, **kwargs):
        raise KeyError("answer")

    recorder = record_returns(exact_match)
    with pytest.raises(KeyError) as error:
        recorder(completions=["a"])
    assert error.value.__notes__ == ["Raised by the reward function 'exact_match'."]


@pytest.mark.parametrize("column", ["feedback", "privileged_context"])
def test_dataset_feedback_reads_the_feedback_column_or_its_alias_privileged_context(column):
    inputs = [{"prompt": "p", column: "The capital of Bhutan is Thimphu."}, {"prompt": "q", column: None}]
    assert dataset_feedback(inputs) == ["The capital of Bhutan is Thimphu.", None]
    assert dataset_feedback([{"prompt": "p", "answer": "4"}]) is None


def test_dataset_feedback_rejects_both_columns_and_names_them():
    with pytest.raises(ValueError, match="both a 'feedback' and a 'privileged_context' column"):
        dataset_feedback([{"prompt": "p", "feedback": "a", "privileged_context": "b"}])


def test_dataset_feedback_names_the_column_of_a_bad_entry():
    with pytest.raises(TypeError, match=r"dataset column 'privileged_context'\[1\] is int"):
        dataset_feedback([{"privileged_context": "a"}, {"privileged_context": 3}])
