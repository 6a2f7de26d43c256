"""``turnout connect``: a session whose sandbox is a process on this machine.

It creates the session through the control plane with the caller's identity (or attaches
to one the caller may change), with a route ``destination: tunnel`` for ``--service``;
then, for as long as it runs, it holds one tunnel to a gateway in the cluster: it asks the
control plane for a one-use ticket, dials the gateway (TCP, TLS optional), upgrades the
connection, and serves every request that arrives over it by forwarding it to ``--local``
(HTTP/1.1, or h2c with ``--local-protocol http2``; gRPC always h2c) with the data plane's own
router. A lost link is redialled with jittered, bounded backoff. On Ctrl-C or SIGTERM, or
when ``COMMAND`` exits, it deletes the session it created (unless ``--keep``) and exits
(with ``COMMAND``'s status when there is one).

Output: what it did and how to reach the session, then live counts on one rewritten line
when standard output is a terminal; ``--json`` prints one JSON object per line per event
(``session``, ``connected``, ``disconnected``, ``request``, ``error``, ``exit``) for agents.
Errors are one line naming what to do, never a traceback. Exit status: 0 stopped, 1 refused
by the control plane or the gateway, 2 usage, 3 control plane unreachable at start, or
``COMMAND``'s own status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import secrets
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from controlplane.cli import common_options, token_for
from controlplane.client import ApiError, ControlPlaneClient, Unreachable
from controlplane.durations import parse_duration
from controlplane.errors import StartupError
from dataplane.connections import Connections
from dataplane.http2.server import H2Connection
from filters import TUNNEL, parse_address
from remocal.pipes import PipeConnection, splice
from remocal.tunnel import (
    DEFAULT_DEAD_AFTER_S,
    DEFAULT_PING_INTERVAL_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_HEAD_BYTES,
    OUTGOING_PATH,
    TUNNEL_PATH,
    UPGRADE,
    Backoff,
    LinkWatch,
    one_target_router,
    parse_head,
    target_listener,
    tunnel_limits,
)

if TYPE_CHECKING:
    from dataplane.router import Router
    from dataplane.tracing import FinishedRequest
    from filters import Address

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# JSON lines waiting for a slow reader before request events are dropped (others never are).
MAX_PENDING_EVENTS = 10_000
DEFAULT_GATEWAY = "127.0.0.1:18090"
# A link that stayed up this long resets the backoff: the next loss is redialled at once.
_STABLE_S = 10.0


def add_command(sub: Any) -> None:
    """Add ``turnout connect`` to the ``turnout`` subcommands."""
    parser = sub.add_parser(
        "connect", parents=[common_options()], help="take a session's traffic with a process on this machine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Create a session (or attach to one of yours) whose sandbox for --service is a process on this\n"
        "machine, and hold a tunnel to a gateway in the cluster: requests carrying the session's key reach\n"
        "--local; without the tunnel the route's fallback applies (baseline, or 503 with --fallback error).\n"
        "Ctrl-C deletes the session it created (unless --keep). With -- COMMAND, runs COMMAND and exits with\n"
        "its status when it exits. See docs/remocal.md.",
        epilog="examples:\n"
        "  turnout connect --service users --local 127.0.0.1:8080\n"
        "  turnout connect --service users --local 127.0.0.1:8080 --key alice --json -- ./run-tests.sh")
    parser.add_argument("--service", required=True, help="the service whose session traffic comes here")
    parser.add_argument("--local", required=True, metavar="HOST:PORT", help="where the local process listens")
    parser.add_argument("--local-protocol", choices=["http1", "http2", "auto"], default="http1",
                        help="how requests reach --local: http1 (default), http2 (h2c), auto (as the caller sent "
                        "them); gRPC always goes h2c")
    parser.add_argument("--session", metavar="ID", help="attach to this session (created if it does not exist)")
    parser.add_argument("--key", help="routing key for a new session (default: generated)")
    parser.add_argument("--mode", choices=["steal", "mirror"], default="steal",
                        help="steal: the local process answers (default); mirror: baseline answers, it gets copies")
    parser.add_argument("--fallback", choices=["baseline", "error"], default="baseline",
                        help="while the tunnel is down: baseline answers (default), or 503 / gRPC 14")
    parser.add_argument("--match", metavar="JSON", help="extra predicate in the rules file's match language")
    parser.add_argument("--ttl", metavar="DURATION", help="lifetime of a new session: 90s, 30m, 2h (default: the "
                        "policy's)")
    parser.add_argument("--gateway", default=os.environ.get("TURNOUT_GATEWAY", DEFAULT_GATEWAY), metavar="HOST:PORT",
                        help=f"the tunnel gateway (env TURNOUT_GATEWAY; default {DEFAULT_GATEWAY}, e.g. through "
                        "kubectl port-forward)")
    parser.add_argument("--gateway-tls", action="store_true", help="the gateway serves TLS")
    parser.add_argument("--gateway-ca-file", metavar="FILE", help="PEM CA bundle to verify the gateway")
    parser.add_argument("--keep", action="store_true", help="leave the session in place on exit")
    parser.add_argument("--proxy-port", type=int, default=0, metavar="PORT",
                        help="port of the local HTTP proxy for outgoing calls into the cluster (127.0.0.1; default: "
                        "a free one); COMMAND gets it as HTTP_PROXY, http_proxy and grpc_proxy")
    parser.add_argument("--ping-interval", type=float, default=DEFAULT_PING_INTERVAL_S, metavar="SECONDS",
                        help=f"keepalive PING interval (default {DEFAULT_PING_INTERVAL_S:g})")
    parser.add_argument("--dead-after", type=float, default=DEFAULT_DEAD_AFTER_S, metavar="SECONDS",
                        help=f"give the link up after this long without a frame (default {DEFAULT_DEAD_AFTER_S:g})")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                        help="run this program; exit with its status when it exits")
    parser.set_defaults(func=run_connect)


@dataclass
class Counts:
    """Live counts of requests served through the tunnel."""

    requests: int = 0
    errors: int = 0
    last_status: int = 0
    connects: int = 0
    started: float = field(default_factory=time.monotonic)


class Reporter:
    """What the person or the agent sees: lines, a rewritten counts line on a terminal, or JSON.

    JSON lines are written by a thread: a reader that falls behind never blocks the event loop
    (which would stop the tunnel's PINGs). ``request`` events beyond ``MAX_PENDING_EVENTS``
    waiting lines are dropped and counted (``dropped_request_events`` in the ``exit`` event).
    """

    def __init__(self, out: TextIO, err: TextIO, as_json: bool) -> None:
        self.out = out
        self.err = err
        self.as_json = as_json
        self.live = not as_json and out.isatty()
        self._live_shown = False
        self.dropped = 0
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        if as_json:
            self._writer = threading.Thread(target=self._write_lines, name="turnout-connect-events", daemon=True)
            self._writer.start()

    def event(self, kind: str, text: str, **fields: Any) -> None:
        """One event: a JSON line, or ``text`` as a line (above the live counts)."""
        if self.as_json:
            if kind == "request" and self._lines.qsize() >= MAX_PENDING_EVENTS:
                self.dropped += 1
                return
            self._lines.put(json.dumps({"event": kind, "at": round(time.time(), 3), **fields}) + "\n")
            return
        self._clear()
        self.out.write(f"turnout connect: {text}\n")
        self.out.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is waiting (up to ``timeout_s``), then stop the writer."""
        if self._writer is not None:
            self._lines.put(None)
            self._writer.join(timeout_s)
            self._writer = None

    def _write_lines(self) -> None:
        while True:
            line = self._lines.get()
            if line is None:
                return
            try:
                self.out.write(line)
                self.out.flush()
            except (OSError, ValueError):  # the reader went away: nothing more can be shown
                return

    def error(self, text: str, **fields: Any) -> None:
        """A problem: one line on standard error (and an ``error`` event with --json)."""
        if self.as_json:
            self.event("error", text, message=text, **fields)
        else:
            self._clear()
        self.err.write(f"turnout connect: {text}\n")
        self.err.flush()

    def counts(self, counts: Counts, state: str) -> None:
        """Rewrite the live counts line (terminals only)."""
        if not self.live:
            return
        last = counts.last_status or "-"
        self.out.write(f"\r\x1b[K[{state}] requests {counts.requests}  errors {counts.errors}  last {last}")
        self.out.flush()
        self._live_shown = True

    def _clear(self) -> None:
        if self._live_shown:
            self.out.write("\r\x1b[K")
            self._live_shown = False


class TunnelRefused(Exception):
    """The gateway (or the control plane through it) refused the tunnel; not worth redialling."""


class Connector:
    """One ``turnout connect`` run."""

    def __init__(self, args: argparse.Namespace, client: ControlPlaneClient, reporter: Reporter,
                 local: Address) -> None:
        self.args = args
        self.client = client
        self.reporter = reporter
        self.local = local
        self.counts = Counts()
        self.session_id = ""
        self.key: str | None = None
        self.created = False
        self.state = "connecting"
        self.stopping = asyncio.Event()
        self.exit_code = EXIT_OK
        self.watch: LinkWatch | None = None
        self.outgoing: LinkWatch | None = None
        self.router: Router | None = None
        self.proxy = LocalProxy(self)

    # ------------------------------------------------------------------ the session

    def prepare_session(self) -> None:
        """Attach to ``--session`` or create a new session; raises ``ApiError`` / ``Unreachable``."""
        args = self.args
        if args.session:
            try:
                reply = self.client.get_session(args.session)
            except ApiError as exc:
                if exc.status != 404:
                    raise
            else:
                session = reply["session"]
                routes = [r for r in session["routes"] if r["service"] == args.service]
                if not routes or routes[0]["destination"] != TUNNEL:
                    raise ApiError(409, {"error": "conflict", "message": (
                        f"session {args.session!r} has no route for service {args.service!r} with destination "
                        "tunnel; give another --session, or none to create one")})
                self.session_id = session["id"]
                self.key = session.get("key")
                self.reporter.event("session", f"attached to session {self.session_id} (owner "
                                    f"{session.get('owner') or '-'}, key {self.key or '-'})", session=session,
                                    created=False)
                return
        route: dict[str, Any] = {"service": args.service, "destination": TUNNEL, "mode": args.mode,
                                 "fallback": args.fallback}
        if args.match:
            route["match"] = json.loads(args.match)
        spec: dict[str, Any] = {"routes": [route]}
        if args.session:
            spec["id"] = args.session
        key = args.key or ("local-" + secrets.token_hex(4))
        spec["key"] = key
        if args.ttl:
            spec["ttl_s"] = parse_duration(args.ttl)
        reply = self.client.create_session(spec)
        session = reply["session"]
        self.session_id = session["id"]
        self.key = session.get("key")
        self.created = True
        self.reporter.event("session", f"created session {self.session_id} for service {args.service} (owner "
                            f"{session.get('owner') or '-'}, key {self.key}, mode {args.mode}, fallback "
                            f"{args.fallback}){'' if args.keep else '; deleted when this command exits'}",
                            session=session, created=True)

    def delete_session(self) -> None:
        """Delete the session this run created (unless --keep)."""
        if not self.created or self.args.keep:
            return
        try:
            self.client.delete_session(self.session_id)
        except ApiError as exc:
            if exc.status != 404:
                self.reporter.error(f"could not delete session {self.session_id}: {exc}")
                return
        except Unreachable as exc:
            self.reporter.error(f"could not delete session {self.session_id} (it expires by its TTL): {exc}")
            return
        self.reporter.event("deleted", f"deleted session {self.session_id}", session=self.session_id)

    # ------------------------------------------------------------------ the tunnel

    def finished(self, exchange: FinishedRequest) -> None:
        """One request from the tunnel was answered (or failed)."""
        counts = self.counts
        counts.requests += 1
        status = exchange.status
        counts.last_status = status
        if status >= 500 or status == 0:
            counts.errors += 1
        request = exchange.request
        if self.reporter.as_json:
            self.reporter.event("request", "", method=request.method.decode("latin-1"),
                                target=request.target.decode("latin-1")[:200], status=status,
                                ms=round((time.perf_counter() - exchange.started_at) * 1000, 3))
        self.reporter.counts(counts, self.state)

    async def hold(self) -> None:
        """Keep a tunnel up until stopped: dial, serve, redial after a loss."""
        args = self.args
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        self.router = router = one_target_router(loop, tunnel_limits(), "connect", self.finished)
        listener = target_listener("tunnel", args.service, self.local, args.local_protocol)
        first = True
        while not self.stopping.is_set():
            up_since = 0.0
            try:
                watch = await self._dial(router, listener)
                up_since = loop.time()
                self.state = "connected"
                self.counts.connects += 1
                key = self.key
                hint = (f"; requests with 'baggage: turnout-session={key}' to {args.service} now reach {self.local}"
                        if key else f"; requests matching the session's filter now reach {self.local}")
                self.reporter.event("connected", f"tunnel up through gateway {args.gateway}{hint}",
                                    gateway=args.gateway, session=self.session_id, key=key, local=str(self.local))
                if first and key:
                    first = False
                    if not self.reporter.as_json:
                        self.reporter.event("hint", f"try: curl -H 'baggage: turnout-session={key}' "
                                            f"http://{args.service}/  (from inside the cluster, or through its "
                                            "ingress)")
                self.reporter.counts(self.counts, self.state)
                stop = loop.create_task(self.stopping.wait())
                outgoing = self.outgoing
                links: set[asyncio.Future[Any]] = {watch.lost, stop}
                if outgoing is not None:
                    links.add(outgoing.lost)
                await asyncio.wait(links, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                self.outgoing = None
                self.proxy.conn = None
                stopping = self.stopping.is_set()
                if outgoing is not None:
                    outgoing.close("turnout connect is stopping" if stopping else "the tunnel is reconnecting")
                if stopping:
                    watch.close("turnout connect is stopping")
                    return
                if watch.lost.done():
                    reason = watch.lost.result()
                else:  # the outgoing link died alone: both go, and come back together
                    lost = outgoing.lost.result() if outgoing is not None and outgoing.lost.done() else "closed"
                    reason = "the outgoing link was lost: " + lost
                    watch.close(reason)
                self.state = "reconnecting"
                self.reporter.event("disconnected", f"tunnel lost: {reason}; reconnecting", reason=reason)
            except TunnelRefused as exc:
                self.reporter.error(str(exc))
                self.exit_code = EXIT_REFUSED
                self.stopping.set()
                return
            except ApiError as exc:
                if exc.status in (401, 403, 404, 409):
                    self.reporter.error(f"the control plane refused the tunnel: {exc} (HTTP {exc.status})",
                                        status=exc.status, body=exc.body)
                    self.exit_code = EXIT_REFUSED
                    self.stopping.set()
                    return
                self.reporter.error(f"control plane: {exc} (HTTP {exc.status}); retrying")
            except (Unreachable, OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
                self.state = "reconnecting"
                self.reporter.error(f"cannot reach the tunnel: {_why(exc)}; retrying")
            if up_since and loop.time() - up_since >= _STABLE_S:
                backoff.reset()
            delay = backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)

    async def _dial(self, router: Router, listener: Any) -> LinkWatch:
        args = self.args
        loop = asyncio.get_running_loop()
        ticket = (await asyncio.to_thread(self.client.tunnel_ticket, self.session_id))["ticket"]
        host, _, port = args.gateway.rpartition(":")
        host = host[1:-1] if host.startswith("[") else host
        context = None
        if args.gateway_tls:
            context = ssl.create_default_context(cafile=args.gateway_ca_file)
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            transport, upgrade = await loop.create_connection(
                lambda: _UpgradeClient(host, ticket, loop), host, int(port), ssl=context,
                server_hostname=host if context is not None else None)
            status, fields, rest = await upgrade.answer
        if status != 101:
            transport.close()
            message = rest.decode("utf-8", "replace")
            with contextlib.suppress(ValueError):
                message = str(json.loads(message).get("message", message))
            if status in (401, 403, 404, 409):
                raise TunnelRefused(f"the gateway at {args.gateway} refused the tunnel (HTTP {status}): {message}")
            raise ConnectionError(f"the gateway at {args.gateway} answered HTTP {status}: {message}")
        conn = H2Connection(router, Connections(), listener)
        watch = LinkWatch(conn, loop, args.ping_interval, args.dead_after)
        watch.start(transport, rest)
        self.watch = watch
        token = fields.get("x-turnout-outgoing")
        if token:
            try:
                await self._dial_outgoing(token, host, int(port), context)
            except (OSError, TimeoutError, ConnectionError) as exc:
                self.reporter.error(f"the outgoing link failed ({_why(exc)}); outgoing calls answer 502 until the "
                                    "tunnel reconnects")
        return watch

    async def _dial_outgoing(self, token: str, host: str, port: int, context: ssl.SSLContext | None) -> None:
        """The second connection: this machine is the HTTP/2 client, one CONNECT per outgoing call."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            transport, upgrade = await loop.create_connection(
                lambda: _UpgradeClient(host, token, loop, OUTGOING_PATH), host, port, ssl=context,
                server_hostname=host if context is not None else None)
            status, _fields, rest = await upgrade.answer
            if status != 101:
                transport.close()
                raise ConnectionError(f"the gateway answered HTTP {status}: {rest.decode('utf-8', 'replace')}")
            conn = PipeConnection(True, loop)
            watch = LinkWatch(conn, loop, self.args.ping_interval, self.args.dead_after)
            watch.start(transport, rest)
            await conn.ready
        self.outgoing = watch
        self.proxy.conn = conn


class LocalProxy:
    """The HTTP proxy on 127.0.0.1 for the local program's calls into the cluster.

    ``CONNECT host:port`` (HTTPS, gRPC through ``grpc_proxy``) becomes one CONNECT stream over
    the outgoing link: bytes as they are, so the program must put the key in its own
    ``baggage`` (gRPC metadata). An absolute-form request (``GET http://orders:8080/x``) is
    sent the same way, rewritten to origin form with ``connection: close``, and with the
    session's key added to ``baggage`` when the program did not send it. The gateway dials
    the destination from inside the cluster, when the caller's policy allows it (403 naming
    the rule otherwise).
    """

    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.conn: PipeConnection | None = None
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> int:
        """Listen on 127.0.0.1:``port`` (0: a free port); returns the port."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port, limit=MAX_HEAD_BYTES * 4)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self.port

    def close(self) -> None:
        """Stop accepting."""
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            line, fields = parse_head(head[:-4])
            method, target, _version = line.split(" ")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, OSError):
            await _reply(writer, 400, "a proxy request: CONNECT host:port, or an absolute-form http:// request")
            return
        if method == "CONNECT":
            authority, first = target, b""
        elif target.startswith("http://"):
            authority, _, path = target[len("http://"):].partition("/")
            authority = authority if ":" in authority.rstrip("]") else authority + ":80"
            first = self._origin_form(method, "/" + path, head, fields)
        else:
            await _reply(writer, 400, f"{target!r}: send an absolute-form http:// target (the program uses this as "
                         "its HTTP proxy) or CONNECT")
            return
        conn = self.conn
        if conn is None:
            await _reply(writer, 502, "the tunnel to the cluster is not connected (turnout connect is reconnecting)")
            return
        try:
            pipe = await conn.open(authority)
        except ConnectionRefusedError as exc:
            text = str(exc)
            status = int(text[:3]) if text[:3].isdigit() else 502
            await _reply(writer, status, f"the gateway refused {authority}: {text[4:]}")
            return
        except (ConnectionError, OSError) as exc:
            await _reply(writer, 502, f"the outgoing link failed: {exc}")
            return
        if method == "CONNECT":
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        try:
            await splice(pipe, reader, writer, first)
        finally:
            conn.pipes.pop(pipe.stream_id, None)

    def _origin_form(self, method: str, path: str, head: bytes, fields: dict[str, str]) -> bytes:
        """The request head as the destination gets it."""
        key = self.connector.key
        lines = [f"{method} {path} HTTP/1.1"]
        hop = {"proxy-connection", "connection", "keep-alive", "proxy-authorization"}
        baggage_seen = False
        for raw in head[:-4].decode("latin-1").split("\r\n")[1:]:
            name, _, value = raw.partition(":")
            lowered = name.strip().lower()
            if lowered in hop:
                continue
            line = raw
            if lowered == "baggage" and key:
                if baggage_seen:
                    lines.append(line)
                    continue
                baggage_seen = True
                if f"turnout-session={key}" not in fields.get("baggage", ""):
                    line = f"{name}: {value.strip()},turnout-session={key}"
            lines.append(line)
        if key and not baggage_seen:
            lines.append(f"baggage: turnout-session={key}")
        lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _reply(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = (message + "\n").encode()
    reason = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}.get(status, "Error")
    writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                 f"content-length: {len(body)}\r\nx-turnout-error: outgoing\r\nconnection: close\r\n\r\n"
                 .encode() + body)
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


class _UpgradeClient(asyncio.Protocol):
    """Sends the upgrade request and reads the answer's head (and an error's body)."""

    def __init__(self, host: str, ticket: str, loop: asyncio.AbstractEventLoop, path: str = TUNNEL_PATH) -> None:
        self.host = host
        self.path = path
        self.ticket = ticket
        self.answer: asyncio.Future[tuple[int, dict[str, str], bytes]] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.head: tuple[int, dict[str, str]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(f"POST {self.path} HTTP/1.1\r\nhost: {self.host}\r\nauthorization: Bearer {self.ticket}\r\n"  # type: ignore[attr-defined]
                        f"upgrade: {UPGRADE}\r\nconnection: Upgrade\r\ncontent-length: 0\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                if len(self.buffer) > MAX_HEAD_BYTES:
                    self._done(ConnectionError("the gateway's answer head is too large: is this a turnout gateway?"))
                return
            try:
                line, fields = parse_head(self.buffer[:end])
                status = int(line.split(" ")[1])
            except (ValueError, IndexError):
                self._done(ConnectionError("the gateway's answer is not HTTP/1.1: is this a turnout gateway?"))
                return
            self.buffer = self.buffer[end + 4:]
            self.head = (status, fields)
            if status == 101:
                assert self.transport is not None
                self.transport.pause_reading()  # the tunnel's HTTP/2 takes it from here
                self._answer()
                return
        assert self.head is not None
        length = self.head[1].get("content-length", "")
        if length.isdigit() and len(self.buffer) >= int(length):
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head is not None:
            self._answer()
        else:
            self._done(ConnectionError("the gateway closed the connection without answering (if it serves TLS, "
                                       "add --gateway-tls)"))

    def _answer(self) -> None:
        if not self.answer.done() and self.head is not None:
            self.answer.set_result((self.head[0], self.head[1], self.buffer))

    def _done(self, exc: Exception) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens at the gateway address (is turnout gateway running, or your " \
               "kubectl port-forward?)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {HANDSHAKE_TIMEOUT_S:g} s"
    return str(exc) or type(exc).__name__


async def _connect(args: argparse.Namespace, client: ControlPlaneClient, reporter: Reporter,
                   local: Address) -> int:
    connector = Connector(args, client, reporter, local)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.to_thread(connector.prepare_session)
    except ApiError as exc:
        reporter.error(_refusal(exc), status=exc.status, body=exc.body)
        return EXIT_REFUSED
    except Unreachable as exc:
        reporter.error(str(exc))
        return EXIT_UNREACHABLE
    stopped_by: list[str] = []

    def stop(name: str) -> None:
        stopped_by.append(name)
        connector.stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig.name)
    child: asyncio.subprocess.Process | None = None
    waiter: asyncio.Task[int] | None = None
    try:
        proxy_port = await connector.proxy.start(args.proxy_port)
    except OSError as exc:
        reporter.error(f"--proxy-port {args.proxy_port}: cannot listen: {exc.strerror or exc}")
        await asyncio.to_thread(connector.delete_session)
        return EXIT_USAGE
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    reporter.event("proxy", f"outgoing calls into the cluster: HTTP proxy {proxy_url} (HTTP_PROXY, grpc_proxy)",
                   proxy=proxy_url)
    holder = loop.create_task(connector.hold())
    holder.add_done_callback(lambda _: connector.stopping.set())  # it only returns when it gives up
    try:
        command = list(args.command[1:] if args.command[:1] == ["--"] else args.command)
        if command:
            env = dict(os.environ, TURNOUT_SESSION=connector.session_id, TURNOUT_KEY=connector.key or "",
                       HTTP_PROXY=proxy_url, http_proxy=proxy_url, grpc_proxy=proxy_url)
            env.setdefault("NO_PROXY", "localhost,127.0.0.1,::1")  # the program's own local calls stay local
            env.setdefault("no_proxy", env["NO_PROXY"])
            try:
                # With --json, standard output carries only the events: the program's goes to standard error.
                child = await asyncio.create_subprocess_exec(*command, env=env,
                                                             stdout=sys.stderr.fileno() if args.json else None)
            except OSError as exc:
                reporter.error(f"cannot run {command[0]!r}: {exc.strerror or exc}")
                connector.exit_code = 127
                connector.stopping.set()
            else:
                reporter.event("command", f"running {' '.join(command)} (pid {child.pid})", pid=child.pid)
                waiter = loop.create_task(child.wait())
                waiter.add_done_callback(lambda _: connector.stopping.set())
        await connector.stopping.wait()
        await asyncio.sleep(0)  # a child that just exited has its status now
        child_exited = child is not None and child.returncode is not None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
            try:
                await asyncio.wait_for(child.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        if child is not None and child_exited and child.returncode is not None and not stopped_by:
            connector.exit_code = child.returncode if child.returncode >= 0 else 128 - child.returncode
            reporter.event("command_exit", f"{command[0]} exited with status {child.returncode}",
                           status=child.returncode)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(holder), 5)
        if holder.done() and not holder.cancelled() and holder.exception() is not None:
            failure = holder.exception()
            reporter.error(f"the tunnel failed unexpectedly: {type(failure).__name__}: {failure}")
            connector.exit_code = EXIT_REFUSED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if not holder.done():
            holder.cancel()
        if connector.watch is not None:
            connector.watch.close("turnout connect exited")
        if connector.outgoing is not None:
            connector.outgoing.close("turnout connect exited")
        connector.proxy.close()
    await asyncio.to_thread(connector.delete_session)
    counts = connector.counts
    reporter.event("exit", f"done: {counts.requests} request(s), {counts.errors} error(s)",
                   requests=counts.requests, errors=counts.errors, status=connector.exit_code,
                   stopped_by=stopped_by[0] if stopped_by else None, dropped_request_events=reporter.dropped)
    return connector.exit_code


def _refusal(exc: ApiError) -> str:
    body = exc.body
    if body.get("error") == "invalid" and isinstance(body.get("problems"), list):
        return "the control plane refused the session: " + "; ".join(
            f"{p.get('field')}: {p.get('reason')}" for p in body["problems"] if isinstance(p, dict))
    if body.get("error") == "policy":
        return f"refused by policy {body.get('policy')}: {body.get('message')}"
    return f"{body.get('message') or body.get('error')} (HTTP {exc.status})"


def run_connect(args: argparse.Namespace) -> int:
    """``turnout connect`` to completion."""
    reporter = Reporter(sys.stdout, sys.stderr, args.json)
    try:
        return _run_connect(args, reporter)
    finally:
        reporter.close()


def _run_connect(args: argparse.Namespace, reporter: Reporter) -> int:
    try:
        local = parse_address(args.local)
    except ValueError as exc:
        reporter.error(f"--local: {exc}")
        return EXIT_USAGE
    if args.match:
        try:
            if not isinstance(json.loads(args.match), dict):
                raise ValueError("must be a JSON object")
        except ValueError as exc:
            reporter.error(f"--match: {exc}")
            return EXIT_USAGE
    if args.ttl:
        try:
            parse_duration(args.ttl)
        except ValueError as exc:
            reporter.error(f"--ttl: {exc}")
            return EXIT_USAGE
    host, sep, port = args.gateway.rpartition(":")
    if not sep or not host or not port.isdigit():
        reporter.error(f"--gateway {args.gateway!r}: expected HOST:PORT, e.g. {DEFAULT_GATEWAY}")
        return EXIT_USAGE
    url = args.control_plane
    if not url.startswith(("http://", "https://")):
        reporter.error(f"--control-plane {url!r} must start with http:// or https://")
        return EXIT_USAGE
    try:
        token = token_for(args)
    except StartupError as exc:
        reporter.error(str(exc))
        return EXIT_USAGE
    client = ControlPlaneClient(url, token, args.ca_file)
    import uvloop

    try:
        return int(uvloop.run(_connect(args, client, reporter, local)))
    except KeyboardInterrupt:  # a second Ctrl-C during the clean-up
        return 130
