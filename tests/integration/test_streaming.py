"""Bodies and connections that stream through the real proxy: 1 GiB each way with flat
memory, a slow reader, ``Expect: 100-continue``, WebSocket tunnels routed like any request,
HTTP/1.0 clients, chunked bodies with trailers.

Upstreams here are raw sockets that count bytes and never keep them (the recording
upstream of ``support`` stores bodies). Most tests reach a fresh upstream through the
proxy's *outbound* listener (the upstream is the request's Host), so no pooled connection
is shared between tests; the WebSocket tests use an inbound listener with a session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.support import ProxyProcess, free_port, inbound, running_proxy
from tests.integration.test_upstream import (
    Client,
    Peer,
    RawUpstream,
    Serve,
    free_ports,
    header_map,
    ok_response,
    raw_upstream,
    serve_forever,
    wait_for,
)

GIB = 1 << 30
MIB = 1 << 20
BLOCK = bytes(MIB)
# The proxy worker starts at ~35 MB RSS; streaming must not add more than a few buffers.
MAX_RSS_BYTES = 80 * MIB
MAX_RSS_GROWTH_BYTES = 20 * MIB
TRANSFER_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- memory


def worker_pid(proxy: ProxyProcess) -> int:
    """The single worker's pid, from the admin ``/config_dump``."""
    status, body = proxy.admin_get("/config_dump")
    assert status == 200, body
    workers = json.loads(body)["workers"]
    assert len(workers) == 1 and workers[0]["pid"], workers
    return int(workers[0]["pid"])


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; ``at`` holds the RSS read
    when the transfer crossed a named point."""

    pid: int
    interval_s: float = 0.005
    max_bytes: int = 0
    samples: int = 0
    at: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.at["start"] = self.mark("start")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.mark("end")

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.max_bytes = max(self.max_bytes, rss_bytes(self.pid))
                self.samples += 1
            self._stop.wait(self.interval_s)

    def mark(self, name: str) -> int:
        """Read the RSS now and remember it under ``name``."""
        value = rss_bytes(self.pid)
        self.at[name] = value
        self.max_bytes = max(self.max_bytes, value)
        return value

    def report(self) -> str:
        mib = {k: round(v / MIB, 1) for k, v in self.at.items()}
        return f"RSS MiB {mib}, max {self.max_bytes / MIB:.1f} over {self.samples} samples"

    def check_flat(self, first: str, last: str) -> None:
        """Bounded overall, and no growth between two points of the transfer."""
        print(self.report())
        assert self.max_bytes < MAX_RSS_BYTES, self.report()
        assert self.at[last] - self.at[first] < MAX_RSS_GROWTH_BYTES, self.report()
        assert self.max_bytes - self.at["start"] < MAX_RSS_GROWTH_BYTES, self.report()


# --------------------------------------------------------------------------- the rig


def websocket_echo(label: str, closed: list[int]) -> Serve:
    """Answer an ``Upgrade: websocket`` GET with 101, greet, then echo bytes until EOF
    (``closed`` gets the connection index when the proxy closes its side)."""

    def serve(peer: Peer) -> None:
        head = peer.read_head()
        if head is None:
            return
        fields = header_map(head)
        if fields.get("upgrade", "").lower() != "websocket":
            peer.send(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 0\r\n\r\n")
            return
        greeting = b"hello from " + label.encode()
        # The greeting rides in the same packet as the 101 head.
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                  b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nx-upstream: " + label.encode()
                  + b"\r\n\r\n" + greeting)
        if peer.buf:
            peer.send(peer.buf)
            peer.buf = b""
        while True:
            data = peer.sock.recv(1 << 16)
            if not data:
                closed.append(peer.index)
                return
            if data == b"server-close":
                peer.send(b"bye")
                return
            peer.send(data)

    return serve


@dataclass
class Rig:
    """One proxy per codec: an outbound listener and a ``chat`` inbound listener whose
    session ``ws-1`` (key ``wskey``) steals to a sandbox."""

    proxy: ProxyProcess
    codec: str
    chat_baseline: RawUpstream
    chat_sandbox: RawUpstream
    closed: dict[str, list[int]]

    @property
    def out(self) -> int:
        return self.proxy.ports["out"]

    @property
    def chat(self) -> int:
        return self.proxy.ports["chat-in"]


@pytest.fixture(scope="module", params=["httptools", "h11"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    closed: dict[str, list[int]] = {"baseline": [], "sandbox": []}
    base = RawUpstream(websocket_echo("baseline", closed["baseline"]), "baseline")
    sandbox = RawUpstream(websocket_echo("sandbox", closed["sandbox"]), "sandbox")
    out, chat = free_ports(2)
    config = {
        "routing": {"debug_headers": True},
        "listeners": [
            {"name": "out", "address": f"127.0.0.1:{out}", "mode": "outbound"},
            inbound("chat-in", chat, "chat", base.address),
        ],
        # Shutdown waits for open tunnels; keep teardown short whatever a test left open.
        "limits": {"drain_timeout_s": 2.0},
        "sessions": [{"id": "ws-1", "key": "wskey", "routes": [{"service": "chat", "destination": sandbox.address}]}],
    }
    tmp: Path = tmp_path_factory.mktemp("streaming")
    try:
        with running_proxy(config, tmp, codec=str(request.param)) as proxy:
            yield Rig(proxy, str(request.param), base, sandbox, closed)
    finally:
        base.stop()
        sandbox.stop()


# --------------------------------------------------------------------------- 1 GiB each way
#
# Body framing (Content-Length, chunked) is turnout's own code shared by both codecs; the
# codec only parses heads. The GiB transfers take about a second each on loopback, so they
# still run for both codecs.


def counting_sink(peer: Peer) -> None:
    """Consume each request body without keeping it; answer with the byte count."""
    while (head := peer.read_head()) is not None:
        before = peer.server.body_bytes
        peer.read_body(head)
        count = b"%d" % (peer.server.body_bytes - before)
        peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(count), count))


def source(size: int) -> Serve:
    """Answer every request with ``size`` zero bytes (Content-Length), counting what was sent."""

    def serve(peer: Peer) -> None:
        while peer.read_head() is not None:
            peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            view = memoryview(BLOCK)
            left = size
            while left:
                n = min(left, len(view))
                peer.sock.sendall(view[:n])
                peer.server.sent_bytes += n
                left -= n

    return serve


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_gib_upload_streams_with_flat_memory(rig: Rig, framing: str) -> None:
    chunked = framing == "chunked"
    with raw_upstream(counting_sink) as up, Client(rig.out, TRANSFER_TIMEOUT_S) as client, \
            RssSampler(worker_pid(rig.proxy)) as rss:
        frame = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % GIB
        client.send(b"POST /upload HTTP/1.1\r\nhost: %s\r\n%s\r\n\r\n" % (up.address.encode(), frame))
        started = time.monotonic()
        for i in range(GIB // MIB):
            if i == 100:
                rss.mark("100MiB")
            elif i == 900:
                rss.mark("900MiB")
            if chunked:
                client.sock.sendall(b"100000\r\n")
                client.sock.sendall(BLOCK)
                client.sock.sendall(b"\r\n")
            else:
                client.sock.sendall(BLOCK)
        if chunked:
            client.send(b"0\r\n\r\n")
        reply = client.response()
        elapsed = time.monotonic() - started
    print(f"upload {framing}: {elapsed:.1f} s")
    assert (reply.status, reply.body) == (200, b"%d" % GIB)
    assert up.body_bytes == GIB
    rss.check_flat("100MiB", "900MiB")


def test_gib_download_streams_with_flat_memory(rig: Rig) -> None:
    with raw_upstream(source(GIB)) as up, Client(rig.out, TRANSFER_TIMEOUT_S) as client, \
            RssSampler(worker_pid(rig.proxy)) as rss:
        client.send(b"GET /download HTTP/1.1\r\nhost: %s\r\n\r\n" % up.address.encode())
        started = time.monotonic()
        while b"\r\n\r\n" not in client.buf:
            assert client.fill()
        end = client.buf.index(b"\r\n\r\n") + 4
        head, got = client.buf[:end], len(client.buf) - end
        client.buf = b""
        assert head.startswith(b"HTTP/1.1 200 ")
        assert header_map(head)["content-length"] == str(GIB)
        buf = bytearray(MIB)
        marks = [(100 * MIB, "100MiB"), (900 * MIB, "900MiB")]
        while got < GIB:
            n = client.sock.recv_into(buf)
            assert n, f"closed after {got} bytes"
            got += n
            if marks and got >= marks[0][0]:
                rss.mark(marks.pop(0)[1])
        elapsed = time.monotonic() - started
    print(f"download: {elapsed:.1f} s")
    assert got == GIB
    rss.check_flat("100MiB", "900MiB")


def test_slow_reader_pauses_the_upstream(rig: Rig) -> None:
    size = 200 * MIB
    with raw_upstream(source(size)) as up, Client(rig.out, TRANSFER_TIMEOUT_S) as client, \
            RssSampler(worker_pid(rig.proxy)) as rss:
        client.send(b"GET /slow HTTP/1.1\r\nhost: %s\r\n\r\n" % up.address.encode())
        time.sleep(2.0)  # read nothing at all
        rss.mark("paused")
        sent_while_paused = up.sent_bytes
        got = 0
        buf = bytearray(64 * 1024)
        for _ in range(20):  # then a trickle
            got += client.sock.recv_into(buf)
            time.sleep(0.01)
        rss.mark("trickle")
        buf = bytearray(MIB)
        while got < size:
            n = client.sock.recv_into(buf)
            assert n, f"closed after {got} bytes"
            got += n
    print(f"slow reader: upstream had sent {sent_while_paused / MIB:.1f} MiB after a 2 s pause")
    # Without backpressure the upstream would have sent all 200 MiB into the proxy by now.
    # The bound leaves room for the kernel's socket buffers on both hops.
    assert sent_while_paused < size // 2
    assert got >= size  # the head's bytes are counted too
    rss.check_flat("start", "paused")


# --------------------------------------------------------------------------- Expect: 100-continue


def test_expect_continue_relays_100_then_the_answer_and_the_body_once(rig: Rig) -> None:
    bodies: list[bytes] = []

    def serve(peer: Peer) -> None:
        while (head := peer.read_head()) is not None:
            if header_map(head).get("expect", "").lower() == "100-continue":
                peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = bytearray()
            peer.read_body(head, body.extend)
            bodies.append(bytes(body))
            peer.send(ok_response(b"got %d" % len(body)))

    payload = b"0123456789" * 100
    with raw_upstream(serve) as up, Client(rig.out) as client:
        client.send(b"POST /e HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\nexpect: 100-continue\r\n\r\n"
                    % (up.address.encode(), len(payload)))
        interim = client.response()
        assert interim.status == 100
        client.send(payload)
        final = client.response()
        assert (final.status, final.body) == (200, b"got 1000")
        # The connection is still good for another request.
        client.send(b"GET /after HTTP/1.1\r\nhost: %s\r\n\r\n" % up.address.encode())
        assert client.response().status == 200
    assert bodies == [payload, b""]
    heads = [h for _, h in up.heads]
    assert b"expect: 100-continue" in heads[0].lower()
    assert up.targets() == ["/e", "/after"]


def test_expect_continue_early_final_answer_never_reads_the_body_as_a_request(rig: Rig) -> None:
    # The upstream refuses with 413 before reading the body (and keeps its connection open,
    # still reading requests). The client then sends the body anyway; it is a whole request
    # line, and must never be parsed as a next request by the proxy or reach the upstream.
    def serve(peer: Peer) -> None:
        while (head := peer.read_head()) is not None:
            if header_map(head).get("expect"):
                peer.send(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large")
                continue  # the body is never read here
            peer.read_body(head)
            peer.send(ok_response())

    smuggled = b"GET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
    with raw_upstream(serve) as up:
        with Client(rig.out) as client:
            client.send(b"POST /big HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\nexpect: 100-continue\r\n\r\n"
                        % (up.address.encode(), len(smuggled)))
            reply = client.response()
            assert (reply.status, reply.body) == (413, b"too large")
            assert reply.header("connection") == "close"
            with contextlib.suppress(OSError):
                client.send(smuggled)
            assert client.closed_by_peer(), "only one response, then the connection closes"
        time.sleep(0.2)
        assert "/smuggled" not in up.targets()
        # The upstream still expects that body on the refused connection: it is not reused.
        with Client(rig.out) as client:
            client.send(b"GET /next HTTP/1.1\r\nhost: %s\r\n\r\n" % up.address.encode())
            assert client.response().body == b"ok"
        assert up.targets() == ["/big", "/next"]
        assert up.accepted == 2


# --------------------------------------------------------------------------- WebSocket


def upgrade(key: bytes | None) -> bytes:
    baggage = b"baggage: turnout-session=" + key + b"\r\n" if key else b""
    return (b"GET /chat HTTP/1.1\r\nhost: chat\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n" + baggage + b"\r\n")


def read_exactly(client: Client, n: int) -> bytes:
    while len(client.buf) < n:
        assert client.fill(), f"tunnel closed after {len(client.buf)} of {n} bytes"
    data, client.buf = client.buf[:n], client.buf[n:]
    return data


def open_tunnel(rig: Rig, key: bytes | None, label: str) -> Client:
    client = Client(rig.chat)
    client.send(upgrade(key))
    reply = client.response()
    assert reply.status == 101, reply.head
    assert reply.header("x-upstream") == label
    assert (reply.header("upgrade") or "").lower() == "websocket"
    assert "upgrade" in (reply.header("connection") or "").lower()
    assert read_exactly(client, len(b"hello from " + label.encode())) == b"hello from " + label.encode()
    return client


@pytest.mark.parametrize(("key", "label"), [(b"wskey", "sandbox"), (None, "baseline"), (b"other", "baseline")])
def test_websocket_is_routed_by_the_same_decision_and_flows_both_ways(rig: Rig, key: bytes | None,
                                                                      label: str) -> None:
    chosen = rig.chat_sandbox if label == "sandbox" else rig.chat_baseline
    other = rig.chat_baseline if label == "sandbox" else rig.chat_sandbox
    chosen_before, other_before = chosen.accepted, other.accepted
    with open_tunnel(rig, key, label) as client:
        client.send(b"ping")
        assert read_exactly(client, 4) == b"ping"
        # A larger stream both ways at once (the echo needs the tunnel's backpressure to work).
        blob = os.urandom(3 * MIB)
        sender = threading.Thread(target=client.sock.sendall, args=(blob,), daemon=True)
        sender.start()
        echoed = read_exactly(client, len(blob))
        sender.join(10)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(blob).digest()
    assert chosen.accepted == chosen_before + 1
    assert other.accepted == other_before
    _, head = chosen.heads[-1]
    fields = header_map(head)
    assert fields["upgrade"].lower() == "websocket"
    assert fields["connection"].lower() == "upgrade"
    assert fields["sec-websocket-key"] == "dGhlIHNhbXBsZSBub25jZQ=="
    if key:
        assert fields["baggage"] == "turnout-session=" + key.decode()


def test_websocket_client_close_reaches_the_upstream(rig: Rig) -> None:
    before = len(rig.closed["sandbox"])
    client = open_tunnel(rig, b"wskey", "sandbox")
    client.send(b"ping")
    assert read_exactly(client, 4) == b"ping"
    client.sock.shutdown(socket.SHUT_WR)  # the client is done sending
    try:
        assert wait_for(lambda: len(rig.closed["sandbox"]) > before, 5), \
            "the upstream never saw the client's end of the tunnel"
    finally:
        client.close()


def test_websocket_upstream_close_reaches_the_client(rig: Rig) -> None:
    with open_tunnel(rig, b"wskey", "sandbox") as client:
        client.send(b"server-close")
        assert read_exactly(client, 3) == b"bye"
        assert client.closed_by_peer()


def test_websocket_refused_by_the_upstream_is_a_plain_response(tmp_path: Path, codec: str) -> None:
    def serve(peer: Peer) -> None:
        serve_forever(lambda p, h, n: b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")(peer)

    with raw_upstream(serve) as up:
        config = {"listeners": [inbound("chat-in", free_port(), "chat", up.address)]}
        with running_proxy(config, tmp_path, codec) as proxy, Client(proxy.port) as client:
            client.send(upgrade(None))
            reply = client.response()
            assert (reply.status, reply.body) == (403, b"no")
            # Not a tunnel: the next bytes are parsed as HTTP again.
            client.send(b"GET /plain HTTP/1.1\r\nhost: chat\r\n\r\n")
            assert client.response().status == 403
        assert up.targets() == ["/chat", "/plain"]


# --------------------------------------------------------------------------- HTTP/1.0 clients

CHUNKED_WITH_TRAILERS = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"
                         b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nx-sum: 42\r\n\r\n")


def test_http10_without_keep_alive_gets_the_response_then_close(rig: Rig) -> None:
    with raw_upstream(serve_forever(lambda p, h, n: ok_response(b"hello"))) as up, Client(rig.out) as client:
        client.send(b"GET /a HTTP/1.0\r\nhost: %s\r\n\r\n" % up.address.encode())
        reply = client.response()
        assert (reply.status, reply.body) == (200, b"hello")
        assert reply.header("connection") == "close"
        assert reply.header("transfer-encoding") is None
        assert client.closed_by_peer()
    # Forwarded as HTTP/1.1 with a Host the upstream can use.
    assert up.heads[0][1].startswith(b"GET /a HTTP/1.1\r\n")


def test_http10_keep_alive_is_honoured(rig: Rig) -> None:
    with raw_upstream(serve_forever(lambda p, h, n: ok_response(b"n=%d" % n))) as up, Client(rig.out) as client:
        for i in range(3):
            client.send(b"GET /k/%d HTTP/1.0\r\nhost: %s\r\nconnection: keep-alive\r\n\r\n"
                        % (i, up.address.encode()))
            reply = client.response()
            assert (reply.status, reply.body) == (200, b"n=%d" % i)
            assert (reply.header("connection") or "").lower() == "keep-alive"
            assert reply.header("content-length") == str(len(reply.body))
    assert up.targets() == ["/k/0", "/k/1", "/k/2"]


@pytest.mark.parametrize("keep_alive", [False, True])
def test_chunked_upstream_response_reaches_http10_close_delimited(rig: Rig, keep_alive: bool) -> None:
    extra = b"connection: keep-alive\r\n" if keep_alive else b""
    with raw_upstream(serve_forever(lambda p, h, n: CHUNKED_WITH_TRAILERS)) as up, Client(rig.out) as client:
        client.send(b"GET /c HTTP/1.0\r\nhost: %s\r\n%s\r\n" % (up.address.encode(), extra))
        reply = client.response()
        assert reply.status == 200
        assert reply.header("transfer-encoding") is None
        assert reply.header("content-length") is None
        assert reply.header("connection") == "close"  # the close is what ends the body
        assert reply.body == b"abcdefg"  # complete, no chunk framing, no trailers
        assert reply.complete and not reply.reset


# --------------------------------------------------------------------------- chunked with trailers


def test_chunked_request_is_forwarded_chunked_with_trailers(rig: Rig) -> None:
    seen: list[tuple[bytes, bytes, list[bytes]]] = []

    def serve(peer: Peer) -> None:
        while (head := peer.read_head()) is not None:
            body = bytearray()
            trailers = peer.read_body(head, body.extend)
            seen.append((head, bytes(body), trailers))
            peer.send(ok_response())

    big = os.urandom(300 * 1024)
    with raw_upstream(serve) as up, Client(rig.out) as client:
        client.send(b"POST /t HTTP/1.1\r\nhost: %s\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
                    b"5\r\nhello\r\n6;name=value\r\n world\r\n%x\r\n%s\r\n"
                    b"0\r\nx-checksum: abc\r\ncontent-length: 99\r\nhost: evil\r\n\r\n"
                    % (up.address.encode(), len(big), big))
        assert client.response().status == 200
    (head, body, trailers), = seen
    fields = header_map(head)
    assert fields.get("transfer-encoding") == "chunked"
    assert "content-length" not in fields
    assert body == b"hello world" + big
    # Ordinary trailers pass; framing and routing fields are never accepted as trailers.
    assert trailers == [b"x-checksum: abc"]


def test_chunked_response_is_rechunked_with_trailers(rig: Rig) -> None:
    with raw_upstream(serve_forever(lambda p, h, n: CHUNKED_WITH_TRAILERS)) as up, Client(rig.out) as client:
        for _ in range(2):  # and the connection stays usable
            client.send(b"GET /r HTTP/1.1\r\nhost: %s\r\n\r\n" % up.address.encode())
            reply = client.response()
            assert reply.status == 200
            assert reply.header("transfer-encoding") == "chunked"
            assert reply.header("content-length") is None
            assert reply.complete
            assert reply.body == b"abcdefg"
            assert reply.trailers == [b"x-sum: 42"]
    assert up.accepted == 1
