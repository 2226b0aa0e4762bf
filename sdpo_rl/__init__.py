"""sdpo-rl: Self-Distilled Policy Optimization (arXiv:2601.20802) for Hugging Face TRL.

Public API: `SDPOTrainer` (a drop-in subclass of `trl.GRPOTrainer`), `SDPOConfig`, `Scored` (a reward value
that carries its completion's feedback), and `preflight` (the teacher's edge, measured before training). The pure
loss lives in `sdpo_rl.loss.self_distillation_loss`.
"""

from . import _trl_compat  # noqa: F401  (checks the installed TRL before anything else is imported)
from .config import SDPOConfig
from .feedback import Scored
from .preflight import PreflightReport, preflight
from .trainer import SDPOTrainer

__all__ = ["PreflightReport", "SDPOConfig", "SDPOTrainer", "Scored", "preflight"]
__version__ = "0.1.0"
