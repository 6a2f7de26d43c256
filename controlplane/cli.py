"""The control plane's subcommands: ``control-plane``, ``session ...``, ``status``, ``audit`` and ``whoami``.

Exit status of the client commands: 0 done, 1 refused by the control plane (its message,
and for a 400 every problem, is printed) or, for ``session create``, by a proxy (its
reason is printed), 2 usage error, 3 control plane unreachable (one line naming the URL
and what to check), 4 ``session create``: stored, but not every proxy fronting it
confirmed within ``--wait``. ``--json`` prints exactly the API's JSON, errors included,
for agents and scripts.

The token: ``--token-file``, else ``TURNOUT_TOKEN``, else (for a control plane on this
machine started without ``--auth``) the admin token it generated for its port.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from controlplane.auth import local_token_path, read_token
from controlplane.client import ApiError, ControlPlaneClient, Unreachable
from controlplane.durations import format_duration, parse_duration
from controlplane.errors import StartupError
from filters import UPSTREAM_PROTOCOLS, ValidationError
from filters.documents import load_yaml

DEFAULT_CONTROL_PLANE = "http://127.0.0.1:18080"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_UNCONFIRMED = 0, 1, 2, 3, 4
# How long `session create` waits for the proxies' answers by default: a push reaches 50
# proxies in well under 100 ms (bench.controlplane.run), so 5 s only runs out for a proxy
# that is stuck or gone.
DEFAULT_WAIT_S = 5.0
# Polling for those answers: quick at first (most arrive within milliseconds), then gentle.
_POLL_FIRST_S, _POLL_MAX_S = 0.02, 0.25


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
        "policy, and refuses a (key, service) that another session holds, naming that session. You own it: only\n"
        "you, members of --group and admins may change it. Then the command waits for the proxies fronting its\n"
        "services to answer and prints what each did; it exits 1 if any refused it (NACK), with the reason.",
        epilog="examples:\n"
        "  turnout session create --key abc123 --route users=10.0.0.5:8080 --ttl 2h\n"
        "  turnout session create --route users=10.0.0.5:8080 --match '{header: {name: x-user, exact: bob}}'")
    create.add_argument("--id", help="session id (default: generated, s-<10 hex>)")
    _add_spec_options(create)
    create.add_argument("--owner", help="create it for this owner (admins only; default: you, the identity of "
                        "your token)")
    create.add_argument("--wait", type=_duration, default=DEFAULT_WAIT_S, metavar="DURATION",
                        help=f"how long to wait for the proxies' answers (default {DEFAULT_WAIT_S:g}s)")
    create.add_argument("--no-wait", action="store_true", help="print the created session and exit at once")
    create.set_defaults(func=_cmd_create)

    update = actions.add_parser(
        "update", parents=[common], help="replace a session's routes, key, labels or group",
        description="Replace a session with the given spec (its id, owner and creation time stay; without "
        "--ttl its expiry stays). Only its owner, members of its group and admins may.")
    update.add_argument("id", metavar="ID")
    _add_spec_options(update)
    update.set_defaults(func=_cmd_update)

    listing = actions.add_parser("list", parents=[common], help="list sessions",
                                 description="List sessions, oldest first, with the proxies that refused each.")
    listing.add_argument("--owner", help="only this owner's sessions")
    listing.set_defaults(func=_cmd_list)

    get = actions.add_parser("get", parents=[common], help="show one session",
                             description="Show one session, its routes, and whether each proxy fronting it runs "
                             "it, refused it (and why) or has not answered yet.")
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

    audit = sub.add_parser(
        "audit", parents=[common], help="show who changed what, when and from where",
        description="Show the control plane's audit trail, oldest first: every create, update, extend, delete and "
        "expiry, every refused request and every proxy stream. Admins see everything; others what they did and "
        "what was done to their sessions.")
    audit.add_argument("--since", type=_since, metavar="WHEN",
                       help="only entries from then on: a duration ago (30m, 2h, 1d) or an RFC 3339 time")
    audit.add_argument("--session", metavar="ID", help="only entries about this session")
    audit.add_argument("--limit", type=int, default=100, metavar="N", help="at most the newest N (default 100)")
    audit.set_defaults(func=_cmd_audit)

    whoami = sub.add_parser("whoami", parents=[common], help="show who the control plane thinks you are",
                            description="Show the identity your token authenticates as, its groups, whether it "
                            "is an admin or a proxy, and the policy rules that apply to it.")
    whoami.set_defaults(func=_cmd_whoami)


def _add_spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key", help="routing key; without one the session is filter-only: give --match (or "
                        "--mode mirror), or the default policy refuses it")
    parser.add_argument("--route", action="append", required=True, type=_route, metavar="SERVICE=HOST:PORT",
                        help="send SERVICE's requests to HOST:PORT (or SERVICE=tunnel: to whoever attaches a "
                        "local process with turnout connect); repeat for more services")
    parser.add_argument("--mode", choices=["steal", "mirror"],
                        help="steal: the sandbox answers (default); mirror: baseline answers, the sandbox gets a copy")
    parser.add_argument("--fallback", choices=["baseline", "error"],
                        help="sandbox unreachable: retry on baseline (default) or answer 503")
    parser.add_argument("--upstream-protocol", choices=list(UPSTREAM_PROTOCOLS),
                        help="how requests reach the sandbox: http1 = HTTP/2 requests translated to HTTP/1.1, "
                        "http2 = every request over HTTP/2, auto = the client's protocol (default: the listener's "
                        "upstream_protocol, http1 unless it says otherwise; gRPC is always HTTP/2)")
    parser.add_argument("--match", type=_match, metavar="YAML_OR_JSON",
                        help="extra predicate, in the rules file's match language, e.g. "
                        "'{header: {name: x-user, exact: alice}}'; @FILE reads it from a file")
    parser.add_argument("--priority", type=int, metavar="N", help="wins among overlapping filter-only routes")
    parser.add_argument("--ttl", type=_duration, metavar="DURATION",
                        help="lifetime: 90s, 30m, 2h, 1h30m, 1d or seconds (default: the policy's, 2h)")
    parser.add_argument("--label", action="append", type=_label, default=[], metavar="KEY=VALUE",
                        help="a label; repeat for more")
    parser.add_argument("--group", help="share it with this group of yours: its members (your agents, your "
                        "team) may change it as you may")


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
    cp.add_argument("--auth", metavar="FILE",
                    help="YAML: identities (a tokens file of SHA-256 digests, OIDC and service-account JWT issuers), "
                    "admin and proxy groups, abuse limits; see docs/access-control.md. Without it (and without "
                    "--token-file) an admin token is generated for the run where the CLI on this machine finds it")
    cp.add_argument("--token-file", metavar="FILE",
                    help="a bootstrap admin token (identity 'admin'); without --proxy-token-file it also opens push "
                    "streams")
    cp.add_argument("--proxy-token-file", metavar="FILE",
                    help="a shared proxy token (identity 'proxy'); it cannot use the API")
    cp.add_argument("--gateway-token-file", metavar="FILE",
                    help="a shared token for tunnel gateways (identity 'gateway', turnout gateway); it can only "
                    "register tunnels")
    cp.add_argument("--policy", metavar="FILE", help="YAML policy file (guardrails); SIGHUP reloads it")
    cp.add_argument("--tls-cert", metavar="FILE", help="PEM certificate chain: serve the API and gRPC over TLS")
    cp.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert")
    cp.add_argument("--id", default="", help="control-plane id reported to proxies (default: the host name)")
    # Gone: nothing is ever open now. Kept so old command lines get a message, not a usage error.
    cp.add_argument("--allow-unauthenticated", action="store_true", help=argparse.SUPPRESS)
    cp.set_defaults(func=_cmd_control_plane)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--control-plane", default=os.environ.get("TURNOUT_CONTROL_PLANE", DEFAULT_CONTROL_PLANE),
                        metavar="URL", help="API URL (env TURNOUT_CONTROL_PLANE; default " + DEFAULT_CONTROL_PLANE
                        + ")")
    common.add_argument("--token-file", metavar="FILE", help="file holding the bearer token (or put the token "
                        "itself in env TURNOUT_TOKEN; default for a control plane on this machine started without "
                        "--auth: the admin token it generated)")
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
        value = load_yaml(text)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not YAML or JSON: {exc}") from None
    except ValidationError as exc:  # a number too long to convert
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a match mapping, e.g. '{header: {name: x-user, exact: alice}}'")
    return value


def _since(text: str) -> float:
    """Unix seconds from a duration ago or an RFC 3339 time."""
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a duration (30m, 2h, 1d) nor an RFC 3339 time with a "
                                         "zone (2027-01-15T09:00:00Z)")
    return parsed.timestamp()


# ---------------------------------------------------------------------- commands


def _cmd_control_plane(args: argparse.Namespace) -> int:
    from controlplane.server import ServerOptions, run_control_plane

    if args.allow_unauthenticated:
        sys.stderr.write("turnout control-plane: --allow-unauthenticated is gone: nothing is ever open. Without "
                         "--auth (and --token-file) an admin token is generated for the run, and the turnout CLI on "
                         "this machine finds it\n")
        return EXIT_USAGE
    return run_control_plane(ServerOptions(
        api=args.api, grpc=args.grpc, db=args.db, auth=args.auth, token_file=args.token_file,
        proxy_token_file=args.proxy_token_file, gateway_token_file=args.gateway_token_file, policy=args.policy,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key, control_plane_id=args.id,
    ))


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    """The session spec the create and update options describe."""
    spec: dict[str, Any] = {}
    if getattr(args, "id", None) is not None:
        spec["id"] = args.id
    if args.key is not None:
        spec["key"] = args.key
    if getattr(args, "owner", None):
        spec["owner"] = args.owner
    if args.group:
        spec["group"] = args.group
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
    return spec


def _cmd_create(args: argparse.Namespace) -> int:
    spec = _spec(args)

    def create(client: ControlPlaneClient) -> Any:
        reply = client.create_session(spec)
        if args.no_wait:
            return reply
        return _await_proxies(client, reply, args.wait)

    def show(reply: Any) -> str:
        session = reply["session"]
        text = f"created session {session['id']} (revision {reply['revision']})\n" + _describe(session)
        if "proxies" in reply:
            text += "\n" + _rollout(reply["proxies"], session, args.wait)
        if "key" in session:
            text += (f"\nsend requests with 'baggage: turnout-session={session['key']}' (the proxies' default "
                     "key source) to reach the sandbox\n")
        return text

    return _call(args, create, show, _verdict)


def _cmd_update(args: argparse.Namespace) -> int:
    spec = _spec(args)

    def show(reply: Any) -> str:
        session = reply["session"]
        return f"updated session {session['id']} (revision {reply['revision']})\n" + _describe(session)

    return _call(args, lambda client: client.update_session(args.id, spec), show)


def _await_proxies(client: ControlPlaneClient, created: Any, wait_s: float) -> Any:
    """Poll the session until every proxy fronting it has answered (or ``wait_s`` passed)."""
    session_id, revision = created["session"]["id"], created["revision"]
    deadline = time.monotonic() + wait_s
    pause = _POLL_FIRST_S
    while True:
        try:
            current = client.get_session(session_id)
        except ApiError as exc:
            if exc.status == 404:  # deleted or expired meanwhile: nothing more to wait for
                return {**created, "proxies": []}
            raise
        proxies = current.get("proxies", [])
        if current["revision"] != revision or all(p.get("state") != "pending" for p in proxies) \
                or time.monotonic() >= deadline:
            return {**created, "proxies": proxies}
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, _POLL_MAX_S)


def _verdict(reply: Any) -> tuple[int, str]:
    """Exit status and the line for standard error, from the proxies' answers to a create."""
    proxies = reply.get("proxies") or []
    session_id = reply["session"]["id"]
    refused = [p for p in proxies if p.get("state") == "refused"]
    if refused:
        reasons = "; ".join(f"{p['proxy']}: {p.get('message', '')}" for p in refused)
        return EXIT_REFUSED, (f"turnout: session {session_id} was refused by {len(refused)} of {len(proxies)} "
                              f"proxies (NACK), which do not route it: {reasons}\n")
    pending = [p["proxy"] for p in proxies if p.get("state") == "pending"]
    if pending:
        return EXIT_UNCONFIRMED, (f"turnout: {len(pending)} of {len(proxies)} proxies did not confirm session "
                                  f"{session_id} in time: {', '.join(pending)}; it is stored and pushed to them as "
                                  f"they answer (`turnout session get {session_id}` shows where it runs)\n")
    return EXIT_OK, ""


def _rollout(proxies: list[dict[str, Any]], session: dict[str, Any], wait_s: float | None) -> str:
    services = ",".join(r["service"] for r in session["routes"])
    if not proxies:
        return (f"no connected proxy fronts {services}; each gets the session when it connects\n")
    rows = []
    for p in proxies:
        state = p.get("state")
        text = {"acked": "routes it (ACK)", "refused": "REFUSED (NACK)"}.get(str(state), "no answer yet")
        if state == "pending" and wait_s is not None:
            text = f"no answer within {format_duration(wait_s)}"
        rows.append([str(p.get("proxy")), text, str(p.get("message", ""))])
    return _table(["PROXY", "ANSWER", "REASON"], rows)


def _cmd_list(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        now = time.time()
        rows = []
        for item in reply["sessions"]:
            s = item["session"]
            refused = [r["proxy"] for r in item.get("refused_by", [])]
            rows.append([s["id"], s.get("key", "-"), s.get("owner", "") or "-",
                         ",".join(r["service"] for r in s["routes"]), _expires(s.get("expires_at"), now),
                         str(item["revision"]),
                         (refused[0] + (f" +{len(refused) - 1}" if len(refused) > 1 else "")) if refused else "-"])
        if not rows:
            return f"no sessions (revision {reply['revision']})\n"
        return _table(["ID", "KEY", "OWNER", "SERVICES", "EXPIRES", "REVISION", "REFUSED BY"], rows)

    return _call(args, lambda client: client.list_sessions(args.owner), show)


def _cmd_get(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        text = _describe(reply["session"], reply["revision"], reply.get("group"))
        if "tunnel" in reply:
            text += "\n" + _tunnel_table([reply["tunnel"]] if reply["tunnel"] else [], reply["session"]["id"])
        return text + "\n" + _rollout(reply.get("proxies", []), reply["session"], None)

    return _call(args, lambda client: client.get_session(args.id), show)


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
        tunnels = reply.get("tunnels") or []
        tail = ("\n" + _tunnel_table(tunnels, None)) if tunnels else ""
        if not rows:
            return head + "no proxies have connected\n" + tail
        return head + _table(
            ["PROXY", "CLUSTER", "SERVICES", "PROTOCOL", "CONNECTED", "VERSION", "IN SYNC", "LAST NACK"], rows) + tail

    def status(client: ControlPlaneClient) -> Any:
        reply = client.proxies()
        return {**reply, "tunnels": client.tunnels()["tunnels"]}

    return _call(args, status, show)


def _tunnel_table(tunnels: list[dict[str, Any]], session_id: str | None) -> str:
    """The tunnels (turnout connect) of a session or of every session, as a table."""
    if not tunnels:
        return f"no tunnel attached to session {session_id}: its tunnel routes fall back\n"
    now = time.time()
    rows = [[str(t.get("session")), str(t.get("id")), str(t.get("gateway")), str(t.get("peer") or "-"),
             _ago(t.get("connected_at"), now), str(t.get("requests") or 0), str(t.get("errors") or 0),
             str((t.get("bytes_in") or 0) + (t.get("bytes_out") or 0)), str(t.get("last_status") or "-"),
             str(t.get("last_error") or "-")] for t in tunnels]
    return _table(["SESSION", "TUNNEL", "GATEWAY", "MACHINE", "CONNECTED", "REQUESTS", "ERRORS", "BYTES",
                   "LAST STATUS", "LAST ERROR"], rows)


def _ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "-"
    return format_duration(max(0.0, round(now - timestamp))) + " ago"


def _cmd_audit(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        rows = [[datetime.fromtimestamp(e["at"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), e["identity"], e["source"],
                 e["action"], e.get("session") or "-", e["outcome"], _audit_detail(e)] for e in reply["entries"]]
        if not rows:
            return "no audit entries\n"
        return _table(["TIME", "IDENTITY", "SOURCE", "ACTION", "SESSION", "OUTCOME", "DETAIL"], rows)

    if not 1 <= args.limit <= 1000:
        sys.stderr.write("turnout: --limit must be from 1 to 1000\n")
        return EXIT_USAGE
    return _call(args, lambda client: client.audit(args.since, args.session, args.limit), show)


def _audit_detail(entry: dict[str, Any]) -> str:
    detail = entry.get("detail") or {}
    action = entry["action"]
    if action in ("create", "delete") and isinstance(detail.get("session"), dict):
        session = detail["session"]
        return f"key {session.get('key', '-')}, services " + ",".join(r["service"] for r in session.get("routes", []))
    if action == "update":
        return "changed " + ", ".join(detail.get("changed", {})) or "-"
    if action in ("extend", "expire"):
        expiry = detail.get("expires_at")
        expiry = expiry.get("to") if isinstance(expiry, dict) else expiry
        return "expires " + _when(expiry, relative=False)
    if action.startswith("proxy_"):
        text = f"node {detail.get('node', '-')}"
        return text + (f": {detail['reason']}" if "reason" in detail else "")
    text = str(detail.get("message") or detail.get("reason") or "")
    return (text[:117] + "...") if len(text) > 120 else text or "-"


def _cmd_whoami(args: argparse.Namespace) -> int:
    def show(reply: Any) -> str:
        roles = [name for name, on in (("admin", reply["admin"]), ("proxy", reply["proxy"])) if on]
        rules = reply["rules"]
        lines = [("identity", reply["identity"]), ("groups", ", ".join(reply["groups"]) or "-"),
                 ("via", reply["via"]), ("roles", ", ".join(roles) or "-"),
                 ("policy", "groups " + ", ".join(rules["groups"]) if rules["groups"] else "the defaults")]
        lines += [(name, "no limit" if value is None else json.dumps(value))
                  for name, value in rules.items() if name != "groups"]
        width = max(len(name) for name, _ in lines)
        return "".join(f"{name.ljust(width)}  {value}\n" for name, value in lines)

    return _call(args, lambda client: client.whoami(), show)


# ---------------------------------------------------------------------- plumbing


def common_options() -> argparse.ArgumentParser:
    """The options every client command shares (--control-plane, --token-file, --ca-file, --json)."""
    return _common_options()


def token_for(args: argparse.Namespace) -> str | None:
    """The bearer token of parsed ``common_options``; raises ``StartupError`` for an unreadable file."""
    return _token(args)


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token: --token-file, TURNOUT_TOKEN, or a local control plane's generated admin token."""
    if args.token_file:
        return read_token(args.token_file, "--token-file")
    token = os.environ.get("TURNOUT_TOKEN", "").strip()
    if token:
        return token
    url = urlsplit(args.control_plane)
    if url.hostname is not None and _is_local(url.hostname):
        path = local_token_path(url.port or (443 if url.scheme == "https" else 80))
        if path.exists():
            return read_token(str(path), "the generated admin token")
    return None


def _is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _call(args: argparse.Namespace, action: Callable[[ControlPlaneClient], Any], show: Callable[[Any], str],
          verdict: Callable[[Any], tuple[int, str]] | None = None) -> int:
    """Run ``action(client)``; print ``show(reply)`` or the JSON; map failures to exit codes.

    ``verdict(reply)`` can turn an answered call into a failure (its status and message).
    """
    url = args.control_plane
    if not url.startswith(("http://", "https://")):
        sys.stderr.write(f"turnout: --control-plane {url!r} must start with http:// or https://\n")
        return EXIT_USAGE
    try:
        token = _token(args)
    except StartupError as exc:
        sys.stderr.write(f"turnout: {exc}\n")
        return EXIT_USAGE
    client = ControlPlaneClient(url, token, args.ca_file)
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
    if verdict is None:
        return EXIT_OK
    code, message = verdict(reply)
    if message and not args.json:
        sys.stderr.write(message)
    return code


def _refusal(exc: ApiError) -> str:
    body = exc.body
    kind = body.get("error")
    if kind == "invalid" and isinstance(body.get("problems"), list):
        lines = ["turnout: the control plane refused the session:"]
        lines += [f"  {p.get('field')}: {p.get('reason')}" for p in body["problems"] if isinstance(p, dict)]
        return "\n".join(lines) + "\n"
    if kind == "policy":
        return f"turnout: refused by policy {body.get('policy')}: {body.get('message')}\n"
    if kind == "rate_limited":
        return f"turnout: {body.get('message')} (HTTP 429)\n"
    return f"turnout: {body.get('message') or kind} (HTTP {exc.status})\n"


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _describe(session: dict[str, Any], revision: int | None = None, group: str | None = None) -> str:
    fields = [("id", session["id"]), ("key", session.get("key", "- (filter-only)")),
              ("owner", session.get("owner") or "-")]
    if group:
        fields.append(("group", group))
    if session.get("labels"):
        fields.append(("labels", ", ".join(f"{k}={v}" for k, v in sorted(session["labels"].items()))))
    fields.append(("created", _when(session.get("created_at"), relative=False)))
    fields.append(("expires", _when(session.get("expires_at"))))
    if revision is not None:
        fields.append(("revision", str(revision)))
    width = max(len(name) for name, _ in fields)
    text = "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)
    rows = [[r["service"], r["destination"], r.get("mode", "steal"), r.get("fallback", "baseline"),
             r.get("upstream_protocol", "listener"), str(r.get("priority", 0)),
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
