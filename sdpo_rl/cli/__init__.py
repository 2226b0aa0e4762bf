"""The `sdpo-rl` command (docs/cli.md): `main` and its parser in `main.py`, one module per subcommand (`demo`,
`train`, `solve`, `preflight`), each with `add_parser(subparsers)` and `run(args)` built the same way (`common`).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
