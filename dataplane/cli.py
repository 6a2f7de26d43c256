"""The proxy's commands: ``turnout proxy``, ``check-config`` and ``explain``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dataplane.rules import load_yaml, snapshot_from_config
from filters import RequestHead, ValidationError

DESCRIPTION = ("L7 routing data plane: sends each request to the baseline or to the sandbox of the session its "
               "routing key (W3C baggage) belongs to.")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not 'Name: value'")
    return name.strip(), value.strip()


def add_commands(sub: Any, demo_config: Callable[[], Mapping[str, Any]] | None = None) -> None:
    """Add the proxy's subcommands (proxy, check-config, explain) to ``sub``; ``demo_config``
    gives ``explain --demo`` its sessions."""
    proxy = sub.add_parser(
        "proxy", help="run the proxy",
        description="Run the routing proxy. It binds every listener once (a second proxy on the same address "
        "fails to start); with --workers 1 it is one process, with more the worker processes share the "
        "listening sockets. SIGTERM drains gracefully; SIGHUP reloads the config file (an invalid file is "
        "refused and the running config kept). Log lines go to standard error with UTC timestamps.",
    )
    proxy.add_argument("--config", required=True, metavar="FILE", help="bootstrap YAML file")
    proxy.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1: one process)")
    proxy.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"],
                       help="HTTP/1.1 codec: httptools when installed (auto), or h11")
    proxy.add_argument("--json", action="store_true", help="log one JSON object per line")
    proxy.set_defaults(func=_cmd_proxy)

    check = sub.add_parser("check-config", help="validate a bootstrap file and exit",
                           description="Validate a bootstrap YAML file; prints every problem with its field, "
                           "exits 0 when valid and 2 when not.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=_cmd_check_config)

    explain = sub.add_parser(
        "explain", help="explain where a request would route",
        description="Where one request would go and why: asked of a running proxy (--admin, so sessions the "
        "control plane pushed count), or evaluated against a config file's 'routing' and 'sessions' "
        "sections. Prints one line; --json prints every step of the decision.",
    )
    source = explain.add_mutually_exclusive_group(required=True)
    source.add_argument("--admin", metavar="HOST:PORT", help="a running proxy's admin address")
    source.add_argument("--config", metavar="FILE", help="YAML file with 'routing' and 'sessions'")
    if demo_config is not None:
        source.add_argument("--demo", action="store_true", help="use the embedded demo sessions")
    explain.add_argument("--service", required=True, help="the service the request is for, e.g. users")
    explain.add_argument("--method", default="GET", help="request method (default GET)")
    explain.add_argument("--target", default="/", help="path and query, e.g. '/api?x=1' (default /)")
    explain.add_argument("--header", "-H", action="append", type=_header, default=[], metavar="'NAME: VALUE'",
                         help="a request header; repeat for more")
    explain.add_argument("--json", action="store_true", help="print every step of the decision as JSON")
    explain.set_defaults(func=_cmd_explain, demo_config=demo_config)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the proxy's commands alone (``python -m dataplane.cli``)."""
    parser = argparse.ArgumentParser(prog="turnout", description=DESCRIPTION)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def _cmd_proxy(args: argparse.Namespace) -> int:
    from dataplane.config import load_config
    from dataplane.process.logs import setup_logging
    from dataplane.process.supervisor import Supervisor

    if args.workers < 1:
        sys.stderr.write("turnout: --workers must be at least 1\n")
        return 2
    setup_logging(as_json=args.json)
    config = load_config(args.config)
    supervisor = Supervisor(args.config, config, args.workers, args.http, args.json)
    import uvloop

    return int(uvloop.run(supervisor.run()))


def _cmd_check_config(args: argparse.Namespace) -> int:
    from dataplane.config import load_config

    config = load_config(args.file)
    snapshot = config.snapshot
    if args.json:
        json.dump({"file": args.file, "valid": True, "listeners": len(config.listeners),
                   "sessions": len(snapshot.sessions), "services": list(snapshot.services),
                   "warnings": list(snapshot.warnings)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    sys.stdout.write(f"{args.file}: valid; {len(config.listeners)} listener(s), {len(snapshot.sessions)} "
                     f"session(s) for {len(snapshot.services)} service(s)\n")
    for warning in snapshot.warnings:
        sys.stdout.write(f"warning: {warning}\n")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    if args.admin:
        report = _explain_remote(args)
        if report is None:
            return 1
    else:
        config = args.demo_config() if getattr(args, "demo", False) else load_yaml(args.config)
        now = time.time()
        snapshot = snapshot_from_config(config, "file", now)
        head = RequestHead.from_pairs(args.method, args.target, args.header)
        report = snapshot.explain(args.service, head, now)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(explain_line(args.method, args.target, report) + "\n")
    return 0


def _explain_remote(args: argparse.Namespace) -> dict[str, Any] | None:
    body = json.dumps({"service": args.service, "method": args.method, "path": args.target,
                       "headers": dict(args.header)}).encode()
    url = "http://" + args.admin + "/explain"
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            report: dict[str, Any] = json.loads(answer.read())
            return report
    except urllib.error.HTTPError as exc:
        sys.stderr.write(f"turnout: {url} answered {exc.code}: {exc.read().decode(errors='replace').strip()}\n")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        sys.stderr.write(f"turnout: cannot reach the proxy's admin address {args.admin} ({reason}); check the "
                         "address and that the proxy has an admin listener\n")
    except ValueError:
        sys.stderr.write(f"turnout: {url} did not answer with JSON; is {args.admin} a turnout admin address?\n")
    return None


def explain_line(method: str, target: str, report: Mapping[str, Any]) -> str:
    """One line: where the request goes and why."""
    decision = report.get("decision") or {}
    service = report.get("service", "?")
    key = report.get("key")
    why_key = f"key {key['value']!r} from {key['where']}" if key else "no routing key"
    kind = decision.get("kind")
    if kind == "baseline":
        keyed = report.get("keyed", "")
        return f"{method} {target} for {service} -> baseline ({why_key}; {keyed})"
    tunnel = ""
    if "tunnel" in decision:
        tunnel = (f", tunnel via {decision['tunnel']}" if decision.get("tunnel_connected")
                  else f", tunnel not connected: fallback {decision.get('fallback')} applies")
    where = f"{decision.get('destination')} (session {decision.get('session')}, mode {decision.get('mode')}, " \
            f"fallback {decision.get('fallback')}{tunnel})"
    line = f"{method} {target} for {service} -> " + ("mirror copy to " if kind == "mirror" else "sandbox ") + where
    line += f"; {why_key}"
    protocol = report.get("upstream_protocol")
    if protocol:
        line += f"; upstream {protocol}"
    if report.get("outlier"):
        line += "; " + str(report["outlier"])
    return line


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
