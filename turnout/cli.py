"""The ``turnout`` command: the proxy's, the control plane's and the tools' subcommands in one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from controlplane import cli as controlplane_cli
from dataplane import cli as dataplane_cli
from remocal import cli as remocal_cli
from turnout import inject
from turnout.demo import explain_config, run_demo


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="turnout",
        description=dataplane_cli.DESCRIPTION + " Sessions are pushed to every proxy by the control plane.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dataplane_cli.add_commands(sub, explain_config)
    controlplane_cli.add_commands(sub)
    remocal_cli.add_commands(sub)
    demo = sub.add_parser(
        "demo", help="run upstreams, the control plane and the proxy, and show every routing case",
        description="Start a baseline, a sandbox and a mirror-target upstream, the control plane, and the proxy "
        "with demo sessions; send one request per routing case and print where each went; create a session "
        "through the control plane with `turnout session create` and show the proxy routing it; then print "
        "curl lines, the session commands and the admin URLs and keep running until Ctrl-C.")
    demo.add_argument("--once", action="store_true", help="exit after printing the tables")
    demo.add_argument("--json", action="store_true", help="print the routing cases as JSON lines instead of tables")
    demo.set_defaults(func=lambda args: run_demo(sys.stdout, once=args.once, as_json=args.json))
    inject.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``turnout`` console script."""
    return dataplane_cli.run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
