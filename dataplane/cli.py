"""The ``turnout`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from dataplane import inject
from dataplane.demo import explain_config, run_demo
from dataplane.rules import load_yaml, snapshot_from_config
from filters import RequestHead, ValidationError

DESCRIPTION = ("L7 routing data plane: sends each request to the baseline or to the sandbox of the session its "
               "routing key (W3C baggage) belongs to.")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def add_commands(sub: Any) -> None:
    """Add the data plane's subcommands (proxy, check-config, demo, explain, inject) to ``sub``."""
    proxy = sub.add_parser(
        "proxy", help="run the proxy",
        description="Run the routing proxy: a supervisor, N worker processes sharing each listener port "
        "(SO_REUSEPORT), and the admin listener. SIGTERM drains gracefully; SIGHUP reloads the config file "
        "(an invalid file is refused and the running config kept).",
    )
    proxy.add_argument("--config", required=True, metavar="FILE", help="bootstrap YAML file")
    proxy.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    proxy.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                       help="HTTP/1.1 codec: httptools when installed (auto), or h11")
    proxy.set_defaults(func=_cmd_proxy)

    check = sub.add_parser("check-config", help="validate a bootstrap file and exit",
                           description="Validate a bootstrap YAML file; prints every problem with its field, "
                           "exits 0 when valid and 2 when not.")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_cmd_check_config)

    demo = sub.add_parser(
        "demo", help="run upstreams, the control plane and the proxy, and show every routing case",
        description="Start a baseline, a sandbox and a mirror-target upstream, the control plane, and the proxy "
        "with demo sessions; send one request per routing case and print where each went; create a session "
        "through the control plane with `turnout session create` and show the proxy routing it; then print "
        "curl lines, the session commands and the admin URLs and keep running until Ctrl-C.")
    demo.add_argument("--once", action="store_true", help="exit after printing the tables")
    demo.set_defaults(func=_cmd_demo)

    explain = sub.add_parser(
        "explain", help="explain where a request would route",
        description="Evaluate one request against the routing rules of a config file (its 'routing' "
        "and 'sessions' sections) and print each step of the decision as JSON.",
    )
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="FILE", help="YAML file with 'routing' and 'sessions'")
    source.add_argument("--demo", action="store_true", help="use the embedded demo sessions")
    explain.add_argument("--service", required=True, help="the service the request is for, e.g. users")
    explain.add_argument("--method", default="GET", help="request method (default GET)")
    explain.add_argument("--target", default="/", help="path and query, e.g. '/api?x=1' (default /)")
    explain.add_argument("--header", "-H", action="append", type=_header, default=[], metavar="'NAME: VALUE'",
                         help="a request header; repeat for more")
    explain.set_defaults(func=_cmd_explain)

    inject.add_command(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the data plane's commands alone (``python -m dataplane.cli``)."""
    parser = argparse.ArgumentParser(prog="turnout", description=DESCRIPTION)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def _cmd_proxy(args: argparse.Namespace) -> int:
    from dataplane.config import load_config
    from dataplane.supervisor import Supervisor

    if args.workers < 1:
        sys.stderr.write("turnout: --workers must be at least 1\n")
        return 2
    config = load_config(args.config)
    supervisor = Supervisor(args.config, config, args.workers, args.http)
    return _run(supervisor.run())


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from dataplane.config import load_config

    config = load_config(args.file)
    snapshot = config.snapshot
    sys.stdout.write(f"{args.file}: valid; {len(config.listeners)} listener(s), {len(snapshot.sessions)} "
                     f"session(s) for {len(snapshot.services)} service(s)\n")
    for warning in snapshot.warnings:
        sys.stdout.write(f"warning: {warning}\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(sys.stdout, once=args.once)


def _cmd_explain(args: argparse.Namespace) -> int:
    config = explain_config() if args.demo else load_yaml(args.config)
    now = time.time()
    snapshot = snapshot_from_config(config, "file", now)
    head = RequestHead.from_pairs(args.method, args.target, args.header)
    json.dump(snapshot.explain(args.service, head, now), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; an invalid configuration is reported field by field (exit 2)."""
    try:
        return int(args.func(args))
    except ValidationError as exc:
        sys.stderr.write("turnout: invalid configuration:\n")
        for problem in exc.problems:
            sys.stderr.write(f"  {problem}\n")
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for the data plane's commands alone."""
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
