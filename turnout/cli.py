"""The ``turnout`` command: the data plane's and the control plane's subcommands in one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from controlplane import cli as controlplane_cli
from dataplane import cli as dataplane_cli


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="turnout",
        description=dataplane_cli.DESCRIPTION + " Sessions are pushed to every proxy by the control plane.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dataplane_cli.add_commands(sub)
    controlplane_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turnout`` console script."""
    return dataplane_cli.run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
