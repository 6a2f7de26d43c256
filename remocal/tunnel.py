"""What both ends of a tunnel share: the upgrade, keepalive, and a one-target request path.

The carrier (docs/remocal.md): the machine (``turnout connect``) dials the gateway and sends
an HTTP/1.1 upgrade request::

    POST /v1/tunnel HTTP/1.1
    Host: <gateway>
    Authorization: Bearer <one-use ticket from the control plane>
    Upgrade: turnout-tunnel
    Connection: Upgrade

The gateway answers ``101 Switching Protocols`` (or an error status with a JSON body naming
the problem); from then on the connection speaks HTTP/2, the gateway as the client and the
machine as the server, both on turnout's own engine: every routed request is one stream,
so HTTP/1.1, HTTP/2 and gRPC requests, streaming bodies and trailers cross it unchanged.
Both ends PING every ``ping_interval_s`` and give the link up after ``dead_after_s`` with
no frame from the peer (``LinkWatch``), so a cut link is noticed well within a second.

Each end serves its requests with the data plane's own router (``one_target_router``): the
gateway's routes every request from a proxy into the tunnel, the machine's routes every
request out of the tunnel to the local process.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from dataplane.config import Limits, Listener, ProxyConfig, Tracing
from dataplane.http1.codec import make_codec
from dataplane.metrics import Metrics
from dataplane.router import Router
from dataplane.runtime import Runtime
from dataplane.tracing import RequestTracer
from dataplane.upstreams import Upstreams
from filters import Address, compile_snapshot

if TYPE_CHECKING:
    from dataplane.http2.engine import H2Engine
    from dataplane.tracing import FinishedRequest

UPGRADE: Final = "turnout-tunnel"
TUNNEL_PATH: Final = "/v1/tunnel"
# The second connection, for the local program's calls into the cluster (remocal/pipes.py).
OUTGOING_PATH: Final = "/v1/outgoing"
# An upgrade head larger than this is refused: it carries a ticket and a few fields.
MAX_HEAD_BYTES: Final = 16 * 1024
# Keepalive: a PING every 200 ms each way; 600 ms without any frame from the peer is a dead
# link (three PINGs unanswered), so a cut is noticed well within a second.
DEFAULT_PING_INTERVAL_S: Final = 0.2
DEFAULT_DEAD_AFTER_S: Final = 0.6
# How long the upgrade (request, answer, the peer's HTTP/2 SETTINGS) may take.
HANDSHAKE_TIMEOUT_S: Final = 10.0
# Streams one tunnel carries at once (both ends advertise it).
DEFAULT_MAX_STREAMS: Final = 1000
_PING_DATA: Final = b"tunnel.."


class LinkProtocol(Protocol):
    """What ``LinkWatch`` needs of the HTTP/2 connection it watches (``H2Client`` or ``H2Connection``)."""

    h2: H2Engine

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...
    def flush(self) -> None: ...


class LinkWatch(asyncio.Protocol):
    """An HTTP/2 connection on the tunnel's transport, with keepalive PINGs and a dead-peer timeout.

    It sits between the transport and the connection (composition: the connection classes are
    compiled), counts what arrives, and reports the end once through ``lost`` (a future holding
    the reason).
    """

    def __init__(self, inner: LinkProtocol, loop: asyncio.AbstractEventLoop,
                 ping_interval_s: float = DEFAULT_PING_INTERVAL_S,
                 dead_after_s: float = DEFAULT_DEAD_AFTER_S) -> None:
        self.inner = inner
        self.loop = loop
        self.ping_interval_s = ping_interval_s
        self.dead_after_s = dead_after_s
        self.transport: asyncio.Transport | None = None
        self.last_rx = loop.time()
        self.bytes_in = 0
        self.lost: asyncio.Future[str] = loop.create_future()
        self._reason = ""
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0  # when the next tick should run

    def start(self, transport: asyncio.BaseTransport, already: bytes = b"") -> None:
        """Take the transport over (after the upgrade), hand ``already`` read bytes on, start pinging."""
        tr: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.transport = tr
        tr.set_protocol(self)
        self.inner.connection_made(tr)
        self.last_rx = self.loop.time()
        if already:
            self.data_received(already)
        if tr.is_reading() is False:  # paused during the upgrade
            tr.resume_reading()
        self._arm()

    def close(self, reason: str) -> None:
        """Give the link up now (the reason is what ``lost`` reports)."""
        if not self._reason:
            self._reason = reason
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ asyncio callbacks

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        self.bytes_in += len(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self._reason:
            self._reason = "the peer closed the tunnel"
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.inner.connection_lost(exc)
        if not self.lost.done():
            reason = self._reason or (f"the connection broke: {exc}" if exc else "the connection closed")
            self.lost.set_result(reason)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ------------------------------------------------------------------ keepalive

    def _arm(self) -> None:
        self._due = self.loop.time() + self.ping_interval_s
        self._timer = self.loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = self.loop.time()
        silent_s = now - self.last_rx
        # A tick that runs late means this process was not running (a loaded machine, a pause):
        # what the peer sent meanwhile may be waiting unread, so silence proves nothing yet.
        stalled = now - self._due > self.ping_interval_s
        if silent_s > self.dead_after_s and not stalled:
            self.close(f"no frame from the peer for {silent_s * 1000:.0f} ms (dead after "
                       f"{self.dead_after_s * 1000:.0f} ms)")
            return
        self.inner.h2.ping(_PING_DATA)
        self.inner.flush()
        self._arm()


# ---------------------------------------------------------------------- the request path at each end


class RequestEvents(RequestTracer):
    """The router's finished-request hook, used for counts and events instead of spans.

    ``Router.finished`` hands every finished exchange to the runtime's tracer; this one makes
    no span (no OpenTelemetry provider is built) and calls ``on_finished(exchange)``.
    """

    def __init__(self, on_finished: Callable[[FinishedRequest], None]) -> None:  # no super().__init__: no spans
        self.config = Tracing(exporter="memory")
        self._on_finished = on_finished

    def finished(self, exchange: FinishedRequest, ended_at: float) -> None:
        """One request finished."""
        self._on_finished(exchange)

    def shutdown(self) -> None:
        """Nothing to flush."""


def tunnel_limits(**overrides: Any) -> Limits:
    """Limits for both ends' routers: a tunnel is one long-lived connection that must never be
    closed as idle, and carries many streams."""
    values: dict[str, Any] = {"keepalive_idle_timeout_s": 365 * 86400.0, "header_read_timeout_s": 365 * 86400.0,
                              "h2_max_concurrent_streams": DEFAULT_MAX_STREAMS,
                              "upstream_connect_timeout_s": 2.0}
    values.update(overrides)
    return Limits(**values)


def one_target_router(loop: asyncio.AbstractEventLoop, limits: Limits, instance: str,
                      on_finished: Callable[[FinishedRequest], None] | None = None) -> Router:
    """A data-plane router with no sessions: every request goes to its listener's baseline
    (the tunnel, or the local process), with the proxy's forwarding, streaming, flow control,
    timeouts and error replies."""
    snapshot = compile_snapshot([], "0")
    config = ProxyConfig(admin=None, listeners=(), limits=limits, snapshot=snapshot)
    tracer = RequestEvents(on_finished) if on_finished is not None else None
    runtime = Runtime(config, snapshot, make_codec("auto", limits.max_head_bytes), tracer, None)
    upstreams = Upstreams(loop, limits, runtime.codec)
    return Router(runtime, upstreams, Metrics(instance), loop)


def target_listener(name: str, service: str, baseline: Address, upstream_protocol: str) -> Listener:
    """An inbound listener whose every request goes to ``baseline``."""
    return Listener(name, Address("127.0.0.1", 0), "inbound", service=service, baseline=baseline,
                    upstream_protocol=upstream_protocol)


# ---------------------------------------------------------------------- the upgrade's heads


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the fields (lower-case names; repeated ones joined) of an HTTP/1.1 head;
    raises ``ValueError``."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # latin-1 decodes everything; kept for clarity
        raise ValueError(str(exc)) from None
    lines = text.split("\r\n")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        key = name.lower()
        fields[key] = fields[key] + ", " + value.strip() if key in fields else value.strip()
    return lines[0], fields


def error_head(status: int, reason: str, error: str, message: str) -> bytes:
    """An HTTP/1.1 error reply with a JSON body ``{"error", "message"}``, then close."""
    body = json.dumps({"error": error, "message": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\nserver: turnout-gateway\r\n\r\n").encode() + body


class Backoff:
    """Reconnect delays: jittered, doubling from ``base_s`` up to ``max_s``; ``reset`` after a
    link that lived long enough."""

    def __init__(self, base_s: float = 0.2, max_s: float = 5.0, rng: Callable[[], float] = random.random) -> None:
        self.base_s = base_s
        self.max_s = max_s
        self._rng = rng
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt."""
        cap = min(self.max_s, self.base_s * float(2 ** min(self._attempt, 16)))
        self._attempt += 1
        return cap * (0.5 + 0.5 * self._rng())  # "equal jitter": at least half the cap, never a hot loop

    def reset(self) -> None:
        """The link was up: start from ``base_s`` again."""
        self._attempt = 0
