"""``turnout gateway``: the cluster side of ``turnout connect``.

It listens on a tunnel port for machines (TLS when configured). A machine upgrades one
connection with a ticket the control plane gave its owner (``remocal/tunnel.py`` describes
the carrier); the gateway redeems the ticket with the control plane under its own gateway
credential, so who may attach is decided there (only the session's owner, its group, or an
admin), and the gateway never sees the machine's credential. For each tunnel it serves a
**data address**, one port on the pod's address, that the control plane pushes to every
proxy as the session's destination; each request arriving there crosses the tunnel as one
HTTP/2 stream. When the link is lost (the machine closed it, or no frame for
``dead_after_s``), the data port and every connection on it close at once and the control
plane is told, so proxies apply the route's fallback. Every ``report_interval_s`` the
gateway reports each tunnel's counts, which renews its lease.

``--admin`` serves ``/healthz``, ``/tunnels`` (JSON) and ``/metrics`` (Prometheus: the
gateway's own families and each tunnel's request metrics, labelled by tunnel).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import json
import logging
import secrets
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from controlplane.client import ApiError, ControlPlaneClient, Unreachable
from controlplane.policy import Rules, parse_policy
from dataplane.config import Limits
from dataplane.connections import Connections
from dataplane.http2.client import H2Client
from dataplane.listen import Sniffer
from dataplane.metrics import merge_expositions
from filters import Address, parse_address
from remocal.pipes import Pipe, PipeConnection, splice
from remocal.tunnel import (
    DEFAULT_DEAD_AFTER_S,
    DEFAULT_PING_INTERVAL_S,
    HANDSHAKE_TIMEOUT_S,
    MAX_HEAD_BYTES,
    OUTGOING_PATH,
    TUNNEL_PATH,
    UPGRADE,
    LinkWatch,
    error_head,
    one_target_router,
    parse_head,
    target_listener,
    tunnel_limits,
)

if TYPE_CHECKING:
    from dataplane.router import Router
    from dataplane.tracing import FinishedRequest

log = logging.getLogger("turnout.gateway")

# The tunnel stream's upstream address inside the gateway: the tunnel's own HTTP/2 connection
# is in the pool under it. Port 0 is never connectable, so a request that arrives after the
# link was lost (the data port closes at once) fails fast rather than dialling anything.
_TUNNEL_ADDRESS = Address("127.0.0.1", 0)
DEFAULT_REPORT_INTERVAL_S = 5.0


@dataclass(frozen=True)
class GatewayOptions:
    """The ``turnout gateway`` flags."""

    listen: str = "0.0.0.0:18090"
    data_host: str = "127.0.0.1"
    advertise_host: str = ""  # "": data_host
    control_plane: str = "http://127.0.0.1:18080"
    token: str | None = None
    ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    gateway_id: str = ""
    admin: str | None = None
    ping_interval_s: float = DEFAULT_PING_INTERVAL_S
    dead_after_s: float = DEFAULT_DEAD_AFTER_S
    report_interval_s: float = DEFAULT_REPORT_INTERVAL_S
    max_tunnels: int = 256


class TunnelHandle:
    """One attached tunnel: its link, data port, router and counts."""

    def __init__(self, tunnel_id: str, session_id: str, peer: str, router: Router, connections: Connections,
                 server: asyncio.AbstractServer, address: Address, watch: LinkWatch) -> None:
        self.id = tunnel_id
        self.session_id = session_id
        self.peer = peer
        self.router = router
        self.connections = connections
        self.server = server
        self.address = address
        self.watch = watch
        self.connected_at = time.time()
        self.requests = 0
        self.errors = 0
        self.bytes_out = 0  # response body bytes sent back to proxies
        self.last_status = 0
        self.last_error = ""
        self.closed = False
        # Outgoing calls (the machine's program calling cluster services): the link's secret,
        # the attaching identity's rules, the session's key, and the link once it is up.
        self.outgoing_token = ""
        self.rules = Rules()
        self.key: str | None = None
        self.outgoing: LinkWatch | None = None
        self.outgoing_calls = 0
        self.outgoing_refused = 0

    def finished(self, exchange: FinishedRequest) -> None:
        """One request through the tunnel finished."""
        self.requests += 1
        status = exchange.status
        self.last_status = status
        if status >= 500 or status == 0:
            self.errors += 1
            self.last_error = f"{status} for {exchange.request.method.decode('latin-1')} " \
                              f"{exchange.request.target.decode('latin-1')[:100]}"

    def stats(self) -> dict[str, Any]:
        """Counts for the control plane and /tunnels."""
        return {"requests": self.requests, "errors": self.errors, "bytes_in": self.watch.bytes_in,
                "bytes_out": self.bytes_out, "last_status": self.last_status or None,
                "last_error": self.last_error or None}

    def to_dict(self) -> dict[str, Any]:
        """JSON for /tunnels."""
        return {"id": self.id, "session": self.session_id, "machine": self.peer, "address": str(self.address),
                "connected_at": self.connected_at, "outgoing_calls": self.outgoing_calls,
                "outgoing_refused": self.outgoing_refused, **self.stats()}


class Gateway:
    """The tunnel listener, the tunnels, and their reports to the control plane."""

    def __init__(self, options: GatewayOptions, loop: asyncio.AbstractEventLoop,
                 client: ControlPlaneClient) -> None:
        self.options = options
        self.loop = loop
        self.client = client
        self.gateway_id = options.gateway_id or socket.gethostname()
        self.advertise_host = options.advertise_host or options.data_host
        self.tunnels: dict[str, TunnelHandle] = {}
        self._by_outgoing_token: dict[str, TunnelHandle] = {}
        # Outgoing tokens given in a 101 whose tunnel is still coming up (its SETTINGS, its data port).
        self._pending_outgoing: dict[str, asyncio.Future[TunnelHandle]] = {}
        self.registry = CollectorRegistry()
        self._tunnels_gauge = Gauge("turnout_gateway_tunnels", "Tunnels attached now", registry=self.registry)
        self._tunnels_gauge.set_function(lambda: len(self.tunnels))
        self.attaches = Counter("turnout_gateway_attaches", "Tunnel upgrade attempts by result", ["result"],
                                registry=self.registry)
        self.losses = Counter("turnout_gateway_tunnel_losses", "Tunnels lost, by cause", ["cause"],
                              registry=self.registry)
        self._per_tunnel = _TunnelCollector(self)
        self.registry.register(self._per_tunnel)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.pending = 0

    # ------------------------------------------------------------------ attaching

    def spawn(self, coro: Any) -> None:
        """Run a background task, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def attach(self, transport: asyncio.Transport, ticket: str, peer: str, already: bytes) -> None:
        """Redeem the ticket, answer 101, and bring the tunnel up (or answer why not, and close)."""
        options = self.options
        if len(self.tunnels) + self.pending >= options.max_tunnels:
            self.attaches.labels("full").inc()
            _refuse(transport, 503, "Service Unavailable", "gateway_full",
                    f"gateway {self.gateway_id} holds {options.max_tunnels} tunnels, its --max-tunnels; try another")
            return
        self.pending += 1
        try:
            await self._attach(transport, ticket, peer, already)
        finally:
            self.pending -= 1

    async def _attach(self, transport: asyncio.Transport, ticket: str, peer: str, already: bytes) -> None:
        options = self.options
        sock = socket.socket(socket.AF_INET6 if ":" in options.data_host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((options.data_host, 0))
            sock.listen(1024)  # connections wait in the backlog until the tunnel is up
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            self.attaches.labels("error").inc()
            _refuse(transport, 500, "Internal Server Error", "data_port", f"cannot open a data port: {exc}")
            return
        address = Address(self.advertise_host, sock.getsockname()[1])
        try:
            reply = await asyncio.to_thread(self.client.attach_tunnel, ticket, self.gateway_id, str(address), peer)
        except ApiError as exc:
            sock.close()
            self.attaches.labels("refused").inc()
            _refuse(transport, exc.status, "Refused", str(exc.body.get("error", "refused")),
                    "the control plane refused the tunnel: " + str(exc))
            return
        except Unreachable as exc:
            sock.close()
            self.attaches.labels("error").inc()
            _refuse(transport, 502, "Bad Gateway", "control_plane_unreachable", str(exc))
            return
        tunnel_id = reply["tunnel"]["id"]
        if transport.is_closing():
            sock.close()
            self.spawn(self._detach(tunnel_id, "the machine closed the connection during the upgrade"))
            return
        outgoing_token = secrets.token_urlsafe(24)
        pending: asyncio.Future[TunnelHandle] = self.loop.create_future()
        self._pending_outgoing[outgoing_token] = pending
        try:
            await self._bring_up(transport, already, reply, outgoing_token, pending, sock, address, peer)
        finally:
            del self._pending_outgoing[outgoing_token]
            if not pending.done():
                pending.cancel()

    async def _bring_up(self, transport: asyncio.Transport, already: bytes, reply: dict[str, Any],
                        outgoing_token: str, pending: asyncio.Future[TunnelHandle], sock: socket.socket,
                        address: Address, peer: str) -> None:
        options = self.options
        tunnel_id = reply["tunnel"]["id"]
        session_id = reply["tunnel"]["session"]
        transport.write(f"HTTP/1.1 101 Switching Protocols\r\nupgrade: {UPGRADE}\r\nconnection: Upgrade\r\n"
                        f"x-turnout-tunnel: {tunnel_id}\r\nx-turnout-session: {session_id}\r\n"
                        f"x-turnout-gateway: {self.gateway_id}\r\nx-turnout-outgoing: {outgoing_token}\r\n"
                        "\r\n".encode())
        limits = tunnel_limits()
        handle: TunnelHandle | None = None

        def finished(exchange: FinishedRequest) -> None:
            if handle is not None:
                handle.finished(exchange)
                handle.bytes_out += exchange.bytes_out  # type: ignore[attr-defined]  # an Exchange

        # Proxies' connections to the data port are served with the proxy's own defaults; the
        # tunnel's HTTP/2 connection with the tunnel's (many streams, never idle-closed).
        router = one_target_router(self.loop, Limits(upstream_connect_timeout_s=2.0), tunnel_id, finished)
        client = H2Client(router.upstreams, _TUNNEL_ADDRESS, limits, self.loop)
        watch = LinkWatch(client, self.loop, options.ping_interval_s, options.dead_after_s)
        watch.start(transport, already)
        try:
            await asyncio.wait_for(asyncio.shield(client.ready), HANDSHAKE_TIMEOUT_S)
        except Exception as exc:  # a timeout, a closed link, a peer that is not HTTP/2
            watch.close(f"no HTTP/2 SETTINGS from the machine: {str(exc) or type(exc).__name__}")
            sock.close()
            self.attaches.labels("error").inc()
            self.spawn(self._detach(tunnel_id, "the tunnel's HTTP/2 handshake failed"))
            return
        router.upstreams.h2.add(client)
        connections = Connections()
        listener = target_listener("tunnel-" + tunnel_id, session_id, _TUNNEL_ADDRESS, "http2")
        server = await self.loop.create_server(lambda: Sniffer(router, connections, listener), sock=sock)
        handle = TunnelHandle(tunnel_id, session_id, peer, router, connections, server, address, watch)
        handle.outgoing_token = outgoing_token
        outgoing = reply.get("outgoing") or {}
        handle.key = outgoing.get("key")
        rules = outgoing.get("rules") or {}
        try:
            handle.rules = parse_policy({k: rules[k] for k in ("allowed_services", "allowed_destinations")
                                         if rules.get(k) is not None}).rules_for(())
        except Exception:  # rules the control plane checked: a refusal here would be a bug, fail closed
            handle.rules = parse_policy({"allowed_services": [], "allowed_destinations": []}).rules_for(())
        handle.rules = Rules(handle.rules.allowed_services, handle.rules.allowed_destinations,
                             groups=tuple(rules.get("groups") or ()))
        self._by_outgoing_token[outgoing_token] = handle
        self.tunnels[tunnel_id] = handle
        pending.set_result(handle)
        self.attaches.labels("ok").inc()
        log.info("tunnel %s up: session %s, machine %s, data address %s", tunnel_id, session_id, peer, address)
        self.spawn(self._watch(handle))

    async def _watch(self, handle: TunnelHandle) -> None:
        reason = await handle.watch.lost
        self._close(handle)
        cause = "dead_peer" if reason.startswith("no frame") else "closed"
        self.losses.labels(cause).inc()
        log.info("tunnel %s lost (%s): data port %s closed", handle.id, reason, handle.address)
        await self._detach(handle.id, reason)

    def _close(self, handle: TunnelHandle) -> None:
        """Close the data port and every proxy connection on it, at once: a proxy's next request
        to this session gets its fallback (connection refused now, the control plane's push a
        moment later)."""
        if handle.closed:
            return
        handle.closed = True
        self.tunnels.pop(handle.id, None)
        self._by_outgoing_token.pop(handle.outgoing_token, None)
        if handle.outgoing is not None:
            handle.outgoing.close("the tunnel closed")
        handle.server.close()
        for conn in list(handle.connections.open):
            conn.close()
        handle.router.upstreams.close_all()
        handle.watch.close("the gateway closed the tunnel")

    async def _detach(self, tunnel_id: str, reason: str) -> None:
        try:
            await asyncio.to_thread(self.client.detach_tunnel, tunnel_id, reason)
        except ApiError as exc:
            if exc.status != 404:
                log.warning("tunnel %s: the control plane refused the detach: %s", tunnel_id, exc)
        except Unreachable as exc:
            log.warning("tunnel %s: cannot tell the control plane it is gone (its lease runs out): %s", tunnel_id,
                        exc)

    # ------------------------------------------------------------------ outgoing calls

    async def attach_outgoing(self, transport: asyncio.Transport, token: str, already: bytes) -> None:
        """The machine's second connection, for its program's calls into the cluster: HTTP/2 with
        the machine as the client, one CONNECT stream per call."""
        handle = self._by_outgoing_token.get(token)
        pending = self._pending_outgoing.get(token)
        if handle is None and pending is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                handle = await asyncio.wait_for(asyncio.shield(pending), HANDSHAKE_TIMEOUT_S)
        if handle is None or handle.closed:
            _refuse(transport, 401, "Unauthorized", "unauthorized", "unknown outgoing token: it is given in the "
                    "tunnel's 101 answer and dies with the tunnel")
            return
        if handle.outgoing is not None:
            handle.outgoing.close("replaced by a new outgoing link")
        transport.write(f"HTTP/1.1 101 Switching Protocols\r\nupgrade: {UPGRADE}\r\nconnection: Upgrade\r\n"
                        f"x-turnout-tunnel: {handle.id}\r\n\r\n".encode())
        conn = PipeConnection(False, self.loop, lambda pipe, authority: self.spawn(
            self._call_out(handle, conn, pipe, authority)))
        watch = LinkWatch(conn, self.loop, self.options.ping_interval_s, self.options.dead_after_s)
        watch.start(transport, already)
        handle.outgoing = watch

    async def _call_out(self, handle: TunnelHandle, conn: PipeConnection, pipe: Pipe, authority: str) -> None:
        """One outgoing call: check the attaching identity's rules, dial from here, splice."""
        try:
            address = parse_address(authority)
        except ValueError as exc:
            conn.answer(pipe, 400, f"CONNECT {authority!r}: {exc}", "bad_authority")
            return
        refusal = outgoing_refusal(handle.rules, address)
        if refusal is not None:
            rule, message = refusal
            handle.outgoing_refused += 1
            conn.answer(pipe, 403, f"refused by policy {rule}: {message}", "policy; rule=" + rule)
            return
        try:
            async with asyncio.timeout(5.0):
                reader, writer = await asyncio.open_connection(address.host, address.port)
        except (OSError, TimeoutError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            conn.answer(pipe, 502, f"cannot connect to {address} from the gateway: {why}", "connect_failed")
            return
        handle.outgoing_calls += 1
        conn.answer(pipe, 200)
        try:
            await splice(pipe, reader, writer)
        finally:
            conn.pipes.pop(pipe.stream_id, None)

    # ------------------------------------------------------------------ reports

    async def report_loop(self) -> None:
        """Every ``report_interval_s``: each tunnel's counts to the control plane (renewing its
        lease); a tunnel the control plane no longer knows is closed (the machine reconnects)."""
        while True:
            await asyncio.sleep(self.options.report_interval_s)
            for handle in list(self.tunnels.values()):
                try:
                    await asyncio.to_thread(self.client.report_tunnel, handle.id, handle.stats())
                except ApiError as exc:
                    if exc.status == 404:
                        log.warning("tunnel %s: the control plane no longer holds it (%s); closing it", handle.id,
                                    exc)
                        self._close(handle)
                except Unreachable as exc:
                    log.warning("tunnel %s: report failed: %s", handle.id, exc)

    def close_all(self, reason: str) -> None:
        """Shutdown: close every tunnel (each is detached at the control plane)."""
        for handle in list(self.tunnels.values()):
            handle.watch.close(reason)

    def tunnels_json(self) -> dict[str, Any]:
        """What /tunnels shows."""
        return {"gateway": self.gateway_id, "tunnels": [h.to_dict() for h in self.tunnels.values()]}

    def metrics(self) -> bytes:
        """The gateway's metrics and every tunnel's request metrics (worker label: the tunnel id)."""
        texts = [generate_latest(self.registry)]
        texts.extend(h.router.metrics.exposition() for h in self.tunnels.values())
        return merge_expositions(texts) if len(texts) > 1 else texts[0]


class _TunnelCollector:
    """Per-tunnel gauges and counters, read from the tunnels at scrape time."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["tunnel", "session"]
        connected = GaugeMetricFamily("turnout_gateway_tunnel_connected_since_seconds",
                                      "When each tunnel attached (unix seconds)", labels=labels)
        requests = CounterMetricFamily("turnout_gateway_tunnel_requests", "Requests through each tunnel",
                                       labels=labels)
        errors = CounterMetricFamily("turnout_gateway_tunnel_errors", "Requests through each tunnel answered "
                                     "5xx or not at all", labels=labels)
        received = CounterMetricFamily("turnout_gateway_tunnel_received_bytes", "Bytes received from each "
                                       "tunnel's machine", labels=labels)
        sent = CounterMetricFamily("turnout_gateway_tunnel_response_bytes", "Response body bytes sent back to "
                                   "proxies through each tunnel", labels=labels)
        for handle in self.gateway.tunnels.values():
            values = [handle.id, handle.session_id]
            connected.add_metric(values, handle.connected_at)
            requests.add_metric(values, handle.requests)
            errors.add_metric(values, handle.errors)
            received.add_metric(values, handle.watch.bytes_in)
            sent.add_metric(values, handle.bytes_out)
        return [connected, requests, errors, received, sent]


def outgoing_refusal(rules: Rules, address: Address) -> tuple[str, str] | None:
    """Why an outgoing call to ``address`` is refused (the rule and a message), or None.

    Reachable: what ``allowed_destinations`` allows, or a cluster service name whose service
    (its first label) ``allowed_services`` allows; with neither rule set, anything.
    """
    checks: list[bool] = []
    if rules.allowed_destinations is not None:
        checks.append(rules.allowed_destinations.allows(address))
    if rules.allowed_services is not None:
        try:
            ipaddress.ip_address(address.host)
            checks.append(False)  # an IP names no service
        except ValueError:
            service = address.host.split(".", 1)[0].lower()
            checks.append(any(fnmatch.fnmatchcase(service, p) for p in rules.allowed_services))
    if not checks or any(checks):
        return None
    named = [name for name, value in (("allowed_destinations", rules.allowed_destinations),
                                      ("allowed_services", rules.allowed_services)) if value is not None]
    allowed = []
    if rules.allowed_destinations is not None:
        allowed.append("destinations " + (rules.allowed_destinations.describe() or "none"))
    if rules.allowed_services is not None:
        allowed.append("services " + (", ".join(rules.allowed_services) or "none"))
    return " and ".join(named), (f"{address} is not reachable under {rules.whose()} (it allows "
                                 f"{'; '.join(allowed)})")


def _refuse(transport: asyncio.BaseTransport, status: int, reason: str, error: str, message: str) -> None:
    tr: asyncio.Transport = transport  # type: ignore[assignment]
    if not tr.is_closing():
        tr.write(error_head(status, reason, error, message))
        tr.close()


class UpgradeServer(asyncio.Protocol):
    """One machine's connection to the tunnel port, until its upgrade is answered."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.peer = ""
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unknown"
        self._timer = self.gateway.loop.call_later(HANDSHAKE_TIMEOUT_S, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._done:
            self.buffer += data  # bytes after the head, kept for the tunnel
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end == -1:
            if len(self.buffer) > MAX_HEAD_BYTES:
                self._fail(431, "Request Header Fields Too Large", "head_too_large",
                           f"the upgrade head is larger than {MAX_HEAD_BYTES} bytes")
            return
        head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            line, fields = parse_head(head)
        except ValueError as exc:
            self._fail(400, "Bad Request", "bad_request", str(exc))
            return
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != "POST" or parts[1] not in (TUNNEL_PATH, OUTGOING_PATH):
            self._fail(404, "Not Found", "not_found", f"this is a turnout tunnel gateway: POST {TUNNEL_PATH} with "
                       f"Upgrade: {UPGRADE} (turnout connect does it)")
            return
        if fields.get("upgrade", "").lower() != UPGRADE:
            self._fail(426, "Upgrade Required", "upgrade_required", f"send Upgrade: {UPGRADE}")
            return
        scheme, _, ticket = fields.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not ticket.strip():
            self._fail(401, "Unauthorized", "unauthorized", "send Authorization: Bearer <tunnel ticket> (turnout "
                       "connect asks the control plane for one)")
            return
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        gateway = self.gateway
        if parts[1] == OUTGOING_PATH:
            gateway.spawn(gateway.attach_outgoing(transport, ticket.strip(), self.buffer))
            return
        gateway.spawn(self._attach(ticket.strip()))

    async def _attach(self, ticket: str) -> None:
        transport = self.transport
        assert transport is not None
        await self.gateway.attach(transport, ticket, self.peer, self.buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, status: int, reason: str, error: str, message: str) -> None:
        self._done = True
        self.gateway.attaches.labels("bad_request").inc()
        if self.transport is not None:
            _refuse(self.transport, status, reason, error, message)

    def _timed_out(self) -> None:
        self._timer = None
        if not self._done:
            self._fail(408, "Request Timeout", "timeout", f"no upgrade request within {HANDSHAKE_TIMEOUT_S:g} s")


# ---------------------------------------------------------------------- running it


def _split(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{flag} {text!r}: expected host:port, e.g. 0.0.0.0:18090")
    return host, int(port)


async def _admin(gateway: Gateway, host: str, port: int) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            path = line.split(b" ")[1].decode("latin-1") if line.count(b" ") >= 2 else ""
            if path == "/metrics":
                body, ctype, status = gateway.metrics(), "text/plain; version=0.0.4", "200 OK"
            elif path == "/tunnels":
                body, ctype, status = json.dumps(gateway.tunnels_json()).encode(), "application/json", "200 OK"
            elif path == "/healthz":
                body, ctype, status = b'{"status": "ok"}', "application/json", "200 OK"
            else:
                body, ctype, status = b"paths: /healthz /tunnels /metrics\n", "text/plain", "404 Not Found"
            writer.write(f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, OSError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port)


async def serve_gateway(options: GatewayOptions, out: Any = sys.stdout) -> int:
    """Run the gateway until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    client = ControlPlaneClient(options.control_plane, options.token, options.ca_file)
    gateway = Gateway(options, loop, client)
    host, port = _split(options.listen, "--listen")
    context = None
    if options.tls_cert is not None and options.tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(options.tls_cert, options.tls_key)
    server = await loop.create_server(lambda: UpgradeServer(gateway), host, port, ssl=context)
    bound = server.sockets[0].getsockname()
    admin = None
    admin_text = ""
    if options.admin:
        admin_host, admin_port = _split(options.admin, "--admin")
        admin = await _admin(gateway, admin_host, admin_port)
        admin_bound = admin.sockets[0].getsockname()
        admin_text = f"; admin http://{admin_bound[0]}:{admin_bound[1]}"
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reports = loop.create_task(gateway.report_loop())
    out.write(f"turnout gateway {gateway.gateway_id}: tunnels on {'tls' if context else 'tcp'} "
              f"{bound[0]}:{bound[1]}, data ports on {options.data_host} (advertised as {gateway.advertise_host}); "
              f"control plane {options.control_plane}{admin_text}\n")
    out.flush()
    await stop.wait()
    server.close()
    if admin is not None:
        admin.close()
    gateway.close_all("the gateway is shutting down")
    await asyncio.sleep(0)  # let each tunnel's loss be handled
    pending = [t for t in gateway._tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    reports.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reports
    return 0


def run_gateway(options: GatewayOptions) -> int:
    """``turnout gateway`` to completion; a start-up problem is one line and exit 2."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        return uvloop.run(serve_gateway(options))
    except (OSError, ValueError, ssl.SSLError) as exc:
        sys.stderr.write(f"turnout gateway: {exc}\n")
        return 2
