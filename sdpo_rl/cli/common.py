"""What every `sdpo-rl` subcommand module shares: how its parser is built.

Each subcommand lives in one module of `sdpo_rl.cli` with the same two functions: `add_parser(subparsers)` registers
it (through `command_parser`) and returns its parser, and `run(args)` runs it and returns the exit status.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the uninformative None and False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def command_parser(
    subparsers: argparse._SubParsersAction, name: str, module_doc: str, help: str, **options
) -> argparse.ArgumentParser:
    """The parser of `sdpo-rl NAME`: `help` for the command list, the first paragraph of the command module's
    docstring as its description, and defaults shown in `--help`; `options` go to `add_parser` as they are."""
    options.setdefault("description", module_doc.split("\n\n")[0])
    options.setdefault("formatter_class", HelpFormatter)
    return subparsers.add_parser(name, help=help, **options)
