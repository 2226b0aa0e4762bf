"""A PNG of the per-step training metrics of a trainer's log history (the demo draws one after training)."""

from __future__ import annotations

import math
from pathlib import Path

from ..metrics import (
    COMPLETION_LENGTH,
    DISTILLATION_LOSS,
    FEEDBACK_USED_FRACTION,
    REPROMPT_SAMPLE_FRACTION,
    REWARD,
    SUCCESS_GROUP_FRACTION,
)

PLOTTED = (
    REWARD,
    DISTILLATION_LOSS,
    SUCCESS_GROUP_FRACTION,
    REPROMPT_SAMPLE_FRACTION,
    FEEDBACK_USED_FRACTION,
    COMPLETION_LENGTH,
)


def plot_metrics(log_history: list[dict], path: Path, title: str = "SDPO demo: training metrics") -> Path | None:
    """Plot the `PLOTTED` metrics of `log_history`'s training steps into a PNG at `path`.

    Returns `path`, or None when nothing was drawn: no step logged any of them, or matplotlib is not installed
    (then a message says how to install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot was drawn (pip install matplotlib, or sdpo-rl[embedded]).")
        return None
    logs = [entry for entry in log_history if "step" in entry and REWARD in entry]
    keys = [key for key in PLOTTED if any(key in entry for entry in logs)]
    if not keys:
        return None
    columns = 2
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(10, 3 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys, strict=False):
        points = [(e["step"], e[key]) for e in logs if isinstance(e.get(key), (int, float)) and math.isfinite(e[key])]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        axis.set_title(key, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
