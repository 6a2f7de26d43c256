"""Shared fakes for the sans-socket data-plane tests (``test_http1_*.py``, ``test_http2_*.py``).

* ``VirtualLoop``: an asyncio event loop whose clock only moves when a test says so
  (``advance``) and whose ``create_connection`` never touches the network: it builds the
  protocol, gives it a ``FakeTransport`` and records it in ``dialed`` (or refuses the
  addresses in ``refused``). Tests that need no task or timer never run it; the others run
  it with ``settle`` (ready callbacks only: it never blocks) or ``advance``.
* ``FakeTransport``: records what a protocol writes and how it treats the connection
  (pause/resume reading, half-close, close, abort), strict where real transports are
  (no write after ``write_eof``).
* ``make_proxy``: a real ``Proxy`` from ``parse_config`` with one inbound listener for service
  ``users`` (baseline ``BASELINE``) and one session ``s1`` (key ``k1``) routed to ``SANDBOX``.
* ``client_h1`` / ``pooled_h1``: an ``H1Server`` on a fake client connection, an
  ``H1Client`` on a fake upstream connection put in the proxy's pool (as
  ``bench/http1/harness.py`` does).
* ``H2Peer``: the ``h2`` library on the other side of a fake transport, with ``pump`` moving
  bytes both ways until both are quiet; ``client_h2`` and ``upstream_h2`` put one on a client
  connection or on a connection the proxy dialed; ``frames`` parses raw output with ``hyperframe``.
* ``Recorder``: an ``UpstreamListener`` that records what an upstream stream reports;
  ``upstream_errors`` reads the proxy's upstream-error counter.

The ``loop`` fixture (``conftest.py``) gives every test a fresh ``VirtualLoop``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import h2.config
import h2.connection
import h2.events
from hyperframe.frame import Frame

from dataplane.config import parse_config
from dataplane.http1.client import H1Client
from dataplane.http1.server import H1Server
from dataplane.http2.server import H2Connection
from dataplane.message import Fields, Response
from dataplane.proxy import Proxy
from dataplane.upstream import UpstreamError, UpstreamListener
from filters import Address

BASELINE = Address("127.0.0.1", 18080)
SANDBOX = Address("127.0.0.1", 18081)
CLIENT_IP = "10.1.2.3"
ROUTED = b"baggage: turnout-session=k1\r\n"  # sends a request to SANDBOX

T = TypeVar("T")


class FakeTransport:
    """Enough of an ``asyncio.Transport`` for the proxy's protocols; records everything."""

    def __init__(self, peer: tuple[str, int], loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.peer = peer
        self.loop = loop
        self.protocol: Any = None
        self.written: list[bytes] = []  # every write, in order (writelines joined)
        self.closing = False  # close() or abort() was called
        self.aborted = False
        self.eof_written = False
        self.reading = True
        self.pauses = 0  # pause_reading calls
        self.resumes = 0  # resume_reading calls
        self.limits: tuple[int | None, int | None] = (None, None)
        self._read = 0
        self.lost = False

    # what the tests read

    @property
    def data(self) -> bytes:
        """Everything written so far."""
        return b"".join(self.written)

    def take(self) -> bytes:
        """What was written since the last ``take``."""
        data = b"".join(self.written[self._read:])
        self._read = len(self.written)
        return data

    # asyncio.Transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")  # as asyncio's transports do
        if self.closing:
            return  # dropped, as by a closed socket transport
        self.written.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self._closed()

    def abort(self) -> None:
        self.aborted = True
        self._closed()

    def _closed(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.loop is not None and self.protocol is not None:
            self.loop.call_soon(self.lose)

    def lose(self, exc: Exception | None = None) -> None:
        """The connection is gone: ``connection_lost`` once, as the loop would call it."""
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.closing = True
            self.protocol.connection_lost(exc)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True
        self.resumes += 1

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_write_buffer_size(self) -> int:
        return 0

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


@dataclass
class Dialed:
    """A connection the proxy opened through ``VirtualLoop.create_connection``."""

    host: str
    port: int
    transport: FakeTransport
    protocol: Any


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock, whose outbound connections are fake."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.dialed: list[Dialed] = []
        self.refused: set[tuple[str, int]] = set()

    def time(self) -> float:
        return self.now

    def settle(self, rounds: int = 20) -> None:
        """Run what is ready (callbacks, tasks, due timers) without waiting for anything."""

        async def spin() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)

        self.run_until_complete(spin())

    def advance(self, seconds: float) -> None:
        """Move the clock on, then run the timers that became due."""
        self.now += seconds
        self.settle()

    def inside(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` inside the running loop (for code that asks for the running loop)."""

        async def call() -> T:
            return fn()

        result = self.run_until_complete(call())
        self.settle()
        return result

    async def create_connection(  # type: ignore[override]
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], host: str | None = None,
            port: int | None = None, **kwargs: Any) -> tuple[FakeTransport, asyncio.BaseProtocol]:
        assert host is not None and port is not None
        if (host, port) in self.refused:
            raise ConnectionRefusedError(111, "Connection refused")
        protocol = protocol_factory()
        transport = FakeTransport((host, port), self)
        transport.protocol = protocol
        self.dialed.append(Dialed(host, port, transport, protocol))
        cast(asyncio.Protocol, protocol).connection_made(cast(asyncio.Transport, transport))
        return transport, protocol


def config(limits: dict[str, Any] | None = None, listener: dict[str, Any] | None = None,
           route: dict[str, Any] | None = None, debug_headers: bool = False) -> dict[str, Any]:
    """The mapping ``parse_config`` takes: one inbound listener, one session."""
    return {
        "routing": {"debug_headers": debug_headers},
        "listeners": [{"name": "users-in", "address": "127.0.0.1:15001", "mode": "inbound", "service": "users",
                       "baseline": str(BASELINE), **(listener or {})}],
        "sessions": [{"id": "s1", "key": "k1",
                      "routes": [{"service": "users", "destination": str(SANDBOX), **(route or {})}]}],
        "limits": limits or {},
    }


def make_proxy(loop: VirtualLoop, codec: str = "httptools", limits: dict[str, Any] | None = None,
               listener: dict[str, Any] | None = None, route: dict[str, Any] | None = None,
               debug_headers: bool = False) -> Proxy:
    """A real proxy (router, upstreams, runtime) on ``loop``, serving nothing by itself."""
    return Proxy(parse_config(config(limits, listener, route, debug_headers)), codec, loop, "0")


def client_h1(proxy: Proxy, peer: tuple[str, int] = (CLIENT_IP, 40000)) -> tuple[H1Server, FakeTransport]:
    """A client connection accepted by the proxy's (only) listener."""
    server = H1Server(proxy.router, proxy.connections, proxy.runtime.config.listeners[0])
    transport = FakeTransport(peer, proxy.loop)
    transport.protocol = server
    server.connection_made(cast(asyncio.Transport, transport))
    return server, transport


def pooled_h1(proxy: Proxy, address: Address = BASELINE) -> tuple[H1Client, FakeTransport]:
    """An idle upstream connection to ``address`` in the proxy's pool (as if it carried a request before)."""
    upstreams = proxy.upstreams
    runtime = proxy.runtime
    conn = H1Client(upstreams, address, runtime.limits, runtime.codec)
    transport = FakeTransport((address.host, address.port), proxy.loop)
    transport.protocol = conn
    conn.connection_made(cast(asyncio.Transport, transport))
    upstreams.h1.add(conn)
    upstreams.release(conn)
    return conn, transport


def upstream_errors(proxy: Proxy, cause: str, route: str = "baseline") -> float:
    """How many upstream failures of ``cause`` the proxy counted for service ``users``."""
    value = proxy.metrics.registry.get_sample_value(
        "turnout_upstream_errors_total", {"worker": "0", "service": "users", "route": route, "cause": cause})
    return value or 0.0


class Recorder(UpstreamListener):
    """An ``UpstreamListener`` that records what an upstream stream reports."""

    def __init__(self) -> None:
        self.heads: list[Response] = []
        self.data: list[bytes] = []
        self.ends: list[Fields] = []
        self.errors: list[UpstreamError] = []
        self.informational: list[int] = []
        self.taken = 0

    def on_request_taken(self, flow_len: int) -> None:
        self.taken += flow_len

    def on_informational(self, status: int) -> None:
        self.informational.append(status)

    def on_response_head(self, head: Response) -> None:
        self.heads.append(head)

    def on_response_data(self, data: bytes, flow_len: int) -> None:
        self.data.append(data)

    def on_response_end(self, trailers: Fields) -> None:
        self.ends.append(trailers)

    def on_upstream_error(self, error: UpstreamError) -> None:
        self.errors.append(error)


# ---------------------------------------------------------------------- HTTP/2


def frames(data: bytes) -> list[Frame]:
    """The frames in ``data`` (after the client preface, if it starts with it)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    if data.startswith(preface):
        data = data[len(preface):]
    out: list[Frame] = []
    pos = 0
    while pos < len(data):
        parsed, length = Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        parsed.parse_body(memoryview(data[pos + 9:pos + 9 + length]))
        out.append(parsed)
        pos += 9 + length
    assert pos == len(data), "a partial frame"
    return out


class H2Peer:
    """The ``h2`` library as the peer of one of the proxy's HTTP/2 protocols, over a fake transport.

    ``pump`` carries bytes both ways until neither side has more, running the loop in
    between (the proxy writes what it produced at the end of a loop iteration); the
    peer's events are kept in ``events``.
    """

    def __init__(self, loop: VirtualLoop, protocol: Any, transport: FakeTransport, client_side: bool,
                 validate: bool = True) -> None:
        self.loop = loop
        self.protocol = protocol
        self.transport = transport
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_outbound_headers=validate,
            normalize_outbound_headers=validate, validate_inbound_headers=True))
        self.events: list[h2.events.Event] = []
        self.raw = b""  # every byte the proxy sent this peer

    def start(self) -> None:
        """The peer's preface and SETTINGS."""
        self.h2.initiate_connection()

    def pump(self) -> list[h2.events.Event]:
        """Exchange bytes until both sides are quiet; returns the peer's new events."""
        new: list[h2.events.Event] = []
        for _ in range(50):
            moved = False
            out = self.h2.data_to_send()
            if out and not self.transport.lost:
                moved = True
                self.protocol.data_received(out)
            self.loop.settle()
            data = self.transport.take()
            if data:
                moved = True
                self.raw += data
                new.extend(self.h2.receive_data(data))
            if not moved:
                break
        self.events.extend(new)
        return new

    def of(self, kind: type[T], stream_id: int | None = None) -> list[T]:
        """The peer's events of one kind (on one stream)."""
        return [e for e in self.events if isinstance(e, kind)
                and (stream_id is None or getattr(e, "stream_id", None) == stream_id)]


def client_h2(proxy: Proxy, validate: bool = True, start: bool = True) -> tuple[H2Connection, FakeTransport, H2Peer]:
    """A client connection speaking HTTP/2 to the proxy's listener, the ``h2`` library as the
    client; with ``start`` the prefaces and SETTINGS are exchanged (and acknowledged)."""
    conn = H2Connection(proxy.router, proxy.connections, proxy.runtime.config.listeners[0])
    transport = FakeTransport((CLIENT_IP, 40001), proxy.loop)
    transport.protocol = conn
    loop = cast(VirtualLoop, proxy.loop)
    loop.inside(lambda: conn.connection_made(cast(asyncio.Transport, transport)))
    peer = H2Peer(loop, conn, transport, client_side=True, validate=validate)
    peer.start()
    if start:
        peer.pump()
    return conn, transport, peer


def upstream_h2(loop: VirtualLoop, index: int = -1) -> H2Peer:
    """The ``h2`` library as the HTTP/2 server of a connection the proxy dialed; its SETTINGS
    are sent and the proxy's preface read."""
    dialed = loop.dialed[index]
    peer = H2Peer(loop, dialed.protocol, dialed.transport, client_side=False)
    peer.start()
    peer.pump()
    return peer
