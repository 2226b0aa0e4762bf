"""`python -m sdpo_rl.cli ...` (also `accelerate launch -m sdpo_rl.cli train ...`): the `sdpo-rl` command."""

import sys

from .main import main

sys.exit(main())
