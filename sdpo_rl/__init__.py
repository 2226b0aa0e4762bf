"""sdpo-rl: Self-Distilled Policy Optimization (arXiv:2601.20802) for Hugging Face TRL.

Public API: `SDPOTrainer` (a drop-in subclass of `trl.GRPOTrainer`), `SDPOConfig`, `Scored` (a reward value
that carries its completion's feedback), `preflight` (the teacher's edge, measured before training) and `solve`
(test-time self-distillation on one problem; its baselines are in `sdpo_rl.solving`). The pure loss lives in
`sdpo_rl.loss.self_distillation_loss`.

Layout: the library is this package's modules and the `loss`, `teacher` and `rewards` subpackages; `cli` holds the
`sdpo-rl` command (one module per subcommand) and `apps` what only the command, the demo and the benchmarks use.
"""

from . import _trl_compat  # noqa: F401  (checks the installed TRL before anything else is imported)
from .config import SDPOConfig
from .feedback import Scored
from .preflight import PreflightReport, preflight
from .solving import solve
from .trainer import SDPOTrainer

__all__ = ["PreflightReport", "SDPOConfig", "SDPOTrainer", "Scored", "preflight", "solve"]
__version__ = "0.1.0"
