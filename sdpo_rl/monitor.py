"""Early signs of an SDPO collapse, read from the trainer's logged metrics.

On small models, pure SDPO can degrade fast: the teacher's distribution carries the reprompt's framing ("the
correct answer would be", apologies, talk about hints) into the student, answers stop being correct, fewer groups
contain a success, so fewer completions get a demonstration, and the student's entropy or answer length runs away
(docs/results.md#why-pure-sdpo-degrades-the-135m-model-diagnosepy). `collapse_signs` compares the most recent
logged steps with the first ones and names what went wrong, so the trainer can warn while the run can still be saved.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from .metrics import COMPLETION_LENGTH as LENGTH
from .metrics import REWARD, TEACHER_EDGE
from .metrics import STUDENT_ENTROPY as ENTROPY
from .metrics import SUCCESS_SAMPLE_FRACTION as DEMONSTRATIONS

ADVICE = (
    "Consider the hybrid SDPOConfig(grpo_weight=0.8) or GRPO (enabled=False), and compare held-out accuracy with its "
    "starting value; see docs/results.md#what-we-recommend-for-small-models. `sdpo-rl preflight` (or "
    "SDPOConfig(teacher_edge_every=...)) measures whether the teacher still knows more than the student "
    "(docs/preflight.md)."
)
EDGE_WINDOW = 3  # the teacher-edge measurements whose mean is judged


def _window_mean(entries: Sequence[dict], name: str) -> float:
    values = [e[name] for e in entries if isinstance(e.get(name), (int, float)) and math.isfinite(e[name])]
    return statistics.mean(values) if values else math.nan


def collapse_signs(history: Sequence[dict], window: int = 5, drop: float = 0.5, growth: float = 1.5) -> list[str]:
    """Messages describing signs of collapse in `history` (training log entries, oldest first); [] = none.

    The mean of each metric over the last `window` entries is compared with its mean over the first `window`:
    reward and the fraction of completions with a demonstration both below `drop` times their start, or the
    student's entropy or the completion length above `growth` times its start. Needs 2 * `window` entries.
    With `SDPOConfig.teacher_edge_every`, also: the teacher's edge at or below 0 on average over its last
    `EDGE_WINDOW` measurements (the teacher no longer knows more than the student).
    """
    edges = [
        e[TEACHER_EDGE] for e in history if isinstance(e.get(TEACHER_EDGE), float) and math.isfinite(e[TEACHER_EDGE])
    ]
    edge_signs = []
    if len(edges) >= EDGE_WINDOW and statistics.mean(edges[-EDGE_WINDOW:]) <= 0:
        edge_signs.append(
            f"the teacher's edge ({TEACHER_EDGE}) averaged {statistics.mean(edges[-EDGE_WINDOW:]):+.3f} over its last "
            f"{EDGE_WINDOW} measurements: the teacher no longer passes more often than the student"
        )
    entries = [e for e in history if REWARD in e]
    if len(entries) < 2 * window:
        return edge_signs
    first, last = entries[:window], entries[-window:]
    start = {name: _window_mean(first, name) for name in (REWARD, DEMONSTRATIONS, ENTROPY, LENGTH)}
    now = {name: _window_mean(last, name) for name in start}
    signs = []
    if start[REWARD] > 0 and start[DEMONSTRATIONS] > 0:
        if now[REWARD] < drop * start[REWARD] and now[DEMONSTRATIONS] < drop * start[DEMONSTRATIONS]:
            signs.append(
                f"reward fell from {start[REWARD]:.3f} to {now[REWARD]:.3f} and the fraction of completions with a "
                f"demonstration from {start[DEMONSTRATIONS]:.3f} to {now[DEMONSTRATIONS]:.3f}"
            )
    for name, label in ((ENTROPY, "the student's entropy"), (LENGTH, "the mean completion length")):
        if start[name] > 0 and now[name] > growth * start[name]:
            signs.append(f"{label} grew from {start[name]:.3f} to {now[name]:.3f}")
    return signs + edge_signs
