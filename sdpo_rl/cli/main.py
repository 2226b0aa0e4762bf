"""The `sdpo-rl` command: its parser, made of one subparser per subcommand module, and the dispatch to them."""

from __future__ import annotations

import argparse

from . import demo, preflight, solve, train

COMMANDS = (demo, train, solve, preflight)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo-rl",
        description="Self-Distilled Policy Optimization (SDPO) for Hugging Face TRL.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):  # `preflight --config`: --field value pairs
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    return args.func(args) or 0
