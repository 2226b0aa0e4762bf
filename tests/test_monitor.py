import math
import re
from pathlib import Path

from sdpo_rl.monitor import ADVICE, collapse_signs

ROOT = Path(__file__).resolve().parents[1]


def entries(rewards, demos, entropy=None, length=None):
    rows = []
    for i, (r, d) in enumerate(zip(rewards, demos, strict=True)):
        row = {"reward": r, "self_distillation/success_sample_fraction": d}
        row["self_distillation/student_entropy"] = entropy[i] if entropy else 1.0
        row["completions/mean_length"] = length[i] if length else 10.0
        rows.append(row)
    return rows


def test_healthy_run_has_no_signs():
    assert collapse_signs(entries([0.4] * 5 + [0.6] * 5, [0.5] * 10)) == []


def test_too_short_history_is_not_judged():
    assert collapse_signs(entries([0.4] * 5 + [0.0] * 4, [0.5] * 5 + [0.0] * 4)) == []


def test_reward_and_demonstrations_falling_together():
    signs = collapse_signs(entries([0.4] * 5 + [0.05] * 5, [0.6] * 5 + [0.1] * 5))
    assert len(signs) == 1 and "reward fell from 0.400 to 0.050" in signs[0]


def test_reward_falling_alone_is_not_a_collapse_sign():
    assert collapse_signs(entries([0.4] * 5 + [0.05] * 5, [0.6] * 10)) == []


def test_entropy_and_length_running_away():
    signs = collapse_signs(entries([0.4] * 10, [0.5] * 10, entropy=[1.0] * 5 + [2.0] * 5, length=[8] * 5 + [20] * 5))
    assert any("entropy grew from 1.000 to 2.000" in s for s in signs)
    assert any("completion length grew from 8.000 to 20.000" in s for s in signs)


def test_missing_and_nan_values_are_ignored():
    rows = entries([0.4] * 10, [0.5] * 10)
    for row in rows:
        row["self_distillation/student_entropy"] = math.nan
    rows.insert(3, {"loss": 1.0})  # an entry without reward (e.g. eval) is skipped
    assert collapse_signs(rows) == []


def test_advice_cites_the_recommendation_in_the_docs_not_measured_numbers():
    (link,) = re.findall(r"docs/[\w-]+\.md#[\w-]+", ADVICE)
    page, anchor = link.split("#")
    headings = re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), flags=re.M)
    assert anchor in {re.sub(r"[^\w -]", "", h.lower()).replace(" ", "-") for h in headings}, link
    assert "grpo_weight=0.8" in ADVICE and not re.search(r"\d+(\.\d+)?%|\d+ of \d+", ADVICE)


def test_a_teacher_edge_at_or_below_zero_is_a_sign():
    history = [{"self_distillation/teacher_edge": e} for e in (0.3, 0.1, -0.1, 0.0)]
    signs = collapse_signs(history)
    assert len(signs) == 1 and "averaged +0.000 over its last 3 measurements" in signs[0]
    assert collapse_signs(history[:3]) == []  # mean +0.100 over the last three: the teacher still knows more
    assert collapse_signs(history[2:]) == []  # two measurements are too few to judge
    assert "docs/preflight.md" in ADVICE
