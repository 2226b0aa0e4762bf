"""Small verifiable tasks with feedback, for the demo, the examples and learning benchmarks.

Each `Task` gives TRL-ready datasets (conversational `prompt` column plus the columns its reward reads), a factory
of reward functions that return one `sdpo_rl.Scored(value, feedback)` per completion, and `is_correct` for
evaluation. Pure Python; the datasets are built in memory.

- `capitals`: "What is the capital of <country>? Answer with just the city name." The reward is 1 when the answer
  names the capital (case- and accent-insensitive). The feedback says the answer is wrong, without the right one.
- `short_answer`: "<easy question> Answer in at most five words." A length constraint, checked by counting
  words; the feedback says how many words the answer had and what the limit is, which tells the model how to fix
  its answer without giving it one.
- `one_word`: "<easy question> Answer in exactly one word." The same questions and word count, a constraint the
  untrained model rarely meets: most groups start without a success, and the feedback (how many words the answer
  had, one required) is the signal left to learn from.

Measured with SmolLM2-135M-Instruct at temperature 1.0, 8 samples on each of 12 prompts: `capitals` passes 24-40%
with 8-11 of 12 groups mixed; `short_answer` 21-25% with 10-12 of 12 groups mixed. Candidates rejected for those two
for passing too rarely: at most three words 6-17%, one word 3-12%, one lowercase word 2%, exactly five words 3%,
digits only 1%. `one_word` passes 8.3% of train and 4.2% of held-out samples at temperature 1.0, 4 samples per
prompt (benchmarks/base_pass_rate.py).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from .feedback import Scored
from .rewards.base import TRL_ARGUMENTS, FeedbackReward

# ---- capitals ------------------------------------------------------------------------------------------------------

# (country, capital, other accepted spellings). Only countries whose capital is unambiguous: no split or moving
# capitals (Bolivia, South Africa, Netherlands, Indonesia, ...), no city-states named like their capital.
CAPITALS: list[tuple[str, str, tuple[str, ...]]] = [
    ("France", "Paris", ()),
    ("Germany", "Berlin", ()),
    ("Italy", "Rome", ()),
    ("Spain", "Madrid", ()),
    ("Portugal", "Lisbon", ()),
    ("the United Kingdom", "London", ()),
    ("Ireland", "Dublin", ()),
    ("Belgium", "Brussels", ()),
    ("Austria", "Vienna", ()),
    ("Switzerland", "Bern", ("Berne",)),
    ("Poland", "Warsaw", ()),
    ("the Czech Republic", "Prague", ()),
    ("Hungary", "Budapest", ()),
    ("Greece", "Athens", ()),
    ("Denmark", "Copenhagen", ()),
    ("Sweden", "Stockholm", ()),
    ("Norway", "Oslo", ()),
    ("Finland", "Helsinki", ()),
    ("Iceland", "Reykjavik", ()),
    ("Estonia", "Tallinn", ()),
    ("Latvia", "Riga", ()),
    ("Lithuania", "Vilnius", ()),
    ("Ukraine", "Kyiv", ("Kiev",)),
    ("Russia", "Moscow", ()),
    ("Turkey", "Ankara", ()),
    ("Romania", "Bucharest", ()),
    ("Bulgaria", "Sofia", ()),
    ("Serbia", "Belgrade", ()),
    ("Croatia", "Zagreb", ()),
    ("Slovenia", "Ljubljana", ()),
    ("Slovakia", "Bratislava", ()),
    ("Albania", "Tirana", ("Tirane",)),
    ("Cyprus", "Nicosia", ()),
    ("Malta", "Valletta", ()),
    ("Georgia", "Tbilisi", ()),
    ("Armenia", "Yerevan", ()),
    ("Azerbaijan", "Baku", ()),
    ("Iran", "Tehran", ("Teheran",)),
    ("Iraq", "Baghdad", ()),
    ("Syria", "Damascus", ()),
    ("Jordan", "Amman", ()),
    ("Lebanon", "Beirut", ()),
    ("Saudi Arabia", "Riyadh", ()),
    ("Qatar", "Doha", ()),
    ("the United Arab Emirates", "Abu Dhabi", ()),
    ("Oman", "Muscat", ()),
    ("Afghanistan", "Kabul", ()),
    ("Pakistan", "Islamabad", ()),
    ("India", "New Delhi", ()),
    ("Nepal", "Kathmandu", ()),
    ("Bangladesh", "Dhaka", ()),
    ("Thailand", "Bangkok", ()),
    ("Vietnam", "Hanoi", ()),
    ("Cambodia", "Phnom Penh", ()),
    ("the Philippines", "Manila", ()),
    ("South Korea", "Seoul", ()),
    ("North Korea", "Pyongyang", ()),
    ("Japan", "Tokyo", ()),
    ("China", "Beijing", ()),
    ("Mongolia", "Ulaanbaatar", ("Ulan Bator",)),
    ("Australia", "Canberra", ()),
    ("New Zealand", "Wellington", ()),
    ("Canada", "Ottawa", ()),
    ("the United States", "Washington", ()),
    ("Mexico", "Mexico City", ()),
    ("Cuba", "Havana", ()),
    ("Jamaica", "Kingston", ()),
    ("Venezuela", "Caracas", ()),
    ("Colombia", "Bogota", ()),
    ("Ecuador", "Quito", ()),
    ("Peru", "Lima", ()),
    ("Chile", "Santiago", ()),
    ("Argentina", "Buenos Aires", ()),
    ("Uruguay", "Montevideo", ()),
    ("Paraguay", "Asuncion", ()),
    ("Brazil", "Brasilia", ()),
    ("Egypt", "Cairo", ()),
    ("Cameroon", "Yaounde", ()),
    ("Algeria", "Algiers", ()),
    ("Morocco", "Rabat", ()),
    ("Ethiopia", "Addis Ababa", ()),
    ("Kenya", "Nairobi", ()),
    ("Uganda", "Kampala", ()),
    ("Rwanda", "Kigali", ()),
    ("Zimbabwe", "Harare", ()),
    ("Mozambique", "Maputo", ()),
    ("Angola", "Luanda", ()),
    ("Ghana", "Accra", ()),
    ("Senegal", "Dakar", ()),
    ("Nigeria", "Abuja", ()),
]


def _fold(text: str) -> str:
    """Lowercase without accents: 'Bogotá' -> 'bogota', 'Chișinău' -> 'chisinau'."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _first_line(text: str, limit: int = 60) -> str:
    line = text.strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _split_every_third(items: list) -> tuple[list, list]:
    """Deterministic 2:1 train/held-out split: every third item is held out."""
    return [x for i, x in enumerate(items) if i % 3 != 2], [x for i, x in enumerate(items) if i % 3 == 2]


def _capitals_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows = [
        {
            "prompt": [
                {"role": "user", "content": f"What is the capital of {country}? Answer with just the city name."}
            ],
            "answer": capital,
            "aliases": [capital, *aliases],
            "country": country,
        }
        for country, capital, aliases in CAPITALS
    ]
    return _split_every_third(rows)


def _capitals_feedback(text: str, row: dict[str, Any]) -> str:
    folded = _fold(text)
    if any(_fold(name) in folded for name in row["aliases"]):
        return ""
    if not text.strip():
        return f"Incorrect: the answer is empty; name the capital of {row['country']}."
    return f"Incorrect: '{_first_line(text)}' is not the capital of {row['country']}."


# ---- short_answer --------------------------------------------------------------------------------------------------

# Easy questions: the model knows the answers, the task is to keep the answer short.
QUESTIONS = [
    "What color is the sky?", "What do bees make?", "Which animal says moo?", "What is frozen water called?",
    "What do you use to write on paper?", "Where do fish live?", "What is the opposite of hot?",
    "What season comes after winter?", "What do cows give us?", "What shape is a ball?",
    "What is the largest planet?", "What fruit is yellow and curved?", "What do plants need to grow?",
    "What color is grass?", "Which animal is called the king of the jungle?", "What do you call a baby cat?",
    "What do we use to smell?", "What falls from clouds when it rains?", "What gives us light during the day?",
    "What do you wear on your feet?", "What do birds build to lay their eggs in?", "What is the opposite of up?",
    "What do you call a baby dog?", "Which instrument has black and white keys?", "What is the capital of France?",
    "What do you drink when you are thirsty?", "What do chickens lay?", "What is bread mainly made from?",
    "What do you use to cut paper?", "What planet do we live on?", "Which animal has a long trunk?",
    "What color is a ripe tomato?", "What do you sleep on?", "Which month comes after June?",
    "What is the first meal of the day called?", "What is the opposite of night?",
    "What do you use to open a locked door?", "What is the tallest animal?", "What do bakers make?",
    "Which sport is played with a bat and a ball?", "What do you use to brush your teeth?",
    "What covers most of the Earth's surface?", "What do caterpillars turn into?",
    "What is the hottest season of the year?", "What do you call a house made of ice?",
]  # fmt: skip
SHORT_ANSWER_TEMPLATES = ["{question} Answer in at most five words.", "{question} Reply with five words or fewer."]
MAX_WORDS = 5
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")  # "don't" and "ice-cream" are one word each


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _question_rows(templates: list[str], **columns: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per question and template, with `columns` added to every row. Split by question, so the held-out
    prompts ask questions never asked in training."""
    train_questions, heldout_questions = _split_every_third(QUESTIONS)

    def rows(questions):
        return [
            {
                "prompt": [{"role": "user", "content": template.format(question=question)}],
                "question": question,
                **columns,
            }
            for question in questions
            for template in templates
        ]

    return rows(train_questions), rows(heldout_questions)


def _short_answer_feedback(text: str, row: dict[str, Any]) -> str:
    words, limit = count_words(text), row["max_words"]
    if 1 <= words <= limit:
        return ""
    if words == 0:
        return f"Incorrect: the answer has no words; answer the question in at most {limit} words."
    return f"Too long: the answer has {words} words, but at most {limit} are allowed. Answer in {limit} words or fewer."


# ---- one_word ------------------------------------------------------------------------------------------------------

# The same easy questions, answered with a single word: the untrained model rarely does it, so most groups start
# without a success, and the feedback (the word count) says how to fix the answer without giving one.
ONE_WORD_TEMPLATES = ["{question} Answer in exactly one word.", "{question} Reply with a single word."]


def _one_word_feedback(text: str, row: dict[str, Any]) -> str:
    words = count_words(text)
    if words == 1:
        return ""
    if words == 0:
        return "Incorrect: the answer has no words; answer the question with exactly one word."
    return (
        f"Too long: the answer has {words} words, but exactly one is required. Answer with a single word, no sentence."
    )


# ---- the Task API --------------------------------------------------------------------------------------------------


class TaskReward(FeedbackReward):
    """A TRL reward function for a task: `Scored(1.0)` when `feedback(text, row)` is "", else `Scored(0.0, feedback)`.

    The dataset columns TRL passes (one value per completion) form each completion's `row`. Like the other built-in
    rewards it also sets `last_feedback` to the same feedback (`sdpo_rl.rewards.FeedbackReward`).
    """

    def __init__(self, name: str, feedback: Callable[[str, dict[str, Any]], str]):
        super().__init__()
        self.__name__ = name
        self._feedback = feedback

    def score(self, texts: list[str], columns: Mapping[str, Any]) -> list[Scored]:
        keys = [
            k for k, v in columns.items() if k not in TRL_ARGUMENTS and isinstance(v, list) and len(v) == len(texts)
        ]
        rows = [{k: columns[k][i] for k in keys} for i in range(len(texts))]
        messages = [self._feedback(text, row) for text, row in zip(texts, rows, strict=True)]
        return [Scored(0.0, message) if message else Scored(1.0) for message in messages]


@dataclass(frozen=True)
class Task:
    """A verifiable task. Rows hold a conversational `prompt` and the columns its reward function reads.

    `rows()` returns the (train, held-out) rows; `feedback(text, row)` returns "" for a correct completion and
    otherwise the message the teacher reads.
    """

    name: str
    description: str
    rows: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]
    feedback: Callable[[str, dict[str, Any]], str]

    def train_dataset(self):
        """Training rows as a `datasets.Dataset` in TRL's conversational prompt format."""
        from datasets import Dataset

        return Dataset.from_list(self.rows()[0])

    def heldout_dataset(self):
        """Held-out rows, disjoint from the training rows, for evaluation."""
        from datasets import Dataset

        return Dataset.from_list(self.rows()[1])

    def reward_func(self) -> TaskReward:
        """A fresh reward function returning `Scored` values, named `<task>_reward`."""
        return TaskReward(f"{self.name}_reward", self.feedback)

    def is_correct(self, completion_text: str, row: dict[str, Any]) -> bool:
        return self.feedback(completion_text, row) == ""


TASKS: dict[str, Task] = {
    "capitals": Task(
        "capitals",
        "Name the capital of a country (feedback: wrong, without the answer).",
        _capitals_rows,
        _capitals_feedback,
    ),
    "short_answer": Task(
        "short_answer",
        "Answer an easy question in at most five words (feedback: how many words the answer had).",
        partial(_question_rows, SHORT_ANSWER_TEMPLATES, max_words=MAX_WORDS),
        _short_answer_feedback,
    ),
    "one_word": Task(
        "one_word",
        "Answer an easy question with exactly one word (feedback: how many words the answer had; few successes at "
        "first).",
        partial(_question_rows, ONE_WORD_TEMPLATES),
        _one_word_feedback,
    ),
}


def get_task(name: str) -> Task:
    """The task called `name` (one of `TASKS`)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"Unknown task {name!r}; choose one of {', '.join(TASKS)}.") from None
