"""The demo tasks: datasets, rewards, feedback (no model needed)."""

import pytest

from sdpo_rl.apps.tasks import (
    CAPITALS,
    CONTENT_FEEDBACK,
    HARD_CAPITALS,
    QUESTIONS,
    TASKS,
    TaskReward,
    _fold,
    count_words,
    get_task,
)
from sdpo_rl.feedback import Scored, collect_feedback, record_returns, snapshot_feedback


def as_completions(*texts):
    return [[{"role": "assistant", "content": text}] for text in texts]


def score(task, texts, rows):
    """Call a fresh reward function the way TRL does (columns as lists, one entry per completion); return the values
    and the feedback they carry."""
    reward = task.reward_func()
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    rewards = reward(
        prompts=[row["prompt"] for row in rows],
        completions=as_completions(*texts),
        completion_ids=[[1, 2]] * len(texts),
        trainer_state=None,
        **columns,
    )
    assert all(isinstance(value, Scored) for value in rewards)
    return rewards, [value.feedback for value in rewards]


def capital_row(country):
    rows = [*TASKS["capitals"].rows()[0], *TASKS["capitals"].rows()[1]]
    return next(row for row in rows if row["country"] == country)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_datasets_are_conversational_and_train_heldout_disjoint(name):
    task = get_task(name)
    train, heldout = task.train_dataset(), task.heldout_dataset()
    assert (len(train), len(heldout)) == ((40, 20) if name.startswith("capitals_hard") else (60, 30))
    for row in [*train, *heldout]:
        assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    train_prompts = {row["prompt"][0]["content"] for row in train}
    heldout_prompts = {row["prompt"][0]["content"] for row in heldout}
    assert (len(train_prompts), len(heldout_prompts)) == (len(train), len(heldout))
    assert not train_prompts & heldout_prompts
    # The split is deterministic.
    assert [r["prompt"] for r in task.heldout_dataset()] == [r["prompt"] for r in heldout]


def test_capitals_split_by_country_and_unique_countries():
    task = get_task("capitals")
    assert len({country for country, _, _ in CAPITALS}) == len(CAPITALS) == 90
    # Answering with the country's name must never count as naming its capital.
    assert not [(c, a) for c, capital, aliases in CAPITALS for a in (capital, *aliases) if a.lower() in c.lower()]
    train = {row["country"] for row in task.train_dataset()}
    heldout = {row["country"] for row in task.heldout_dataset()}
    assert not train & heldout
    row = capital_row("France")
    assert row["prompt"][0]["content"] == "What is the capital of France? Answer with just the city name."
    assert row["answer"] == "Paris"


@pytest.mark.parametrize(
    "name, first_heldout_prompts",
    [
        ("short_answer", ["Answer in at most five words.", "Reply with five words or fewer."]),
        ("one_word", ["Answer in exactly one word.", "Reply with a single word."]),
        ("short_answer_form", ["Answer in at most five words.", "Reply with five words or fewer."]),
        ("one_word_form", ["Answer in exactly one word.", "Reply with a single word."]),
    ],
)
def test_question_tasks_hold_out_unseen_questions(name, first_heldout_prompts):
    task = get_task(name)
    train, heldout = task.train_dataset(), task.heldout_dataset()
    assert not {r["question"] for r in train} & {r["question"] for r in heldout}
    assert [heldout[i]["prompt"][0]["content"] for i in (0, 1)] == [
        f"Which animal says moo? {instruction}" for instruction in first_heldout_prompts
    ]


def test_capitals_reward_and_feedback():
    task = get_task("capitals")
    rows = [capital_row(c) for c in ("France", "France", "Colombia", "Ukraine", "Ukraine", "Japan", "Japan", "Peru")]
    texts = ["Paris", "The capital of France is PARIS.", "Bogotá", "Kiev", "Kyiv", "Osaka\nor maybe Kyoto", "", "Lim"]
    rewards, feedback = score(task, texts, rows)
    assert rewards == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert feedback[:5] == [""] * 5
    assert feedback[5] == "Incorrect: 'Osaka' is not the capital of Japan."
    assert "empty" in feedback[6] and "Japan" in feedback[6]
    assert feedback[7] == "Incorrect: 'Lim' is not the capital of Peru."
    assert task.is_correct("Tokyo!", rows[5]) and not task.is_correct("Osaka", rows[5])


def test_capitals_feedback_never_reveals_the_answer():
    task = get_task("capitals")
    rows = [*task.train_dataset(), *task.heldout_dataset()]
    rewards, feedback = score(task, ["I do not know."] * len(rows), rows)
    assert rewards == [0.0] * len(rows)
    for row, message in zip(rows, feedback, strict=True):
        assert message.startswith("Incorrect") and row["country"] in message
        assert all(alias.lower() not in message.lower() for alias in row["aliases"]), message


def test_short_answer_form_reward_and_feedback_count_the_words():
    task = get_task("short_answer_form")
    row = task.train_dataset()[0]
    texts = ["Blue.", "The sky is blue!", "It's a light-blue sky today.", "The sky is blue during the day.", "", "..."]
    rewards, feedback = score(task, texts, [row] * len(texts))
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert feedback[:3] == ["", "", ""]
    assert feedback[3] == "Too long: the answer has 7 words, but at most 5 are allowed. Answer in 5 words or fewer."
    assert "no words" in feedback[4] and feedback[4] == feedback[5]
    assert count_words("Don't use ice-cream, über-cool naïve words") == 6


def test_one_word_form_reward_and_feedback_count_the_words():
    task = get_task("one_word_form")
    row = task.train_dataset()[0]
    texts = ["Blue.", " **blue**\n", "light-blue", "The sky is blue.", "Blue sky", "", "..."]
    rewards, feedback = score(task, texts, [row] * len(texts))
    assert rewards == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert feedback[:3] == ["", "", ""]
    assert feedback[3] == (
        "Too long: the answer has 4 words, but exactly one is required. Answer with a single word, no sentence."
    )
    assert feedback[4].startswith("Too long: the answer has 2 words,")
    assert (
        feedback[5] == feedback[6] == "Incorrect: the answer has no words; answer the question with exactly one word."
    )


def test_one_word_form_feedback_never_contains_the_answer():
    task = get_task("one_word_form")
    rows = [*task.train_dataset(), *task.heldout_dataset()]
    answers = {"What color is the sky?": "blue", "What do bees make?": "honey", "Which animal says moo?": "cow"}
    for row in rows:
        answer = answers.get(row["question"], "zebra")
        texts = [f"The {answer} is it.", f"{answer.upper()}, of course", f"{answer}\n\n{row['question']}", ""]
        for text, message in zip(texts, score(task, texts, [row] * len(texts))[1], strict=True):
            assert message and answer not in message.lower(), (text, message)
            # It depends on the number of words alone, so no answer can reach it.
            assert message == task.feedback(" ".join(["word"] * count_words(text)), row)


# ---- answer-checked questions --------------------------------------------------------------------------------------


def question_row(name, question):
    return next(row for part in get_task(name).rows() for row in part if row["question"] == question)


def test_every_question_has_accepted_answers_none_of_them_in_the_question():
    assert len({question for question, _ in QUESTIONS}) == len(QUESTIONS) == 45
    for question, answers in QUESTIONS:
        assert answers and all(answer == _fold(answer) and answer.strip() for answer in answers), question
        assert not set(answers) & set(_fold(question).replace("?", "").replace("'s", "").split()), question
    assert question_row("one_word", "What do bees make?")["answers"] == ["honey", "wax", "beeswax"]


def test_one_word_checks_the_answer_and_its_form():
    task = get_task("one_word")
    row = question_row("one_word", "What do bees make?")
    texts = ["Honey.", " **HONEY**\n", "double 🌙", "Sugar", "Bees make honey.", "Bees make sugar.", "", "Honeycomb"]
    rewards, feedback = score(task, texts, [row] * len(texts))
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # Right form, wrong content (the "double 🌙", once accepted): the content feedback alone.
    assert feedback[2] == feedback[3] == feedback[7] == CONTENT_FEEDBACK
    # Right content, wrong form: the form feedback alone, as the form-only task gives it.
    assert feedback[4] == get_task("one_word_form").feedback(texts[4], row)
    assert feedback[4].startswith("Too long: the answer has 3 words")
    # Both wrong: both named. No words: the form feedback.
    assert feedback[5] == f"{CONTENT_FEEDBACK} {feedback[4]}"
    assert feedback[6] == "Incorrect: the answer has no words; answer the question with exactly one word."
    assert get_task("one_word_form").is_correct("double 🌙", row)


def test_short_answer_checks_the_answer_and_its_form():
    task = get_task("short_answer")
    row = question_row("short_answer", "What color is the sky?")
    texts = ["The sky is blue!", "Light-blue.", "The sky is green.", "The sky is blue during the day.", "Azure"]
    rewards, feedback = score(task, texts, [row] * len(texts))
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert feedback[2] == feedback[4] == CONTENT_FEEDBACK
    assert feedback[3] == "Too long: the answer has 7 words, but at most 5 are allowed. Answer in 5 words or fewer."


@pytest.mark.parametrize("name", ["short_answer", "one_word"])
def test_answer_checked_feedback_never_contains_an_accepted_answer(name):
    task = get_task(name)
    rows = [*task.train_dataset(), *task.heldout_dataset()]
    texts = ["zebra", "A zebra, of course, and nothing else at all.", "", "I think that it is a zebra."]
    for row in rows:
        for message in score(task, texts, [row] * len(texts))[1]:
            assert message and not set(row["answers"]) & set(_fold(message).replace(".", " ").split()), message


# ---- the controls --------------------------------------------------------------------------------------------------


def test_hard_capitals_are_new_unique_and_unambiguous():
    countries = [country for country, _, _ in HARD_CAPITALS]
    assert len(set(countries)) == len(countries) == 60
    assert not set(countries) & {country for country, _, _ in CAPITALS}
    assert not [(c, a) for c, capital, aliases in HARD_CAPITALS for a in (capital, *aliases) if a.lower() in c.lower()]


def test_positive_control_rows_carry_the_capital_as_privileged_context_for_the_teacher_only():
    task = get_task("capitals_hard")
    rows = [*task.train_dataset(), *task.heldout_dataset()]
    for row in rows:
        assert row["privileged_context"] == f"The capital of {row['country']} is {row['answer']}."
        assert row["answer"] not in row["prompt"][0]["content"]
    row = next(row for row in rows if row["country"] == "Bhutan")
    rewards, feedback = score(task, ["Thimphu", "Paro"], [row, row])
    assert rewards == [1.0, 0.0] and feedback[1] == "Incorrect: 'Paro' is not the capital of Bhutan."


def test_negative_control_asks_the_same_and_says_only_incorrect():
    positive, negative = get_task("capitals_hard"), get_task("capitals_hard_uninformative")
    for ours, theirs in zip(negative.rows(), positive.rows(), strict=True):
        assert [{k: v for k, v in row.items() if k != "privileged_context"} for row in theirs] == ours
        assert not any("privileged_context" in row for row in ours)
    rows = negative.rows()[1]
    texts = [row["answer"] if i % 2 else "Paris" for i, row in enumerate(rows)]
    rewards, feedback = score(negative, texts, rows)
    assert rewards == [float(i % 2) for i in range(len(rows))]
    assert feedback == ["Incorrect." if i % 2 == 0 else "" for i in range(len(rows))]
    assert [positive.is_correct(t, r) for t, r in zip(texts, rows, strict=True)] == [bool(i % 2) for i in range(20)]


def test_answer_checked_tasks_and_controls_come_first_form_only_last():
    assert list(TASKS) == [
        "capitals",
        "short_answer",
        "one_word",
        "capitals_hard",
        "capitals_hard_uninformative",
        "short_answer_form",
        "one_word_form",
    ]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reward_returns_scored_feedback_the_trainer_collects(name):
    task = get_task(name)
    rows = list(task.train_dataset())[:2]
    reward = task.reward_func()
    assert isinstance(reward, TaskReward) and reward.__name__ == f"{name}_reward"
    assert reward is not task.reward_func()
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    recorder = record_returns(reward)  # what SDPOTrainer wraps every reward function in
    for texts in (["", "one two three four five six seven eight"], ["nine words is too long for every task here", ""]):
        before = snapshot_feedback([recorder])
        values = recorder(prompts=[r["prompt"] for r in rows], completions=as_completions(*texts), **columns)
        expected = [task.feedback(text, row) for text, row in zip(texts, rows, strict=True)]
        assert [value.feedback for value in values] == expected and all(expected)
        assert values == [0.0, 0.0]
        # The library's feedback collection reads the returned values.
        assert collect_feedback([recorder], [recorder.__name__], before, 2) == expected


def test_reward_accepts_plain_text_completions():
    task = get_task("capitals")
    row = capital_row("France")
    reward = task.reward_func()
    assert reward(prompts=[row["prompt"]], completions=["Paris"], aliases=[row["aliases"]], country=["France"]) == [1.0]


def test_unknown_task_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="capitals"):
        get_task("chess")


# ---- evaluation ----------------------------------------------------------------------------------------------------


def test_heldout_accuracy_is_reproducible_and_leaves_rng_and_mode_alone():
    import torch
    from tiny import make_model, make_tokenizer

    from sdpo_rl.evaluation import heldout_accuracy, sample_completions

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    model.train()
    tokenizer.padding_side = "right"
    task = get_task("capitals")
    heldout = task.heldout_dataset().select(range(3))

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = heldout_accuracy(model, tokenizer, heldout, task, samples_per_prompt=2, max_new_tokens=5, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG state is restored"
    assert model.training and tokenizer.padding_side == "right", "mode and padding side are restored"
    assert first["num_samples"] == 6 and 0.0 <= first["accuracy"] <= 1.0
    assert 1 <= first["mean_completion_length"] <= 5
    again = heldout_accuracy(model, tokenizer, heldout, task, samples_per_prompt=2, max_new_tokens=5, batch_size=4)
    assert again == first

    samples = sample_completions(
        model, tokenizer, [r["prompt"] for r in heldout], samples_per_prompt=2, max_new_tokens=5, batch_size=4
    )
    assert [len(group) for group in samples] == [2, 2, 2]
    other_seed = sample_completions(
        model, tokenizer, [r["prompt"] for r in heldout], samples_per_prompt=2, max_new_tokens=5, seed=1
    )
    assert other_seed != samples


def test_sampling_on_a_cpu_prefills_each_prompt_of_a_batch_once(monkeypatch):
    """The same samples as with the full prefill; per batch, the prefill embeds each prompt once, less its last
    token, where it embedded every row's prompt."""
    from tiny import embedded_positions, make_model, make_tokenizer

    from sdpo_rl import evaluation

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    prompts = [r["prompt"] for r in get_task("capitals").heldout_dataset().select(range(3))]

    def sampled():
        with embedded_positions(model) as embedded:
            samples = evaluation.sample_completions(
                model, tokenizer, prompts, samples_per_prompt=3, max_new_tokens=5, batch_size=6
            )
        return samples, sum(embedded)

    shared, shared_positions = sampled()
    monkeypatch.setattr(evaluation, "generate_sharing_prompts", lambda model, generate, **kwargs: generate(**kwargs))
    full, full_positions = sampled()
    assert shared == full
    lengths = [
        len(tokenizer(tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)).input_ids)
        for p in prompts
    ]
    saved = 0
    for batch in (lengths[:2], lengths[2:]):  # 6 rows: 2 prompts x 3 samples; then 3 rows
        padded = max(batch)
        saved += 3 * len(batch) * padded - (len(batch) * (padded - 1) + 3 * len(batch))
    assert full_positions - shared_positions == saved > 0


def test_heldout_accuracy_scores_with_the_task(monkeypatch):
    from sdpo_rl import evaluation

    task = get_task("capitals")
    heldout = task.heldout_dataset().select(range(2))  # Italy (Rome), then the next held-out country
    fake = [[("Rome", 3), ("Milan", 5)], [("no idea", 4), ("no idea", 4)]]
    monkeypatch.setattr(evaluation, "sample_completions", lambda *args, **kwargs: fake)
    result = evaluation.heldout_accuracy(None, None, heldout, task, samples_per_prompt=2)
    assert result["accuracy"] == 0.25 and result["mean_completion_length"] == 4.0
    assert result["prompts_with_a_pass"] == 0.5
    assert result["examples"][0] == (heldout[0]["prompt"][0]["content"], "Rome")
