"""Small verifiable tasks with feedback, for the demo, the examples and learning benchmarks.

Each `Task` gives TRL-ready datasets (conversational `prompt` column plus the columns its reward reads), a factory
of reward functions that return one `sdpo_rl.Scored(value, feedback)` per completion, and `is_correct` for
evaluation. Pure Python; the datasets are built in memory. No feedback ever contains the answer.

Answer-checked tasks (the answer must be right, and in the asked form):

- `capitals`: "What is the capital of <country>? Answer with just the city name." The reward is 1 when the answer
  names the capital (case- and accent-insensitive). The feedback says the answer is wrong, without the right one.
- `short_answer`: "<easy question> Answer in at most five words." Right when one of the question's accepted answers
  (`QUESTIONS`, case and accents folded) is among the answer's words and it has one to five words. The feedback
  names what was wrong: the word count (and the limit), the content ("not right"), or both.
- `one_word`: "<easy question> Answer in exactly one word." The same questions and checks with exactly one word, a
  form the untrained model rarely meets.
- `capitals_hard` (positive control): `capitals` for less-known countries (`HARD_CAPITALS`), which the untrained
  model rarely answers, so most groups start without a success and GRPO has little signal. Each row's
  `privileged_context` column ("The capital of <country> is <capital>.") is read by the teacher, never by the
  student (docs/rewards.md): SDPO as on-policy distillation from privileged information.
- `capitals_hard_uninformative` (negative control): the same questions, no privileged context, and feedback that
  carries no information ("Incorrect.").

Form-only tasks (the content is not checked: their results measure format compliance):

- `short_answer_form`: `short_answer` with the word count checked alone (the task called `short_answer` before).
- `one_word_form`: `one_word` with the word count checked alone (the task called `one_word` before).

Measured with SmolLM2-135M-Instruct at temperature 1.0, 8 samples on each of 12 prompts: `capitals` passes 24-40%
with 8-11 of 12 groups mixed; `short_answer_form` 21-25% with 10-12 of 12 groups mixed. Candidates rejected for those
two for passing too rarely: at most three words 6-17%, one word 3-12%, one lowercase word 2%, exactly five words 3%,
digits only 1%. `one_word_form` passes 8.3% of train and 4.2% of held-out samples at temperature 1.0, 4 samples per
prompt. Answer-checked, 8 samples on each of the first 12 train prompts at temperature 1.0: `capitals_hard` 1.0%,
`one_word` 0%, `short_answer` 2.1% (benchmarks/base_pass_rate.py; the tables are in benchmarks/README.md).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..feedback import Scored
from ..rewards.base import TRL_ARGUMENTS, FeedbackReward

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

# The positive and negative controls' countries: less-known ones whose capital SmolLM2-135M-Instruct rarely names
# (benchmarks/base_pass_rate.py), again only unambiguous capitals (no Benin, Tanzania, Sri Lanka, Eswatini, ...) and
# none named inside its country's name (no Guinea-Bissau, Tunisia, Djibouti, ...).
HARD_CAPITALS: list[tuple[str, str, tuple[str, ...]]] = [
    ("Bhutan", "Thimphu", ()),
    ("Burkina Faso", "Ouagadougou", ()),
    ("Kyrgyzstan", "Bishkek", ()),
    ("Tajikistan", "Dushanbe", ()),
    ("Turkmenistan", "Ashgabat", ("Ashkhabad",)),
    ("Uzbekistan", "Tashkent", ("Toshkent",)),
    ("Laos", "Vientiane", ()),
    ("Brunei", "Bandar Seri Begawan", ()),
    ("Eritrea", "Asmara", ("Asmera",)),
    ("Chad", "N'Djamena", ("Ndjamena", "N’Djamena", "N Djamena")),
    ("Niger", "Niamey", ()),
    ("Mali", "Bamako", ()),
    ("Mauritania", "Nouakchott", ()),
    ("Gabon", "Libreville", ()),
    ("the Republic of the Congo", "Brazzaville", ()),
    ("the Central African Republic", "Bangui", ()),
    ("Malawi", "Lilongwe", ()),
    ("Zambia", "Lusaka", ()),
    ("Botswana", "Gaborone", ()),
    ("Namibia", "Windhoek", ()),
    ("Lesotho", "Maseru", ()),
    ("Madagascar", "Antananarivo", ()),
    ("the Comoros", "Moroni", ()),
    ("Mauritius", "Port Louis", ("Port-Louis",)),
    ("Togo", "Lome", ()),
    ("Guinea", "Conakry", ()),
    ("Sierra Leone", "Freetown", ()),
    ("Liberia", "Monrovia", ()),
    ("the Gambia", "Banjul", ()),
    ("Cape Verde", "Praia", ()),
    ("Sudan", "Khartoum", ()),
    ("South Sudan", "Juba", ()),
    ("Somalia", "Mogadishu", ()),
    ("Bahrain", "Manama", ()),
    ("Papua New Guinea", "Port Moresby", ()),
    ("Fiji", "Suva", ()),
    ("Samoa", "Apia", ()),
    ("Tonga", "Nuku'alofa", ("Nukualofa", "Nuku’alofa")),
    ("Vanuatu", "Port Vila", ("Port-Vila",)),
    ("the Solomon Islands", "Honiara", ()),
    ("Tuvalu", "Funafuti", ()),
    ("Palau", "Ngerulmud", ()),
    ("the Marshall Islands", "Majuro", ()),
    ("Suriname", "Paramaribo", ()),
    ("Guyana", "Georgetown", ()),
    ("Belize", "Belmopan", ()),
    ("Honduras", "Tegucigalpa", ()),
    ("Nicaragua", "Managua", ()),
    ("Haiti", "Port-au-Prince", ("Port au Prince",)),
    ("the Dominican Republic", "Santo Domingo", ()),
    ("Barbados", "Bridgetown", ()),
    ("Trinidad and Tobago", "Port of Spain", ("Port-of-Spain",)),
    ("the Bahamas", "Nassau", ()),
    ("Saint Lucia", "Castries", ()),
    ("Moldova", "Chisinau", ("Kishinev",)),
    ("Belarus", "Minsk", ()),
    ("North Macedonia", "Skopje", ()),
    ("Bosnia and Herzegovina", "Sarajevo", ()),
    ("Montenegro", "Podgorica", ()),
    ("Liechtenstein", "Vaduz", ()),
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


def _capitals_rows(
    table: list[tuple[str, str, tuple[str, ...]]], privileged_context: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per country of `table`; with `privileged_context`, each row states its capital for the teacher."""
    rows = [
        {
            "prompt": [
                {"role": "user", "content": f"What is the capital of {country}? Answer with just the city name."}
            ],
            "answer": capital,
            "aliases": [capital, *aliases],
            "country": country,
            **({"privileged_context": f"The capital of {country} is {capital}."} if privileged_context else {}),
        }
        for country, capital, aliases in table
    ]
    return _split_every_third(rows)


def _names_the_capital(text: str, row: dict[str, Any]) -> bool:
    folded = _fold(text)
    return any(_fold(name) in folded for name in row["aliases"])


def _capitals_feedback(text: str, row: dict[str, Any]) -> str:
    if _names_the_capital(text, row):
        return ""
    if not text.strip():
        return f"Incorrect: the answer is empty; name the capital of {row['country']}."
    return f"Incorrect: '{_first_line(text)}' is not the capital of {row['country']}."


def _uninformative_capitals_feedback(text: str, row: dict[str, Any]) -> str:
    """The negative control's feedback: right or wrong, and nothing else."""
    return "" if _names_the_capital(text, row) else "Incorrect."


# ---- questions: short_answer, one_word and their form-only versions ------------------------------------------------

# Easy questions the model knows the answers to, with their accepted answers: an answer is right when one of them is
# among its words (case and accents folded; see `_has_accepted_answer`). None of them is a word of its own question,
# so repeating the question never counts as an answer.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    ("What color is the sky?", ("blue",)),
    ("What do bees make?", ("honey", "wax", "beeswax")),
    ("Which animal says moo?", ("cow", "cows", "cattle")),
    ("What is frozen water called?", ("ice",)),
    ("What do you use to write on paper?", ("pen", "pens", "pencil", "pencils", "crayon", "crayons", "marker")),
    ("Where do fish live?", ("water", "sea", "seas", "ocean", "oceans", "river", "rivers", "lake", "lakes", "pond")),
    ("What is the opposite of hot?", ("cold",)),
    ("What season comes after winter?", ("spring",)),
    ("What do cows give us?", ("milk", "dairy", "beef", "meat", "leather")),
    ("What shape is a ball?", ("round", "sphere", "spherical", "circle", "circular")),
    ("What is the largest planet?", ("jupiter",)),
    ("What fruit is yellow and curved?", ("banana", "bananas")),
    ("What do plants need to grow?", ("water", "sunlight", "sun", "light", "soil", "nutrients", "air", "co2")),
    ("What color is grass?", ("green",)),
    ("Which animal is called the king of the jungle?", ("lion", "lions")),
    ("What do you call a baby cat?", ("kitten", "kittens", "kitty")),
    ("What do we use to smell?", ("nose", "noses", "nostrils")),
    ("What falls from clouds when it rains?", ("rain", "water", "raindrops", "drops", "droplets")),
    ("What gives us light during the day?", ("sun", "sunlight", "sunshine")),
    ("What do you wear on your feet?", ("shoes", "shoe", "socks", "sock", "boots", "sneakers", "sandals", "slippers")),
    ("What do birds build to lay their eggs in?", ("nest", "nests")),
    ("What is the opposite of up?", ("down",)),
    ("What do you call a baby dog?", ("puppy", "puppies", "pup", "pups")),
    ("Which instrument has black and white keys?", ("piano", "pianos", "keyboard", "organ")),
    ("What is the capital of France?", ("paris",)),
    ("What do you drink when you are thirsty?", ("water", "juice", "milk", "lemonade", "tea")),
    ("What do chickens lay?", ("eggs", "egg")),
    ("What is bread mainly made from?", ("flour", "wheat", "grain", "grains", "dough")),
    ("What do you use to cut paper?", ("scissors", "scissor", "knife", "blade", "cutter")),
    ("What planet do we live on?", ("earth",)),
    ("Which animal has a long trunk?", ("elephant", "elephants")),
    ("What color is a ripe tomato?", ("red",)),
    ("What do you sleep on?", ("bed", "beds", "mattress", "pillow")),
    ("Which month comes after June?", ("july",)),
    ("What is the first meal of the day called?", ("breakfast",)),
    ("What is the opposite of night?", ("day", "daytime")),
    ("What do you use to open a locked door?", ("key", "keys")),
    ("What is the tallest animal?", ("giraffe", "giraffes")),
    ("What do bakers make?", ("bread", "breads", "cake", "cakes", "pastry", "pastries", "cookies", "buns")),
    ("Which sport is played with a bat and a ball?", ("baseball", "cricket", "softball")),
    ("What do you use to brush your teeth?", ("toothbrush", "toothbrushes", "toothpaste")),
    ("What covers most of the Earth's surface?", ("water", "ocean", "oceans", "sea", "seas")),
    ("What do caterpillars turn into?", ("butterfly", "butterflies", "moth", "moths")),
    ("What is the hottest season of the year?", ("summer",)),
    ("What do you call a house made of ice?", ("igloo", "igloos")),
]
SHORT_ANSWER_TEMPLATES = ["{question} Answer in at most five words.", "{question} Reply with five words or fewer."]
MAX_WORDS = 5
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")  # "don't" and "ice-cream" are one word each
_PART = re.compile(r"[^\W_]+")  # the parts of "light-blue" are "light" and "blue"
CONTENT_FEEDBACK = "Wrong answer: the answer to the question is not right."


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def _has_accepted_answer(text: str, answers: list[str]) -> bool:
    """Whether one of `answers` is among the words (or parts of hyphenated words) of `text`, case and accents
    folded: "Honey!" and "Bees make honey." answer "What do bees make?", "Honeycomb" does not."""
    return not set(_PART.findall(_fold(text))).isdisjoint(map(_fold, answers))


def _question_rows(templates: list[str], **columns: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row per question and template, with its accepted `answers` and `columns` added to every row. Split by
    question, so the held-out prompts ask questions never asked in training."""
    train_questions, heldout_questions = _split_every_third(QUESTIONS)

    def rows(questions):
        return [
            {
                "prompt": [{"role": "user", "content": template.format(question=question)}],
                "question": question,
                "answers": list(answers),
                **columns,
            }
            for question, answers in questions
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


def _answer_checked(form_feedback: Callable[[str, dict[str, Any]], str], text: str, row: dict[str, Any]) -> str:
    """Feedback on form and content: "" when both hold, else what was wrong (the content, the form or both), never
    the answer. An answer without words gets the form's feedback alone."""
    form = form_feedback(text, row)
    if _has_accepted_answer(text, row["answers"]) or not count_words(text):
        return form
    return f"{CONTENT_FEEDBACK} {form}" if form else CONTENT_FEEDBACK


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
    # Answer-checked tasks first (the CLIs list them in this order), then the controls, then the form-only tasks.
    "capitals": Task(
        "capitals",
        "Name the capital of a country (feedback: wrong, without the answer).",
        partial(_capitals_rows, CAPITALS),
        _capitals_feedback,
    ),
    "short_answer": Task(
        "short_answer",
        "Answer an easy question rightly in at most five words (feedback: wrong content, or how many words the answer "
        "had).",
        partial(_question_rows, SHORT_ANSWER_TEMPLATES, max_words=MAX_WORDS),
        partial(_answer_checked, _short_answer_feedback),
    ),
    "one_word": Task(
        "one_word",
        "Answer an easy question rightly with exactly one word (feedback: wrong content, or how many words the answer "
        "had; few successes at first).",
        partial(_question_rows, ONE_WORD_TEMPLATES),
        partial(_answer_checked, _one_word_feedback),
    ),
    "capitals_hard": Task(
        "capitals_hard",
        "Positive control: the capital of a less-known country (few successes at first); the teacher reads the "
        "capital in the `privileged_context` column.",
        partial(_capitals_rows, HARD_CAPITALS, privileged_context=True),
        _capitals_feedback,
    ),
    "capitals_hard_uninformative": Task(
        "capitals_hard_uninformative",
        "Negative control: the questions of capitals_hard, feedback 'Incorrect.' and no privileged context.",
        partial(_capitals_rows, HARD_CAPITALS),
        _uninformative_capitals_feedback,
    ),
    "short_answer_form": Task(
        "short_answer_form",
        "Form only: answer an easy question in at most five words, content unchecked (feedback: how many words the "
        "answer had).",
        partial(_question_rows, SHORT_ANSWER_TEMPLATES, max_words=MAX_WORDS),
        _short_answer_feedback,
    ),
    "one_word_form": Task(
        "one_word_form",
        "Form only: answer an easy question with exactly one word, content unchecked (feedback: how many words the "
        "answer had).",
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
