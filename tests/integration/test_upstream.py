"""Upstream faults through the real proxy: malformed responses, resets mid-body, pool reuse
and stale pooled connections, response and connect timeouts, mirror bounds.

Most tests talk to a fresh raw-socket upstream on its own port through an *outbound*
listener (the upstream is chosen by the request's Host), so no pooled connection is ever
shared between two tests; tests that need sessions use the inbound listener of the same
module-scoped proxy.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.support import (
    ProxyProcess,
    RecordingUpstream,
    free_port,
    inbound,
    running_proxy,
)

# --------------------------------------------------------------------------- raw upstream


class Peer:
    """One accepted upstream connection, with a read buffer and helpers to parse HTTP/1.1."""

    def __init__(self, sock: socket.socket, index: int, server: RawUpstream) -> None:
        self.sock = sock
        self.index = index
        self.server = server
        self.buf = b""
        self._scratch = bytearray(1 << 20)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The next request head (through CRLF CRLF), recorded on the server; None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        self.server.record(self.index, head)
        return head

    def read_line(self) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("closed inside a line")
        end = self.buf.index(b"\r\n")
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        return line

    def consume(self, n: int, on_data: Callable[[memoryview], None] | None = None) -> None:
        """Read exactly ``n`` body bytes without keeping them (``on_data`` may look at them)."""
        if self.buf:
            take = self.buf[:n]
            self.buf = self.buf[len(take) :]
            n -= len(take)
            if on_data is not None:
                on_data(memoryview(take))
            self.server.add_bytes(len(take))
        view = memoryview(self._scratch)
        while n > 0:
            got = self.sock.recv_into(view, min(n, len(view)))
            if not got:
                raise EOFError("closed inside a body")
            n -= got
            if on_data is not None:
                on_data(view[:got])
            self.server.add_bytes(got)

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes, kept."""
        out = bytearray()
        self.consume(n, out.extend)
        return bytes(out)

    def read_chunked(self, on_data: Callable[[memoryview], None] | None = None) -> list[bytes]:
        """A chunked body, streamed to ``on_data``; returns the trailer lines."""
        while True:
            line = self.read_line()
            size = int(line.split(b";")[0], 16)
            if size == 0:
                trailers = []
                while (line := self.read_line()) != b"":
                    trailers.append(line)
                return trailers
            self.consume(size, on_data)
            crlf = self.read_line()
            assert crlf == b"", f"no CRLF after chunk data: {crlf[:40]!r}"

    def read_body(self, head: bytes, on_data: Callable[[memoryview], None] | None = None) -> list[bytes]:
        """The body the head announces (Content-Length or chunked); returns trailer lines."""
        fields = header_map(head)
        if fields.get("transfer-encoding", "").lower() == "chunked":
            return self.read_chunked(on_data)
        self.consume(int(fields.get("content-length", "0")), on_data)
        return []

    def send(self, data: bytes) -> None:
        """Write everything."""
        self.sock.sendall(data)

    def reset(self) -> None:
        """Close with a TCP RST instead of a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()


Serve = Callable[[Peer], None]


class RawUpstream:
    """A TCP server serving every accepted connection with ``serve(peer)`` in its own thread.

    Records the request heads it read (with the connection index) and counts connections
    and body bytes, never keeping bodies unless ``serve`` does.
    """

    def __init__(self, serve: Serve, label: str = "raw") -> None:
        self.serve = serve
        self.label = label
        self.accepted = 0
        self.heads: list[tuple[int, bytes]] = []
        self.body_bytes = 0
        self.sent_bytes = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def record(self, index: int, head: bytes) -> None:
        with self._lock:
            self.heads.append((index, head))

    def add_bytes(self, n: int) -> None:
        self.body_bytes += n  # one writer thread at a time in the streaming tests

    def targets(self) -> list[str]:
        """Request targets seen, in order."""
        return [head.split(b" ", 2)[1].decode("latin-1") for _, head in self.heads]

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                index = self.accepted
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        try:
            self.serve(Peer(conn, index, self))
        except (OSError, EOFError):
            pass
        except BaseException as exc:  # surfaced by tests that check ``errors``
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def stop(self) -> None:
        """Stop accepting and close every connection."""
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            for c in self._conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    c.close()


@contextlib.contextmanager
def raw_upstream(serve: Serve, label: str = "raw") -> Iterator[RawUpstream]:
    """A ``RawUpstream`` for the duration of a ``with`` block."""
    up = RawUpstream(serve, label)
    try:
        yield up
    finally:
        up.stop()


def free_ports(n: int) -> list[int]:
    """``n`` different ephemeral ports (``free_port`` twice in a row may return the same one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def header_map(head: bytes) -> dict[str, str]:
    """Lower-cased header names to (last) values of a raw head."""
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, value = line.partition(b":")
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def ok_response(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    """A well-formed 200 with a Content-Length."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def serve_forever(answer: Callable[[Peer, bytes, int], bytes | None]) -> Serve:
    """Keep-alive serving: read each request (and its body) and send ``answer(peer, head, n)``
    (``n`` counts requests on this connection); None closes the connection without answering."""

    def serve(peer: Peer) -> None:
        n = 0
        while (head := peer.read_head()) is not None:
            peer.read_body(head)
            reply = answer(peer, head, n)
            if reply is None:
                return
            peer.send(reply)
            n += 1

    return serve


# --------------------------------------------------------------------------- raw client


@dataclass
class Reply:
    """One response as a raw client read it."""

    status: int
    head: bytes
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[bytes]
    complete: bool  # the framing said the body ended (not cut off by EOF or a reset)
    reset: bool = False

    def header(self, name: str) -> str | None:
        """Comma-joined value of a header, or None."""
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None


class Client:
    """A raw HTTP/1.x client connection that reads responses byte-exactly."""

    def __init__(self, port: int, timeout_s: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.buf = b""
        self.eof = False
        self.reset = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> bool:
        """Read more into ``buf``; False at EOF or reset."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
            self.reset = True
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until_eof(self) -> bytes:
        """Everything up to the proxy's close (or a reset)."""
        while self.fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def closed_by_peer(self, timeout_s: float = 5.0) -> bool:
        """True when the proxy closed the connection (EOF or reset) with nothing more to read."""
        self.sock.settimeout(timeout_s)
        try:
            return not self.fill() and not self.buf
        except TimeoutError:
            return False

    def response(self, head_request: bool = False) -> Reply:
        """The next response (a 1xx is returned on its own)."""
        while b"\r\n\r\n" not in self.buf:
            if not self.fill():
                raise EOFError(f"connection closed before a response head: {self.buf[:200]!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
        fields = dict(headers)
        if head_request or status < 200 or status in (204, 304):
            return Reply(status, head, headers, b"", [], True)
        if fields.get("transfer-encoding", "").lower() == "chunked":
            return self._chunked(status, head, headers)
        if "content-length" in fields:
            n = int(fields["content-length"])
            while len(self.buf) < n and self.fill():
                pass
            body, self.buf = self.buf[:n], self.buf[n:]
            return Reply(status, head, headers, body, [], len(body) == n, self.reset)
        body = self.read_until_eof()
        return Reply(status, head, headers, body, [], not self.reset, self.reset)

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self.fill():
                return None
        end = self.buf.index(b"\r\n")
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        return line

    def _chunked(self, status: int, head: bytes, headers: list[tuple[str, str]]) -> Reply:
        body = bytearray()
        while True:
            line = self._line()
            if line is None:
                return Reply(status, head, headers, bytes(body), [], False, self.reset)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                trailers: list[bytes] = []
                while (line := self._line()) != b"":
                    if line is None:
                        return Reply(status, head, headers, bytes(body), trailers, False, self.reset)
                    trailers.append(line)
                return Reply(status, head, headers, bytes(body), trailers, True)
            while len(self.buf) < size + 2 and self.fill():
                pass
            if len(self.buf) < size + 2:
                body += self.buf[:size]
                self.buf = b""
                return Reply(status, head, headers, bytes(body), [], False, self.reset)
            assert self.buf[size : size + 2] == b"\r\n", "bad chunk framing from the proxy"
            body += self.buf[:size]
            self.buf = self.buf[size + 2 :]


def get(host: str, path: str = "/", extra: bytes = b"") -> bytes:
    """A raw GET head."""
    return b"GET %s HTTP/1.1\r\nhost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)


def post(host: str, path: str, body: bytes, extra: bytes = b"") -> bytes:
    """A raw POST with a Content-Length body."""
    return b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
        path.encode(), host.encode(), len(body), extra, body)


def one(port: int, request: bytes) -> Reply:
    """Send one request on a new connection and read its response."""
    with Client(port) as client:
        client.send(request)
        return client.response()


def metric(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    status, text = proxy.admin_get("/metrics")
    assert status == 200
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --------------------------------------------------------------------------- the rig


def hang(peer: Peer) -> None:
    """Read requests and never answer (until the test stops the upstream)."""
    while peer.read_head() is not None:
        pass


@dataclass
class Rig:
    """One proxy per codec: an outbound listener for fresh per-test upstreams, an inbound
    ``users`` listener with sessions, and an inbound listener whose baseline is down."""

    proxy: ProxyProcess
    codec: str
    baseline: RecordingUpstream
    sandbox: RecordingUpstream
    mirror: RecordingUpstream
    hanging: RawUpstream

    @property
    def out(self) -> int:
        """The outbound listener: the upstream is the request's Host."""
        return self.proxy.ports["out"]

    @property
    def users(self) -> int:
        """The inbound ``users`` listener (baseline, sessions)."""
        return self.proxy.ports["users-in"]

    @property
    def ghost(self) -> int:
        """An inbound listener whose baseline refuses connections."""
        return self.proxy.ports["ghost-in"]


RESPONSE_TIMEOUT_S = 1.0
# The response timeout runs from the request head, connecting included (like Envoy's route
# timeout), so the connect timeout must be the shorter one to be observable.
CONNECT_TIMEOUT_S = 0.5
MIRROR_MAX_BODY_BYTES = 4096


@pytest.fixture(scope="module", params=["httptools", "h11"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    baseline = RecordingUpstream("baseline")
    sandbox = RecordingUpstream("sandbox")
    mirror = RecordingUpstream("mirror")
    hanging = RawUpstream(hang, "hanging")
    dead, out, users, ghost = free_ports(4)  # ``dead``: nothing listens there
    config = {
        "routing": {"debug_headers": True},
        "listeners": [
            {"name": "out", "address": f"127.0.0.1:{out}", "mode": "outbound"},
            inbound("users-in", users, "users", baseline.address),
            inbound("ghost-in", ghost, "ghost", f"127.0.0.1:{dead}"),
        ],
        "limits": {"upstream_response_timeout_s": RESPONSE_TIMEOUT_S, "upstream_connect_timeout_s": CONNECT_TIMEOUT_S,
                   "mirror_max_body_bytes": MIRROR_MAX_BODY_BYTES},
        "sessions": [
            {"id": "steal-1", "key": "steal", "routes": [{"service": "users", "destination": sandbox.address}]},
            {"id": "hang-1", "key": "hang", "routes": [
                {"service": "users", "destination": hanging.address, "fallback": "error"}]},
            {"id": "mirror-1", "key": "mirror", "routes": [
                {"service": "users", "destination": mirror.address, "mode": "mirror"}]},
            {"id": "mirror-dead", "key": "mirror-dead", "routes": [
                {"service": "users", "destination": f"127.0.0.1:{dead}", "mode": "mirror"}]},
        ],
    }
    tmp: Path = tmp_path_factory.mktemp("upstream")
    try:
        with running_proxy(config, tmp, codec=str(request.param)) as proxy:
            yield Rig(proxy, str(request.param), baseline, sandbox, mirror, hanging)
    finally:
        for up in (baseline, sandbox, mirror, hanging):
            up.stop()


# --------------------------------------------------------------------------- malformed responses

# Each is the whole (bad) answer to the first request on the first upstream connection.
# Every later request, on that connection or another, gets a good 200 "ok", so a proxy that
# reused the poisoned connection would be caught by the connection count.
BAD_RESPONSES = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    "two_different_cl": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nokk",
    "cl_list": b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nokk",
    "cl_plus_sign": b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok",
    "cl_hex": b"HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\nok",
    "cl_4301_digits": b"HTTP/1.1 200 OK\r\ncontent-length: " + b"1" * 4301 + b"\r\n\r\nok",
    "te_not_chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nok",
    "te_chunked_then_identity": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, identity\r\n\r\nok",
    "two_te": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    "space_before_colon": b"HTTP/1.1 200 OK\r\ncontent-length : 2\r\n\r\nok",
    "obs_fold": b"HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 2\r\n\r\nok",
    "obs_fold_tab": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\ttransfer-encoding: chunked\r\n\r\nok",
    "ctl_byte_in_value": b"HTTP/1.1 200 OK\r\nx-a: a\x01b\r\ncontent-length: 2\r\n\r\nok",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\ncontent-length: 2\r\n\r\nok",
    "bare_cr_in_value": b"HTTP/1.1 200 OK\r\nx-a: a\rb\r\ncontent-length: 2\r\n\r\nok",
    "bare_lf_everywhere": b"HTTP/1.1 200 OK\ncontent-length: 2\n\nok",
    "bare_lf_one_line": b"HTTP/1.1 200 OK\r\nx-a: b\ncontent-length: 2\r\n\r\nok",
    "status_line_no_code": b"HTTP/1.1 OK\r\ncontent-length: 2\r\n\r\nok",
    "status_code_four_digits": b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok",
    "status_code_4301_digits": b"HTTP/1.1 " + b"2" * 4301 + b" OK\r\ncontent-length: 2\r\n\r\nok",
    "status_line_http2": b"HTTP/2 200\r\ncontent-length: 2\r\n\r\nok",
    "status_line_lowercase": b"http/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    "not_http_at_all": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
}


def poisoned_first(bad: bytes) -> Serve:
    """The first request on connection 0 gets ``bad``; everything else gets a good 200."""

    def answer(peer: Peer, head: bytes, n: int) -> bytes:
        return bad if (peer.index, n) == (0, 0) else ok_response()

    return serve_forever(answer)


@pytest.mark.parametrize("case", list(BAD_RESPONSES))
def test_malformed_response_is_502_and_that_connection_is_not_reused(rig: Rig, case: str) -> None:
    with raw_upstream(poisoned_first(BAD_RESPONSES[case])) as up:
        first = one(rig.out, get(up.address, "/first"))
        assert first.status == 502, first.head + first.body
        assert first.header("x-turnout-error"), first.head
        assert first.complete and b"ok" not in first.body
        second = one(rig.out, get(up.address, "/second"))
        assert (second.status, second.body) == (200, b"ok")
        # The poisoned connection was closed, not pooled: the second request needed a new one.
        assert up.accepted == 2, up.heads


@pytest.mark.parametrize("size", [b"0x8", b"0" * 4000 + b"8", b"8" * 4301],
                         ids=["hex-prefix", "4000-leading-zeros", "4301-digits"])
def test_malformed_chunked_body_after_head_cuts_the_client_off(rig: Rig, size: bytes) -> None:
    # The head was fine and has been relayed; the body framing breaks afterwards. The client
    # must see a broken response, never a well-formed one that ends where the garbage began.
    bad = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n" + size + b"\r\nsmuggled\r\n0\r\n\r\n"
    with raw_upstream(poisoned_first(bad)) as up:
        with Client(rig.out) as client:
            client.send(get(up.address, "/first"))
            reply = client.response()
            assert reply.status == 200
            assert not reply.complete
            assert b"smuggled" not in reply.body
        assert one(rig.out, get(up.address, "/second")).body == b"ok"
        assert up.accepted == 2


def test_bytes_after_a_response_never_answer_the_next_request(rig: Rig) -> None:
    # An upstream that sends more than the response it announced is out of step: whatever
    # follows must not be taken as the answer to the next request on that connection.
    extra = ok_response(b"ok") + b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
    with raw_upstream(poisoned_first(extra)) as up, Client(rig.out) as client:
        client.send(get(up.address, "/first"))
        assert client.response().body == b"ok"
        client.send(get(up.address, "/second"))
        assert client.response().body == b"ok"
        assert up.accepted == 2


def test_unrequested_101_is_502(rig: Rig) -> None:
    # A plain GET must never be turned into a tunnel past routing, and what the upstream
    # sent after its 101 is never taken as the answer to the client's next request.
    bad = (b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
           b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\ninjected")
    with raw_upstream(poisoned_first(bad)) as up, Client(rig.out) as client:
        client.send(get(up.address, "/first"))
        reply = client.response()
        assert reply.status == 502, reply.head
        assert reply.header("x-turnout-error") == "upstream_bad_head"
        client.send(get(up.address, "/second"))
        assert client.response().body == b"ok"
        assert up.accepted == 2


# --------------------------------------------------------------------------- resets mid-body


def cut_mid_body(how: str) -> Serve:
    """Connection 0 announces 1000 bytes, sends 100 and closes (FIN or RST); others answer ok."""

    def serve(peer: Peer) -> None:
        if peer.index != 0:
            serve_forever(lambda p, h, n: ok_response())(peer)
            return
        if peer.read_head() is None:
            return
        if how == "chunked":
            peer.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n")
        else:
            peer.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
        time.sleep(0.2)  # let the proxy relay what it has before the connection dies
        if how == "rst":
            peer.reset()
        else:
            peer.sock.close()

    return serve


@pytest.mark.parametrize("how", ["fin", "rst", "chunked"])
def test_upstream_dies_mid_body_client_never_sees_a_complete_response(rig: Rig, how: str) -> None:
    with raw_upstream(cut_mid_body(how)) as up:
        with Client(rig.out) as client:
            client.send(get(up.address, "/cut"))
            try:
                reply = client.response()
            except EOFError:
                pass  # reset before the head was read: also acceptable
            else:
                if reply.status == 502:
                    pass  # the proxy lost the head to the reset: a clean error is fine too
                else:
                    assert reply.status == 200
                    assert not reply.complete, reply
                    assert len(reply.body) <= 100
                    assert client.closed_by_peer(), "the client connection must be closed"
        # The dead connection is not reused: the next request gets a fresh one and succeeds.
        assert one(rig.out, get(up.address, "/next")).body == b"ok"
        assert up.accepted == 2


def test_upstream_dies_mid_body_httpx_raises(rig: Rig) -> None:
    with raw_upstream(cut_mid_body("fin")) as up, pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{rig.out}/cut", headers={"host": up.address}, timeout=10)


# --------------------------------------------------------------------------- the pool


def test_sequential_requests_reuse_one_upstream_connection(rig: Rig) -> None:
    up = RecordingUpstream("pooled")
    try:
        for i in range(4):  # a new client connection each time
            assert one(rig.out, get(up.address, f"/new/{i}")).status == 200
        with Client(rig.out) as client:  # and one client connection for several requests
            for i in range(4):
                client.send(get(up.address, f"/same/{i}"))
                assert client.response().status == 200
        assert len(up.requests) == 8
        assert up.connections == 1
    finally:
        up.stop()


def test_different_destinations_never_share_a_connection(rig: Rig) -> None:
    a, b = RecordingUpstream("a"), RecordingUpstream("b")
    try:
        with Client(rig.out) as client:
            for i in range(6):
                up = (a, b)[i % 2]
                client.send(get(up.address, f"/{up.label}/{i}"))
                reply = client.response()
                assert reply.header("x-upstream") == up.label
        assert [r.target for r in a.requests] == ["/a/0", "/a/2", "/a/4"]
        assert [r.target for r in b.requests] == ["/b/1", "/b/3", "/b/5"]
        assert (a.connections, b.connections) == (1, 1)
    finally:
        a.stop()
        b.stop()


def test_sandbox_and_baseline_requests_never_share_a_connection(rig: Rig) -> None:
    # Same service, same client connection, alternating routes: each request lands only on
    # the upstream its own decision picked.
    tag = f"/share-{rig.codec}"
    with Client(rig.users) as client:
        for i in range(6):
            key = b"baggage: turnout-session=steal\r\n" if i % 2 else b""
            client.send(get("users", f"{tag}/{i}", key))
            assert client.response().header("x-upstream") == ("sandbox" if i % 2 else "baseline")
    base = [r.target for r in rig.baseline.requests if r.target.startswith(tag)]
    sand = [r.target for r in rig.sandbox.requests if r.target.startswith(tag)]
    assert base == [f"{tag}/0", f"{tag}/2", f"{tag}/4"]
    assert sand == [f"{tag}/1", f"{tag}/3", f"{tag}/5"]


def closing_upstream(when: str) -> Serve:
    """Keep-alive in name only: the upstream drops each connection after one response,
    never saying ``connection: close``. ``after_response`` closes right after answering;
    ``on_next_request`` / ``rst_on_next_request`` close when the next request arrives,
    without answering (the idle-close race, made deterministic)."""

    def serve(peer: Peer) -> None:
        head = peer.read_head()
        if head is None:
            return
        peer.read_body(head)
        peer.send(ok_response(b"conn-%d" % peer.index))
        if when == "after_response":
            return
        if peer.read_head() is None:
            return
        if when == "rst_on_next_request":
            peer.reset()

    return serve


@pytest.mark.parametrize("when", ["after_response", "on_next_request", "rst_on_next_request"])
def test_get_on_a_stale_pooled_connection_is_retried_once(rig: Rig, when: str) -> None:
    with raw_upstream(closing_upstream(when)) as up, Client(rig.out) as client:
        for i in range(5):
            client.send(get(up.address, f"/g/{i}"))
            reply = client.response()
            assert reply.status == 200, (i, reply.head, reply.body)
        assert up.accepted == 5  # one fresh connection per answered request
        assert [t for t in up.targets() if t.startswith("/g/")][-1] == "/g/4"


def test_stale_connection_retry_happens_only_once(rig: Rig) -> None:
    # Connection 0 answers once then dies on the next request; every later connection dies
    # on its first request. The GET is retried once on a fresh connection, then it is a 502.
    def serve(peer: Peer) -> None:
        if peer.index == 0:
            closing_upstream("on_next_request")(peer)
        else:
            peer.read_head()

    with raw_upstream(serve) as up, Client(rig.out) as client:
        client.send(get(up.address, "/warm"))
        assert client.response().status == 200
        client.send(get(up.address, "/again"))
        reply = client.response()
        assert reply.status == 502, reply.head
        assert (reply.header("x-turnout-error") or "").startswith("upstream_reset")
        assert up.targets() == ["/warm", "/again", "/again"]
        assert up.accepted == 2


def test_post_on_a_stale_pooled_connection_is_not_retried(rig: Rig) -> None:
    # A request with a body may have been acted on: the proxy answers 502 rather than
    # sending it again (only bodiless idempotent requests are retried).
    with raw_upstream(closing_upstream("on_next_request")) as up, Client(rig.out) as client:
        client.send(get(up.address, "/warm"))
        assert client.response().status == 200
        client.send(post(up.address, "/order", b'{"n": 1}'))
        reply = client.response()
        assert reply.status == 502, reply.head
        assert (reply.header("x-turnout-error") or "").startswith("upstream_reset")
        time.sleep(0.2)
        assert up.targets().count("/order") == 1  # sent once, never again
        assert up.accepted == 1


# --------------------------------------------------------------------------- timeouts and refusals


def test_no_answer_is_504_after_the_response_timeout(rig: Rig) -> None:
    with raw_upstream(hang) as up:
        started = time.monotonic()
        reply = one(rig.out, get(up.address, "/slow"))
        elapsed = time.monotonic() - started
    assert reply.status == 504
    assert reply.header("x-turnout-error") == "upstream_timeout"
    assert RESPONSE_TIMEOUT_S * 0.9 <= elapsed < RESPONSE_TIMEOUT_S + 4, elapsed


def test_sandbox_no_answer_504_names_the_session(rig: Rig) -> None:
    started = time.monotonic()
    reply = one(rig.users, get("users", "/slow", b"baggage: turnout-session=hang\r\n"))
    elapsed = time.monotonic() - started
    assert reply.status == 504
    assert reply.header("x-turnout-error") == "upstream_timeout; session=hang-1"
    assert RESPONSE_TIMEOUT_S * 0.9 <= elapsed < RESPONSE_TIMEOUT_S + 4, elapsed


def test_baseline_refused_is_503(rig: Rig) -> None:
    reply = one(rig.ghost, get("ghost", "/"))
    assert reply.status == 503
    assert reply.header("x-turnout-error") == "connect_failed"
    assert b"connect to 127.0.0.1:" in reply.body


def test_connect_timeout_is_503(rig: Rig) -> None:
    # A listener with a full accept queue drops SYNs, so the connect hangs (Linux).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port))
        try:
            started = time.monotonic()
            reply = one(rig.out, get(f"127.0.0.1:{port}", "/"))
            elapsed = time.monotonic() - started
        finally:
            filler.close()
    assert reply.status == 503
    assert reply.header("x-turnout-error") == "connect_timeout"
    assert CONNECT_TIMEOUT_S * 0.9 <= elapsed < CONNECT_TIMEOUT_S + 4, elapsed


# --------------------------------------------------------------------------- mirror


def dropped(rig: Rig, why: str) -> float:
    return metric(rig.proxy, "turnout_mirror_requests_total", result="dropped_" + why)


def test_mirror_copies_small_bodies_and_drops_large_ones(rig: Rig) -> None:
    tag = f"/mirror-{rig.codec}"
    small = b"s" * 100
    reply = one(rig.users, post("users", tag + "/small", small, b"baggage: turnout-session=mirror\r\n"))
    assert (reply.status, reply.header("x-upstream")) == (200, "baseline")
    assert wait_for(lambda: any(r.target == tag + "/small" for r in rig.mirror.requests))
    assert next(r for r in rig.mirror.requests if r.target == tag + "/small").body == small

    before = dropped(rig, "too_large")
    large = b"L" * (MIRROR_MAX_BODY_BYTES * 4)
    reply = one(rig.users, post("users", tag + "/large", large, b"baggage: turnout-session=mirror\r\n"))
    assert (reply.status, reply.header("x-upstream")) == (200, "baseline")
    assert json.loads(reply.body)["body_bytes"] == len(large)
    assert next(r for r in rig.baseline.requests if r.target == tag + "/large").body == large
    assert wait_for(lambda: dropped(rig, "too_large") == before + 1, 5)
    time.sleep(0.3)
    assert not any(r.target == tag + "/large" for r in rig.mirror.requests)


def test_mirror_target_down_never_affects_the_client(rig: Rig) -> None:
    before = dropped(rig, "connect_failed")
    for i, request in enumerate([get("users", "/md/0", b"baggage: turnout-session=mirror-dead\r\n"),
                                 post("users", "/md/1", b"payload", b"baggage: turnout-session=mirror-dead\r\n")]):
        started = time.monotonic()
        reply = one(rig.users, request)
        assert (reply.status, reply.header("x-upstream")) == (200, "baseline"), i
        assert time.monotonic() - started < 3.0
    assert wait_for(lambda: dropped(rig, "connect_failed") >= before + 2, 5)


def test_hanging_mirror_target_does_not_starve_other_sessions(tmp_path: Path, codec: str) -> None:
    # Copies are bounded by mirror_max_in_flight; a sandbox that accepts and never answers
    # must not hold that budget forever, or every other session's mirror is dropped too.
    baseline, good = RecordingUpstream("baseline"), RecordingUpstream("good")
    stuck = RawUpstream(hang, "stuck")
    config = {
        "listeners": [inbound("users-in", free_port(), "users", baseline.address)],
        "limits": {"mirror_max_in_flight": 2, "upstream_response_timeout_s": RESPONSE_TIMEOUT_S},
        "sessions": [
            {"id": "stuck", "key": "stuck", "routes": [
                {"service": "users", "destination": stuck.address, "mode": "mirror"}]},
            {"id": "good", "key": "good", "routes": [
                {"service": "users", "destination": good.address, "mode": "mirror"}]},
        ],
    }
    try:
        with running_proxy(config, tmp_path, codec) as proxy:
            for i in range(3):
                reply = one(proxy.port, get("users", f"/stuck/{i}", b"baggage: turnout-session=stuck\r\n"))
                assert reply.status == 200
            assert wait_for(lambda: len(stuck.heads) >= 2, 5)
            time.sleep(RESPONSE_TIMEOUT_S * 2 + 1)  # any sane bound on a copy has passed by now
            assert one(proxy.port, get("users", "/good", b"baggage: turnout-session=good\r\n")).status == 200
            assert wait_for(lambda: any(r.target == "/good" for r in good.requests), 5), (
                "the good session's copy was dropped: "
                + str(metric(proxy, "turnout_mirror_requests_total", result="dropped_too_many_in_flight")))
    finally:
        for up in (baseline, good, stuck):
            up.stop()
