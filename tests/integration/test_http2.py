"""Plain HTTP/2 through turnout: prior knowledge on the HTTP/1.1 port, curl
``--http2-prior-knowledge``, routing, header handling, malformed heads as stream errors,
flow control with a slow reader, the proxy's own ``grpc-timeout`` and a two-step drain.

The upstream is a small HTTP/2 server on the h2 library (``H2Upstream``) that records
what it receives, so the tests see exactly what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from hyperframe.frame import PingFrame, SettingsFrame, WindowUpdateFrame

from tests.integration.support import (
    ProxyProcess,
    RecordingUpstream,
    free_port,
    inbound,
    parse_responses,
    raw_exchange,
    running_proxy,
    start_proxy,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Seen:
    """One request as the HTTP/2 upstream received it."""

    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, or None."""
        return next((v for n, v in self.headers if n == name), None)


class H2Upstream:
    """An HTTP/2 server (h2, asyncio, in a thread) that records requests and resets.

    Paths: ``/hang`` never answers; ``/big?<n>`` answers n bytes; ``/reset-mid`` resets
    the stream after part of its response; ``/grpc`` answers a
    gRPC-shaped response with trailers; ``/goaway`` is refused the first time with a GOAWAY
    below its stream id (never processed); ``/noack`` never acknowledges request DATA (its
    flow-control window stays shut); ``/freeze`` makes the connection go silent, PINGs
    included; ``/bad-head`` answers a head with a connection-specific field and
    ``/short-body`` a body shorter than its content-length (both malformed, RFC 9113 §8.1.1,
    §8.2.2), ``/huge-length`` a content-length of 4,301 digits (more than Python's int()
    converts); anything else echoes the request as JSON.
    """

    def __init__(self, label: str, max_streams: int | None = None) -> None:
        self.label = label.encode()
        self.max_streams = max_streams
        self.received_bytes = 0  # request body bytes, on every stream
        self.open_streams = 0  # requests whose head arrived and that were not answered or reset
        self.requests: list[Seen] = []
        self.resets: list[int] = []
        self.went_away = False  # /goaway was refused once already
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(5)

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await self._loop.create_server(lambda: _H2ServerProtocol(self), "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def stop(self) -> None:
        """Stop the server and its loop."""
        def shut() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()
        self._loop.call_soon_threadsafe(shut)
        self._thread.join(5)


class _H2ServerProtocol(asyncio.Protocol):
    def __init__(self, owner: H2Upstream) -> None:
        self.owner = owner
        # Outbound heads unchecked: /bad-head sends a malformed one on purpose.
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Seen] = {}
        # Response bodies waiting for window (views: sending a frame never copies the rest).
        self.pending: dict[int, memoryview] = {}
        self.trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.frozen = False  # after /freeze: reads nothing, answers nothing (a hung peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        if self.owner.max_streams is not None:
            self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.owner.max_streams})
        self.conn.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        assert self.transport is not None
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        if self.frozen:
            return
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = Seen(list(event.headers))
                self.owner.open_streams += 1
            elif isinstance(event, h2.events.DataReceived):
                seen = self.streams[event.stream_id]
                seen.body += event.data
                self.owner.received_bytes += len(event.data)
                if seen.header(b":path") != b"/noack":
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.streams[event.stream_id].trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.owner.resets.append(event.stream_id)
                self.owner.open_streams -= 1
                self.pending.pop(event.stream_id, None)
                self.trailers.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(self.pending):
                    self._send(stream_id)
        self._flush()

    def _answer(self, stream_id: int) -> None:
        seen = self.streams.pop(stream_id)
        self.owner.requests.append(seen)
        path = seen.header(b":path") or b"/"
        if path == b"/hang":
            return
        if path == b"/freeze":
            self.frozen = True
            return
        self.owner.open_streams -= 1
        if path == b"/goaway" and not self.owner.went_away:
            # Shut down before processing it: a GOAWAY whose last stream id is below this one.
            self.owner.went_away = True
            self.conn.close_connection(last_stream_id=stream_id - 2)
            return
        if path == b"/reset-mid":
            # Part of a response, then RST_STREAM: a broken response.
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"100000")])
            self.conn.send_data(stream_id, b"r" * 1000)
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        if path == b"/bad-head":
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"connection", b"close")], end_stream=True)
            return
        if path == b"/huge-length":
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"1" * 4301)])
            self.conn.send_data(stream_id, b"ok", end_stream=True)
            return
        if path == b"/short-body":
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"10")])
            self.conn.send_data(stream_id, b"12345", end_stream=True)
            return
        if path.startswith(b"/big?"):
            size = int(path[5:])
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"%d" % size)])
            self.pending[stream_id] = memoryview(b"z" * size)
            self._send(stream_id)
            return
        if path == b"/grpc":
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            self.trailers[stream_id] = [(b"grpc-status", b"0"), (b"x-trailer", self.owner.label)]
            self.pending[stream_id] = memoryview(b"\x00\x00\x00\x00\x02ok")
            self._send(stream_id)
            return
        body = json.dumps({"upstream": self.owner.label.decode(),
                           "headers": [[n.decode(), v.decode("latin-1")] for n, v in seen.headers],
                           "body_bytes": len(seen.body)}).encode()
        self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/json"),
                                           (b"x-upstream", self.owner.label)])
        self.pending[stream_id] = memoryview(body)  # within the proxy's flow-control windows, like any body
        self._send(stream_id)

    def _send(self, stream_id: int) -> None:
        try:
            self._send_window(stream_id)
        except h2.exceptions.StreamClosedError:
            self.pending.pop(stream_id, None)  # the proxy cancelled it
            self.trailers.pop(stream_id, None)

    def _send_window(self, stream_id: int) -> None:
        data = self.pending[stream_id]
        while data:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                break
            self.conn.send_data(stream_id, bytes(data[:window]))
            data = data[window:]
        if data:
            self.pending[stream_id] = data
            return
        del self.pending[stream_id]
        trailers = self.trailers.pop(stream_id, None)
        if trailers is not None:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)


# ---------------------------------------------------------------------- raw client


class H2Client:
    """A blocking HTTP/2 client on a socket, with the h2 library, for raw-frame tests."""

    def __init__(self, port: int, timeout_s: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.events: list[Any] = []
        self.closed = False
        self.send()

    def send(self) -> None:
        """Write what h2 produced."""
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", authority: str = "users", body: bytes | None = None,
                extra: list[tuple[str, str]] | None = None) -> int:
        """Send a request; returns its stream id."""
        stream = self.conn.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path),
                   *(extra or [])]
        self.conn.send_headers(stream, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream, body, end_stream=True)
        self.send()
        return stream

    def pump(self, until: Any, timeout_s: float = 5.0) -> None:
        """Read and handle frames until ``until()`` is true or the connection ends."""
        deadline = time.monotonic() + timeout_s
        while not until() and time.monotonic() < deadline and not self.closed:
            try:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            for event in self.conn.receive_data(data):
                self.events.append(event)
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            with contextlib.suppress(OSError):
                self.send()

    def response(self, stream: int, timeout_s: float = 5.0) -> tuple[dict[bytes, bytes], bytes]:
        """Headers (and trailers) and body of a stream, once it ended."""
        self.pump(lambda: self.ended(stream), timeout_s)
        headers: dict[bytes, bytes] = {}
        body = b""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream:
                continue
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
        assert self.ended(stream), f"stream {stream} did not end: {headers} {self.events[-5:]}"
        return headers, body

    def ended(self, stream: int) -> bool:
        """Whether the stream ended or was reset."""
        return any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == stream
                   for e in self.events)

    def reset_code(self, stream: int) -> int | None:
        """The RST_STREAM error code the proxy sent for a stream, if any."""
        for e in self.events:
            if isinstance(e, h2.events.StreamReset) and e.stream_id == stream:
                return int(e.error_code)
        return None

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        """The GOAWAY received, if any."""
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def close(self) -> None:
        """Close the socket."""
        with contextlib.suppress(OSError):
            self.sock.close()


# ---------------------------------------------------------------------- fixtures


@dataclass
class H2Stack:
    """A proxy in front of an HTTP/2 baseline and sandbox."""

    proxy: ProxyProcess
    baseline: H2Upstream
    sandbox: H2Upstream

    @property
    def port(self) -> int:
        """The listener."""
        return self.proxy.port

    @property
    def url(self) -> str:
        """The listener's base URL."""
        return self.proxy.url


def h2_config(port: int, baseline: str, sandbox: str, **limits: Any) -> dict[str, Any]:
    """One inbound listener for service users (its upstreams speak HTTP/2), a session keyed ``sbx``."""
    return {
        "routing": {"debug_headers": True},
        "listeners": [{**inbound("users-in", port, "users", baseline), "upstream_protocol": "http2"}],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 3.0, **limits},
        "sessions": [{"id": "sbx-1", "key": "sbx", "routes": [{"service": "users", "destination": sandbox}]}],
    }


@contextlib.contextmanager
def h2_stack(tmp: Path, **limits: Any) -> Iterator[H2Stack]:
    """A proxy and two HTTP/2 upstreams, all stopped on exit."""
    baseline = H2Upstream("baseline")
    sandbox = H2Upstream("sandbox")
    try:
        with running_proxy(h2_config(free_port(), baseline.address, sandbox.address, **limits), tmp) as proxy:
            yield H2Stack(proxy, baseline, sandbox)
    finally:
        baseline.stop()
        sandbox.stop()


@pytest.fixture(scope="module")
def hstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Stack]:
    """The module's stack."""
    with h2_stack(tmp_path_factory.mktemp("h2")) as stack:
        yield stack


@pytest.fixture
def client(hstack: H2Stack) -> Iterator[H2Client]:
    """A raw HTTP/2 client connected to the proxy."""
    c = H2Client(hstack.port)
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------- tests


def test_curl_prior_knowledge_routes_by_baggage(hstack: H2Stack) -> None:
    url = f"http://127.0.0.1:{hstack.port}/hello?x=1"
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", "baggage: turnout-session=sbx",
                          "-D", "-", url], capture_output=True, timeout=10, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert b"x-turnout-route: sbx-1" in head
    seen = json.loads(body)
    assert seen["upstream"] == "sandbox"
    names = dict(seen["headers"])
    assert names[":path"] == "/hello?x=1"
    assert names["x-forwarded-for"] == "127.0.0.1"
    assert names["baggage"] == "turnout-session=sbx"
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", url], capture_output=True, timeout=10,
                         check=True).stdout
    assert json.loads(out)["upstream"] == "baseline"


def test_curl_post_body_and_http1_on_the_same_port(hstack: H2Stack) -> None:
    body = b"b" * 300_000
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--data-binary", "@-",
                          f"http://127.0.0.1:{hstack.port}/upload"], input=body, capture_output=True,
                         timeout=10, check=True).stdout
    assert json.loads(out)["body_bytes"] == len(body)
    # HTTP/1.1 on the same listener: the listener says its upstreams speak HTTP/2, so they are
    # spoken to in HTTP/2 whatever the client speaks.
    reply = raw_exchange(hstack.port, b"GET /x HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n")
    response = parse_responses(reply)[0]
    assert response.status == 200 and json.loads(response.body)["upstream"] == "baseline"


def test_sniffer_hands_http1_to_the_http1_path(tmp_path: Path) -> None:
    up = RecordingUpstream("h1")
    try:
        config = {"listeners": [inbound("in", free_port(), "users", up.address)]}
        with running_proxy(config, tmp_path) as proxy:
            # A request line that starts like the preface ("P...") is still HTTP/1.1.
            reply = raw_exchange(proxy.port, b"POST /p HTTP/1.1\r\nHost: users\r\nContent-Length: 2\r\n"
                                             b"Connection: close\r\n\r\nok")
            assert parse_responses(reply)[0].status == 200
            assert up.last().body == b"ok"
    finally:
        up.stop()


def test_response_trailers_and_hop_headers(hstack: H2Stack, client: H2Client) -> None:
    stream = client.request("/grpc", "POST", body=b"\x00\x00\x00\x00\x00",
                            extra=[("content-type", "application/grpc"), ("te", "trailers")])
    headers, body = client.response(stream)
    assert headers[b"grpc-status"] == b"0"
    assert headers[b"x-trailer"] == b"baseline"
    assert body == b"\x00\x00\x00\x00\x02ok"
    seen = hstack.baseline.requests[-1]
    assert seen.header(b"te") == b"trailers"


def test_malformed_upstream_responses_are_stream_errors_and_the_upstream_connection_lives(
        hstack: H2Stack, client: H2Client) -> None:
    warm = client.request("/")
    assert client.response(warm)[0][b":status"] == b"200"
    connections = hstack.baseline.connections
    # A malformed head: nothing was sent to the client yet, so it gets a 502 naming the cause.
    bad = client.request("/bad-head")
    headers, body = client.response(bad)
    assert headers[b":status"] == b"502"
    assert headers[b"x-turnout-error"] == b"upstream_reset"
    assert body == b"upstream reset the stream\n"
    # A body shorter than its content-length: the response had started, so it is reset,
    # never passed on as a complete short response.
    short = client.request("/short-body")
    client.pump(lambda: client.ended(short))
    assert client.reset_code(short) is not None
    assert not any(isinstance(e, h2.events.StreamEnded) and e.stream_id == short for e in client.events)
    # Only those streams were hit: the next request goes over the same upstream connection.
    ok = client.request("/")
    assert client.response(ok)[0][b":status"] == b"200"
    assert hstack.baseline.connections == connections


def test_upstream_content_length_too_long_to_convert_is_a_502_and_the_connection_lives(
        hstack: H2Stack, client: H2Client) -> None:
    # 4,301 digits: int() refuses them with a ValueError, which once escaped the upstream
    # connection ("Fatal error on transport") and took its other streams along.
    warm = client.request("/")
    assert client.response(warm)[0][b":status"] == b"200"
    connections = hstack.baseline.connections
    headers, body = client.response(client.request("/huge-length"))
    assert headers[b":status"] == b"502"
    assert headers[b"x-turnout-error"] == b"upstream_reset"
    assert body == b"upstream reset the stream\n"
    ok = client.request("/")
    assert client.response(ok)[0][b":status"] == b"200"
    assert hstack.baseline.connections == connections
    log = hstack.proxy.log()
    assert "Traceback" not in log and "Fatal error" not in log, log[-2000:]


@pytest.mark.parametrize("bad", [
    [("transfer-encoding", "chunked")],
    [("connection", "keep-alive")],
    [("x-bad", "a\rb")],
    [("x-bad", "a\nb")],
    [("x-bad", "a\x00b")],
    [("Upper", "x")],
    [("te", "gzip")],
    [("host", "other")],
])
def test_malformed_heads_are_stream_errors(hstack: H2Stack, client: H2Client, bad: list[tuple[str, str]]) -> None:
    before = len(hstack.baseline.requests)
    client.conn.config.validate_outbound_headers = False
    client.conn.config.normalize_outbound_headers = False
    stream = client.request("/bad", extra=bad)
    client.pump(lambda: client.ended(stream))
    assert client.reset_code(stream) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.goaway() is None, "a malformed request is a stream error, not a connection error"
    ok = client.request("/fine")
    headers, _ = client.response(ok)
    assert headers[b":status"] == b"200"
    assert len(hstack.baseline.requests) == before + 1  # only the good one was forwarded


def test_content_length_disagreeing_with_data_is_a_stream_error(hstack: H2Stack, client: H2Client) -> None:
    stream = client.request("/cl", "POST", body=b"abc", extra=[("content-length", "10")])
    client.pump(lambda: client.ended(stream))
    assert client.reset_code(stream) == h2.errors.ErrorCodes.PROTOCOL_ERROR
    ok = client.request("/fine")
    assert client.response(ok)[0][b":status"] == b"200"


def test_slow_reader_is_flow_controlled(hstack: H2Stack) -> None:
    # A client that opens a 1 MiB window stream and never reads past the initial window:
    # the proxy must not read the whole response from the upstream.
    c = H2Client(hstack.port)
    try:
        stream = c.conn.get_next_available_stream_id()
        c.conn.send_headers(stream, [(":method", "GET"), (":scheme", "http"), (":authority", "users"),
                                     (":path", "/big?8000000")], end_stream=True)
        c.send()
        got = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                c.sock.settimeout(0.2)
                data = c.sock.recv(1 << 16)
                for event in c.conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        got += len(event.data)  # never acknowledged: the window stays shut
        assert got <= 65535
        # The other connections are fine meanwhile.
        other = H2Client(hstack.port)
        try:
            _headers, body = other.response(other.request("/big?2000000"), timeout_s=10)
            assert len(body) == 2_000_000
        finally:
            other.close()
    finally:
        c.close()


def test_streams_that_are_not_read_never_stall_others_on_the_shared_upstream_connection(tmp_path: Path) -> None:
    # Six clients that never read hold up to a stream window each (256 KiB): more than the
    # upstream connection's whole window (1 MiB), which the proxy must therefore not hold back.
    with h2_stack(tmp_path) as stack:
        slow = [H2Client(stack.port) for _ in range(6)]
        try:
            for c in slow:
                c.request("/big?4194304")
            time.sleep(1.0)
            other = H2Client(stack.port)
            try:
                _headers, body = other.response(other.request("/big?4194304"), timeout_s=10)
                assert len(body) == 4 * 1024 * 1024
            finally:
                other.close()
            assert stack.baseline.connections == 1  # they all shared one upstream connection
        finally:
            for c in slow:
                c.close()


def test_proxy_enforces_grpc_timeout(hstack: H2Stack, client: H2Client) -> None:
    before = len(hstack.baseline.resets)
    started = time.monotonic()
    stream = client.request("/hang", "POST", body=b"\x00\x00\x00\x00\x00",
                            extra=[("content-type", "application/grpc"), ("grpc-timeout", "300m")])
    headers, _ = client.response(stream)
    assert time.monotonic() - started < 3
    assert headers[b":status"] == b"200"
    assert headers[b"grpc-status"] == b"4"
    assert headers[b"content-type"] == b"application/grpc"
    deadline = time.monotonic() + 3
    while len(hstack.baseline.resets) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(hstack.baseline.resets) > before, "the upstream stream was not cancelled"


def test_plain_request_gets_504_when_upstream_hangs(hstack: H2Stack, client: H2Client) -> None:
    stream = client.request("/hang")
    headers, _body = client.response(stream, timeout_s=8)
    assert headers[b":status"] == b"504"
    assert headers[b"x-turnout-error"] == b"upstream_timeout"


def _raw_frames(sock: socket.socket, buf: bytearray) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in ``buf``, consumed from it."""
    del sock
    while len(buf) >= 9:
        length = int.from_bytes(buf[:3], "big")
        if len(buf) < 9 + length:
            return
        kind, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = bytes(buf[9:9 + length])
        del buf[:9 + length]
        yield kind, flags, stream, payload


def test_drain_sends_goaway_twice_and_finishes_streams(tmp_path: Path) -> None:
    # h2 as a client closes itself on the first GOAWAY, so the frames are read raw here.
    baseline = H2Upstream("baseline")
    sandbox = H2Upstream("sandbox")
    proxy = start_proxy(h2_config(free_port(), baseline.address, sandbox.address), tmp_path)
    c = H2Client(proxy.port)
    try:
        stream = c.request("/big?3000000")
        buf = bytearray()
        body = 0
        goaways: list[int] = []
        ended = False
        signalled = False
        unacked = 0  # DATA bytes read but not yet given back as window
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (ended and len(goaways) >= 2):
            try:
                data = c.sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not data:
                break
            buf += data
            for kind, flags, sid, payload in _raw_frames(c.sock, buf):
                if kind == 0x0 and sid == stream:  # DATA: read slowly, one window at a time
                    body += len(payload)
                    unacked += len(payload)
                    ended = ended or bool(flags & 0x1)
                    if not signalled:
                        # Drain while the response is surely in flight: no more window
                        # until the first GOAWAY has arrived.
                        signalled = True
                        proxy.process.send_signal(signal.SIGTERM)
                elif kind == 0x7:  # GOAWAY
                    goaways.append(int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
                elif kind == 0x4 and not flags & 0x1:  # SETTINGS: acknowledge
                    c.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                elif kind == 0x6 and not flags & 0x1:  # PING: answer
                    c.sock.sendall(PingFrame(0, opaque_data=payload, flags=["ACK"]).serialize())
            if unacked and goaways and not ended:
                update = WindowUpdateFrame(0)
                update.window_increment = unacked
                again = WindowUpdateFrame(stream)
                again.window_increment = unacked
                c.sock.sendall(update.serialize() + again.serialize())
                unacked = 0
        assert body == 3_000_000 and ended
        assert goaways[:2] == [2**31 - 1, stream]
        assert proxy.process.wait(15) == 0
    finally:
        c.close()
        with contextlib.suppress(Exception):
            proxy.stop()
        baseline.stop()
        sandbox.stop()


def make_certificate(tmp: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert file, key file)."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=30)
    return str(cert), str(key)


def test_tls_listener_speaks_h2_and_http1_by_alpn(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    baseline = H2Upstream("baseline")
    sandbox = H2Upstream("sandbox")
    try:
        config = h2_config(free_port(), baseline.address, sandbox.address)
        config["listeners"][0]["tls"] = {"cert_file": cert, "key_file": key}
        with running_proxy(config, tmp_path) as proxy:
            url = f"https://127.0.0.1:{proxy.port}/tls"
            out = subprocess.run(["curl", "-sk", "--http2", "-H", "baggage: turnout-session=sbx", "-D", "-", url],
                                 capture_output=True, timeout=10, check=True).stdout
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/2 200"), head
            seen = dict(json.loads(body)["headers"])
            assert seen["x-forwarded-proto"] == "https"
            assert json.loads(body)["upstream"] == "sandbox"
            # ALPN http/1.1 goes to the HTTP/1.1 path (whose upstream pool speaks HTTP/1.1).
            out = subprocess.run(["curl", "-sk", "--http1.1", "-o", "/dev/null", "-w", "%{http_version}", url],
                                 capture_output=True, timeout=10, check=True).stdout
            assert out == b"1.1"
            # Cleartext on a TLS listener is not served.
            assert raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout_s=3)[:5] != b"HTTP/"
    finally:
        baseline.stop()
        sandbox.stop()


def test_tls_listener_config_is_validated(tmp_path: Path) -> None:
    from dataplane.config import parse_config
    from dataplane.rules import ConfigError

    listener = inbound("in", free_port(), "users", "127.0.0.1:1")
    for spec, words in [({"cert_file": "x"}, "cert_file"),
                        ({"cert_file": str(tmp_path / "no.pem"), "key_file": str(tmp_path / "no.pem")}, "cannot load")]:
        with pytest.raises(ConfigError) as info:
            parse_config({"listeners": [{**listener, "tls": spec}]})
        assert "listeners[0].tls" in str(info.value) and words in str(info.value)
    cert, key = make_certificate(tmp_path)
    config = parse_config({"listeners": [{**listener, "tls": {"cert_file": cert, "key_file": key}}]})
    assert config.listeners[0].tls is not None


def test_upstream_streams_multiplex_and_spill_over_at_max_concurrent_streams(tmp_path: Path) -> None:
    baseline = H2Upstream("baseline", max_streams=2)
    sandbox = H2Upstream("sandbox")
    try:
        with running_proxy(h2_config(free_port(), baseline.address, sandbox.address), tmp_path) as proxy:
            c = H2Client(proxy.port)
            try:
                for _ in range(4):
                    assert c.response(c.request("/ok"))[0][b":status"] == b"200"
                assert baseline.connections == 1  # one connection, reused
                hangs = [c.request("/hang") for _ in range(6)]
                deadline = time.monotonic() + 5
                while baseline.open_streams < 6 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert baseline.open_streams == 6
                assert baseline.connections == 3  # two streams each: the peer's SETTINGS are obeyed
                for s in hangs:
                    c.conn.reset_stream(s, h2.errors.ErrorCodes.CANCEL)
                c.send()
                deadline = time.monotonic() + 5
                while baseline.open_streams and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert baseline.open_streams == 0  # the client's resets reached the upstream
            finally:
                c.close()
    finally:
        baseline.stop()
        sandbox.stop()


def test_slow_upstream_reader_bounds_the_request_body_in_flight(hstack: H2Stack, client: H2Client) -> None:
    # The upstream never acknowledges: the proxy may hold one window per side, no more.
    before = hstack.baseline.received_bytes
    stream = client.conn.get_next_available_stream_id()
    client.conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                                      (":path", "/noack")])
    client.send()
    client.pump(lambda: False, timeout_s=0.3)  # the proxy's SETTINGS: its window
    sent = 0
    deadline = time.monotonic() + 1.5  # within upstream_response_timeout_s
    while time.monotonic() < deadline and sent < 8_000_000:
        window = min(client.conn.local_flow_control_window(stream), client.conn.max_outbound_frame_size)
        if window <= 0:
            client.pump(lambda: False, timeout_s=0.1)
            continue
        client.conn.send_data(stream, b"u" * window)
        client.send()
        sent += window
    time.sleep(0.3)
    upstream_got = hstack.baseline.received_bytes - before
    assert upstream_got <= 256 * 1024  # the upstream's window, as it never acknowledged
    assert sent <= upstream_got + 2 * 256 * 1024  # plus at most one stream window held in the proxy
    assert sent < 8_000_000
    client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    client.send()


def test_streams_above_an_upstream_goaway_are_retried(hstack: H2Stack, client: H2Client) -> None:
    assert client.response(client.request("/warm"))[0][b":status"] == b"200"  # a pooled connection
    connections = hstack.baseline.connections
    headers, body = client.response(client.request("/goaway"))
    assert headers[b":status"] == b"200"
    assert json.loads(body)["upstream"] == "baseline"
    assert hstack.baseline.connections == connections + 1  # retried on a fresh connection
    assert sum(1 for r in hstack.baseline.requests if r.header(b":path") == b"/goaway") == 2


def test_a_silent_upstream_fails_its_streams_after_an_unanswered_ping(tmp_path: Path) -> None:
    # gRPC: no route timeout, only idle timeouts; liveness PINGs find the hung upstream.
    with h2_stack(tmp_path, h2_upstream_ping_interval_s=0.5, h2_upstream_ping_timeout_s=0.5) as stack:
        c = H2Client(stack.port)
        try:
            started = time.monotonic()
            stream = c.request("/freeze", "POST", body=b"\x00\x00\x00\x00\x00",
                               extra=[("content-type", "application/grpc")])
            headers, _ = c.response(stream, timeout_s=8)
            assert headers[b"grpc-status"] == b"14"
            assert time.monotonic() - started < 6
            assert c.response(c.request("/ok"))[0][b":status"] == b"200"  # a new connection serves
        finally:
            c.close()


def test_outbound_listener_routes_by_authority(tmp_path: Path) -> None:
    baseline = H2Upstream("baseline")
    sandbox = H2Upstream("sandbox")
    try:
        port = free_port()
        config = {
            "listeners": [{"name": "egress", "address": f"127.0.0.1:{port}", "mode": "outbound",
                           "authorities": {baseline.address: "users"}, "upstream_protocol": "http2"}],
            "sessions": [{"id": "sbx-1", "key": "sbx", "routes": [{"service": "users",
                                                                   "destination": sandbox.address}]}],
        }
        with running_proxy(config, tmp_path):
            def fetch(*extra: str) -> Any:
                out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", f"Host: {baseline.address}",
                                      *extra, f"http://127.0.0.1:{port}/out"], capture_output=True, timeout=10,
                                     check=True).stdout
                return json.loads(out)
            assert fetch()["upstream"] == "baseline"  # the authority is the baseline
            seen = fetch("-H", "baggage: turnout-session=sbx")
            assert seen["upstream"] == "sandbox"  # mapped to service users: the session's route
            assert dict(seen["headers"])[":authority"] == baseline.address
    finally:
        baseline.stop()
        sandbox.stop()
