"""Ready-made TRL reward functions that explain their scores to SDPO's teacher (docs/rewards.md).

- `CodeTestsReward`: runs the code in each completion against the task's tests in a sandbox; the feedback is what a
  judge would say (syntax error, traceback, time or memory limit, wrong answer with input and expected output).
- `AnswerMatchReward`: compares the final answer with the dataset's; the feedback never reveals the expected answer.
- `FeedbackReward`: the base class of those two (and of `sdpo_rl.apps.tasks.TaskReward`); a call returns one
  `sdpo_rl.Scored` per completion (score and feedback together) and also sets `last_feedback` to the same feedback.
  Subclasses implement `score(texts, columns)`.
- `AsyncReward`: wraps a sync reward function for TRL's concurrent async path; it returns what the wrapped function
  returns (so `Scored` values pass through) and sets no `last_feedback`.
"""

from .answer import AnswerMatchReward
from .base import AsyncReward, FeedbackReward
from .code import CodeTestsReward

__all__ = ["AnswerMatchReward", "AsyncReward", "CodeTestsReward", "FeedbackReward"]
