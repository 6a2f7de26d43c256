"""The control plane's subcommands: ``control-plane``, ``session ...`` and ``status``.

Exit status of the client commands: 0 done, 1 refused by the control plane (its message,
and for a 400 every problem, is printed), 2 usage error, 3 control plane unreachable.
``--json`` prints exactly the API's JSON, errors included, for agents and scripts.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from controlplane.auth import read_token
from controlplane.client import ApiError, ControlPlaneClient, Unreachable
from controlplane.durations import format_duration, parse_duration
from controlplane.errors import StartupError
from filters import UPSTREAM_PROTOCOLS

DEFAULT_CONTROL_PLANE = "http://127.0.0.1:18080"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def add_commands(sub: Any) -> None:
    """Add the control plane's subcommands to ``sub``."""
    _add_control_plane(sub)
    common = _common_options()

    session = sub.add_parser(
        "session", help="create, list, inspect, extend and delete sessions",
        description="Manage sessions on the control plane. A session routes requests carrying its key (in W3C "
        "baggage, member turnout-session by default) to its sandboxes, on every proxy, within milliseconds.")
    actions = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create", parents=[common], help="create a session",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Create a session: one route per forked service; --mode, --fallback, --upstream-protocol\n"
        "and --match apply to every route. The control plane validates it (listing every problem), applies its\n"
        "policy, and refuses a (key, service) that another session holds, naming that session.",
        epilog="examples:\n"
        "  turnout session create --key abc123 --route users=10.0.0.5:8080 --ttl 2h\n"
        "  turnout session create --route users=10.0.0.5:8080 --match '{header: {name: x-user, exact: bob}}'")
    create.add_argument("--id", help="session id (default: generated, s-<10 hex>)")
    create.add_argument("--key", help="routing key; without one the session is filter-only: give --match (or "
                        "--mode mirror), or the default policy refuses it")
    create.add_argument("--route", action="append", required=True, type=_route, metavar="SERVICE=HOST:PORT",
                        help="send SERVICE's requests to HOST:PORT; repeat for more services")
    create.add_argument("--mode", choices=["steal", "mirror"],
                        help="steal: the sandbox answers (default); mirror: baseline answers, the sandbox gets a copy")
    create.add_argument("--fallback", choices=["baseline", "error"],
                        help="sandbox unreachable: retry on baseline (default) or answer 503")
    create.add_argument("--upstream-protocol", choices=list(UPSTREAM_PROTOCOLS),
                        help="how requests reach the sandbox: auto = the client's protocol (default), http1 = "
                        "HTTP/2 requests translated to HTTP/1.1, http2 = every request over HTTP/2 (gRPC is "
                        "always HTTP/2)")
    create.add_argument("--match", type=_match, metavar="YAML_OR_JSON",
                        help="extra predicate, in the rules file's match language, e.g. "
                        "'{header: {name: x-user, exact: alice}}'; @FILE reads it from a file")
    create.add_argument("--priority", type=int, metavar="N", help="wins among overlapping filter-only routes")
    create.add_argument("--ttl", type=_duration, metavar="DURATION",
                        help="lifetime: 90s, 30m, 2h, 1h30m, 1d or seconds (default: the policy's, 2h)")
    create.add_argument("--owner", default=_default_owner(), help="who owns it (default: $USER)")
    create.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                        help="a label; repeat for more")
    create.set_defaults(func=_cmd_create)

    listing = actions.add_parser("list", parents=[common], help="list sessions",
                                 description="List sessions, oldest first.")
    listing.add_argument("--owner", help="only this owner's sessions")
    listing.set_defaults(func=_cmd_list)

    get = actions.add_parser("get", parents=[common], help="show one session",
                             description="Show one session and its routes.")
    get.add_argument("id", metavar="ID")
    get.set_defaults(func=_cmd_get)

    extend = actions.add_parser("extend", parents=[common], help="give a session more time",
                                description="Set a session to expire DURATION from now (the policy's max_ttl_s "
                                "caps it).")
    extend.add_argument("id", metavar="ID")
    extend.add_argument("--ttl", type=_duration, required=True, metavar="DURATION",
                        help="new lifetime from now: 90s, 30m, 2h, 1h30m, 1d or seconds")
    extend.set_defaults(func=_cmd_extend)

    delete = actions.add_parser("delete", parents=[common], help="delete a session",
                                description="Delete a session; every proxy routes its key to baseline again. "
                                "With --json prints {\"deleted\": ID} (the API answers 204 with no body).")
    delete.add_argument("id", metavar="ID")
    delete.set_defaults(func=_cmd_delete)

    status = sub.add_parser(
        "status", parents=[common], help="show the proxies and the version each runs",
        description="Show every proxy the control plane has seen: its services, stream protocol, whether it is "
        "connected, the version it acknowledged, whether it is in sync and its last refusal (NACK).")
    status.set_defaults(func=_cmd_status)


def _add_control_plane(sub: Any) -> None:
    cp = sub.add_parser(
        "control-plane", help="run the control plane",
        description="Run the reference control plane: sessions in SQLite, the HTTP JSON API for the session "
        "commands, TTL expiry, and the gRPC stream that pushes sessions to every proxy. Prints one line with "
        "both addresses when ready. SIGHUP reloads --policy (an invalid file is refused and the old policy "
        "kept); SIGTERM/SIGINT shut down gracefully.")
    cp.add_argument("--api", default="127.0.0.1:18080", metavar="HOST:PORT",
                    help="HTTP API address (default 127.0.0.1:18080; port 0 picks a free one)")
    cp.add_argument("--grpc", default="127.0.0.1:18000", metavar="HOST:PORT",
                    help="gRPC push address for proxies (default 127.0.0.1:18000; port 0 picks a free one)")
    cp.add_argument("--db", default="turnout-sessions.db", metavar="FILE",
                    help="SQLite session database, created if absent (default turnout-sessions.db)")
    cp.add_argument("--token-file", metavar="FILE",
                    help="bearer token for API callers and, without --proxy-token-file, for proxies")
    cp.add_argument("--proxy-token-file", metavar="FILE",
                    help="a separate token for proxies; it cannot use the API")
    cp.add_argument("--policy", metavar="FILE", help="YAML policy file (guardrails); SIGHUP reloads it")
    cp.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve the API and gRPC over TLS")
    cp.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    cp.add_argument("--id", default="", help="control-plane id reported to proxies (default: the host name)")
    cp.add_argument("--allow-unauthenticated", action="store_true",
                    help="run without --token-file: anyone who can connect may change routing. For local "
                    "experiments only")
    cp.set_defaults(func=_cmd_control_plane)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control-plane", default=os.environ.get("TURNOUT_CONTROL_PLANE", DEFAULT_CONTROL_PLANE),
                        metavar="URL", help="API URL (env TURNOUT_CONTROL_PLANE; default " + DEFAULT_CONTROL_PLANE
                        + ")")
    common.add_argument("--token-file", metavar="FILE", help="file holding the bearer token (or put the token "
                        "itself in env TURNOUT_TOKEN)")
    common.add_argument("--ca-file", metavar="FILE", help="PEM CA bundle to verify an https control plane")
    common.add_argument("--json", action="store_true", help="print the API's JSON (for agents and scripts)")
    return common


# ---------------------------------------------------------------------- argument types


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _route(text: str) -> tuple[str, str]:
    service, sep, destination = text.partition("=")
    if not sep or not service or not destination:
        raise argparse.ArgumentTypeError(f"{text!r} is not SERVICE=HOST:PORT, e.g. users=10.0.0.5:8080")
    return service, destination


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _match(text: str) -> dict[str, Any]:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML or JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a match mapping, e.g. '{header: {name: x-user, exact: alice}}'")
    return value


def _default_owner() -> str:
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (e.g. some containers)
        return ""


# ---------------------------------------------------------------------- commands


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from controlplane.server import ServerOptions, run_control_plane

    return run_control_plane(ServerOptions(
        api=args.api, grpc=args.grpc, db=args.db, token_file=args.token_file,
        proxy_token_file=args.proxy_token_file, policy=args.policy, tls_cert=args.tls_cert,
        tls_key=args.tls_key, control_plane_id=args.id, allow_unauthenticated=args.allow_unauthenticated,
    ))


def _cmd_create(args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {}
    if args.id is not None:
        spec["id"] = args.id
    if args.key is not None:
        spec["key"] = args.key
    if args.owner:
        spec["owner"] = args.owner
    if args.label:
        spec["labels"] = dict(args.label)
    if args.ttl is not None:
        spec["ttl_s"] = args.ttl
    if args.priority is not None:
        spec["priority"] = args.priority
    routes = []
    for service, destination in args.route:
        route: dict[str, Any] = {"service": service, "destination": destination}
        if args.mode is not None:
            route["mode"] = args.mode
        if args.fallback is not None:
            route["fallback"] = args.fallback
        if args.upstream_protocol is not None:
            route["upstream_protocol"] = args.upstream_protocol
        if args.match is not None:
            route["match"] = args.match
        routes.append(route)
    spec["routes"] = routes

    def show(reply: Any) -> str:
        session = reply["session"]
        text = f"created session {session['id']} (revision {reply['revision']})\n" + _describe(session)
        if "key" in session:
            text += (f"\nsend requests with 'baggage: turnout-session={session['key']}' (the proxies' default "
                     "key source) to reach the sandbox\n")
        return text

    return _call(args, lambda client: client.create_session(spec), show)


def _cmd_list(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        now = time.time()
        rows = []
        for item in reply["sessions"]:
            s = item["session"]
            rows.append([s["id"], s.get("key", "-"), s.get("owner", "") or "-",
                         ",".join(r["service"] for r in s["routes"]), _expires(s.get("expires_at"), now),
                         str(item["revision"])])
        if not rows:
            return f"no sessions (revision {reply['revision']})\n"
        return _table(["ID", "KEY", "OWNER", "SERVICES", "EXPIRES", "REVISION"], rows)

    return _call(args, lambda client: client.list_sessions(args.owner), show)


def _cmd_get(args: argparse.Namespace) -> int:
    return _call(args, lambda client: client.get_session(args.id),
                 lambda reply: _describe(reply["session"], reply["revision"]))


def _cmd_extend(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        session = reply["session"]
        return (f"extended session {session['id']} (revision {reply['revision']}): expires "
                f"{_when(session.get('expires_at'))}\n")

    return _call(args, lambda client: client.extend_session(args.id, args.ttl), show)


def _cmd_delete(args: argparse.Namespace) -> int:
    def delete(client: ControlPlaneClient) -> Any:
        client.delete_session(args.id)
        return {"deleted": args.id}

    return _call(args, delete, lambda reply: f"deleted session {args.id}\n")


def _cmd_status(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        rows = []
        for p in reply["proxies"]:
            nack = p.get("last_nack")
            rows.append([
                str(p.get("id", "")), str(p.get("cluster") or "-"),
                "*" if p.get("all_services") else ",".join(p.get("services") or []) or "-",
                str(p.get("protocol", "")), "yes" if p.get("connected") else "no",
                str(p.get("acked_version") or "-"), "yes" if p.get("in_sync") else "no",
                f"version {nack.get('version')}: {nack.get('message')}" if isinstance(nack, dict) else "-",
            ])
        head = f"control plane revision {reply['revision']}\n"
        if not rows:
            return head + "no proxies have connected\n"
        return head + _table(
            ["PROXY", "CLUSTER", "SERVICES", "PROTOCOL", "CONNECTED", "VERSION", "IN SYNC", "LAST NACK"], rows)

    return _call(args, lambda client: client.proxies(), show)


# ---------------------------------------------------------------------- plumbing


def _call(args: argparse.Namespace, action: Callable[[ControlPlaneClient], Any], show: Callable[[Any], str]) -> int:
    """Run ``action(client)``; print ``show(reply)`` or the JSON; map failures to exit codes."""
    url = args.control_plane
    if not url.startswith(("http://", "https://")):
        sys.stderr.write(f"turnout: --control-plane {url!r} must start with http:// or https://\n")
        return EXIT_USAGE
    try:
        token = read_token(args.token_file, "--token-file") if args.token_file else os.environ.get("TURNOUT_TOKEN")
    except StartupError as exc:
        sys.stderr.write(f"turnout: {exc}\n")
        return EXIT_USAGE
    client = ControlPlaneClient(url, token.strip() if token else None, args.ca_file)
    try:
        reply = action(client)
    except ApiError as exc:
        if args.json:
            _print_json(exc.body)
        else:
            sys.stderr.write(_refusal(exc))
        return EXIT_REFUSED
    except Unreachable as exc:
        if args.json:
            _print_json({"error": "unreachable", "message": str(exc), "url": exc.url})
        else:
            sys.stderr.write(f"turnout: {exc}\n")
        return EXIT_UNREACHABLE
    if args.json:
        _print_json(reply)
    else:
        sys.stdout.write(show(reply))
    return EXIT_OK


def _refusal(exc: ApiError) -> str:
    body = exc.body
    kind = body.get("error")
    if kind == "invalid" and isinstance(body.get("problems"), list):
        lines = ["turnout: the control plane refused the session:"]
        lines += [f"  {p.get('field')}: {p.get('reason')}" for p in body["problems"] if isinstance(p, dict)]
        return "\n".join(lines) + "\n"
    if kind == "policy":
        return f"turnout: refused by policy {body.get('policy')}: {body.get('message')}\n"
    return f"turnout: {body.get('message') or kind} (HTTP {exc.status})\n"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _describe(session: dict[str, Any], revision: int | None = None) -> str:
    fields = [("id", session["id"]), ("key", session.get("key", "- (filter-only)")),
              ("owner", session.get("owner") or "-")]
    if session.get("labels"):
        fields.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(session["labels"].items()))))
    fields.append(("created", _when(session.get("created_at"), relative=False)))
    fields.append(("expires", _when(session.get("expires_at"))))
    if revision is not None:
        fields.append(("revision", str(revision)))
    width = max(len(name) for name, _ in fields)
    text = "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)
    rows = [[r["service"], r["destination"], r.get("mode", "steal"), r.get("fallback", "baseline"),
             r.get("upstream_protocol", "auto"), str(r.get("priority", 0)),
             json.dumps(r["match"], separators=(",", ":")) if "match" in r else "-"]
            for r in session["routes"]]
    return text + "\n" + _table(["SERVICE", "DESTINATION", "MODE", "FALLBACK", "PROTOCOL", "PRIORITY", "MATCH"],
                                 rows)


def _when(timestamp: float | None, relative: bool = True) -> str:
    if timestamp is None:
        return "never"
    text = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{text} ({_expires(timestamp, time.time())})" if relative else text


def _expires(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "never"
    if timestamp <= now:
        return "expired"
    left_s = timestamp - now
    # Seconds are noise on anything an hour or more away.
    return "in " + format_duration(round(left_s / 60) * 60 if left_s >= 3600 else left_s)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines) + "\n"
