"""The config channel's gRPC client (dataplane/process/grpcstream.py) against real peers.

Two kinds of server, both on 127.0.0.1 ephemeral ports: grpcio's own (in a thread, as the
control plane runs it) for what a real gRPC server does, cleartext and TLS; and an HTTP/2
server made of the ``h2`` library whose every frame a test scripts, for what a real server
would rarely do on purpose (a message cut anywhere, a length prefix over the limit, a
silent peer, broken ends). The client runs on uvloop, as in the proxy. Every server is
stopped when its test ends, failed or not, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import h2.events
import pytest
import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes

from dataplane.process.grpcstream import Endpoint, GrpcError, GrpcStream, StatusCode, open_stream, tls_context

ROOT = Path(__file__).resolve().parents[3]
T = TypeVar("T")
Headers = list[tuple[bytes, bytes]]
OK_HEAD: Headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
MiB = 1 << 20


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 20.0) -> T:
    """Run a test's coroutine on uvloop, bounded."""
    async def bounded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro
    return uvloop.run(bounded())


def framed(message: bytes) -> bytes:
    """One gRPC message on the wire: uncompressed flag, 4-byte length, the bytes."""
    return struct.pack(">BL", 0, len(message)) + message


# ---------------------------------------------------------------------- a grpcio server


class GrpcServer:
    """grpcio's aio server in its own thread and loop, with raw-bytes methods under ``test.Echo``."""

    def __init__(self, credentials: grpc.ServerCredentials | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(credentials), self.loop).result(10)
        except BaseException:
            self.stop()
            raise

    async def _start(self, credentials: grpc.ServerCredentials | None) -> int:
        self.server = grpc.aio.server()
        methods = {name: grpc.stream_stream_rpc_method_handler(handler) for name, handler in (
            ("Chat", _chat), ("Deny", _deny), ("Partial", _partial), ("Big", _big))}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", methods),))
        if credentials is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        await self.server.start()
        return int(port)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _chat(requests: Any, context: Any) -> None:
    """First the caller's authorization metadata, then every message back until b"end"."""
    metadata = dict(context.invocation_metadata())
    await context.write(str(metadata.get("authorization", "")).encode())
    while True:
        message = await context.read()
        if message is grpc.aio.EOF or message == b"end":
            return
        await context.write(message)


async def _deny(requests: Any, context: Any) -> None:
    """Read the first message, then refuse with a message that must be percent-encoded."""
    await context.read()
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope: 100% ✓ denied")


async def _partial(requests: Any, context: Any) -> None:
    """One message, then an error status in the trailers."""
    await context.write(b"first")
    await context.abort(grpc.StatusCode.NOT_FOUND, "gone")


async def _big(requests: Any, context: Any) -> None:
    """A message as long as the number the first request names."""
    size = int(await context.read())
    await context.write(b"x" * size)
    await asyncio.sleep(30)


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcServer]:
    server = GrpcServer()
    try:
        yield server
    finally:
        server.stop()


def endpoint(port: int, **extra: Any) -> Endpoint:
    return Endpoint("127.0.0.1", port, **{"connect_timeout_s": 5.0, **extra})


# ---------------------------------------------------------------------- a scripted HTTP/2 server


class Peer:
    """One server connection of the ``h2`` library: takes the request head, then does what a
    test's script says, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.stream_id = 0
        self.request_headers: Headers = []
        self.request_data = bytearray()
        self.events: list[h2.events.Event] = []
        self.sent = 0  # DATA payload bytes sent

    async def start(self) -> bool:
        """Settle the connection and take the request head; False if the client left first."""
        self.conn.initiate_connection()
        self.flush()
        while not self.stream_id:
            if not await self.receive():
                return False
        return True

    async def receive(self, timeout_s: float = 5.0) -> bool:
        """Process what the client sent next; False at its end of the connection."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout_s)
        except ConnectionResetError:
            return False
        if not data:
            return False
        for event in self.conn.receive_data(data):
            self.events.append(event)
            if isinstance(event, h2.events.RequestReceived):
                self.stream_id = event.stream_id
                self.request_headers = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.request_data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        return True

    async def drain_events(self) -> None:
        """Read until the client closes the connection (bounded by the test's timeout)."""
        while await self.receive():
            pass

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def head(self, headers: Headers = OK_HEAD, end: bool = False) -> None:
        self.conn.send_headers(self.stream_id, headers, end_stream=end)
        self.flush()

    def data(self, chunk: bytes, end: bool = False) -> None:
        """One DATA frame (it must fit the client's window)."""
        self.conn.send_data(self.stream_id, chunk, end_stream=end)
        self.sent += len(chunk)
        self.flush()

    async def data_flow_controlled(self, payload: bytes) -> None:
        """DATA frames as the client's window allows, waiting for its WINDOW_UPDATEs."""
        view = memoryview(payload)
        while view:
            size = min(self.conn.local_flow_control_window(self.stream_id), self.conn.max_outbound_frame_size)
            if size <= 0:
                await self.receive()
                continue
            self.data(bytes(view[:size]))
            view = view[size:]

    def trailers(self, status: int = 0, message: bytes | None = None) -> None:
        fields = [(b"grpc-status", str(status).encode())]
        if message is not None:
            fields.append((b"grpc-message", message))
        self.conn.send_headers(self.stream_id, fields, end_stream=True)
        self.flush()


Script = Callable[[Peer], Awaitable[None]]


@asynccontextmanager
async def scripted(script: Script, tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[int, list[Peer]]]:
    """A server whose connections run ``script`` after the request head; yields its port and
    the peers so far. Closed, and its scripts cancelled, on the way out; a script that failed
    fails the test."""
    peers: list[Peer] = []
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        peers.append(peer)
        try:
            if await peer.start():
                await script(peer)
        finally:
            writer.close()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.get_running_loop().create_task(serve(reader, writer)))

    server = await asyncio.start_server(connected, "127.0.0.1", 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:  # the cause of whatever the client saw
            raise AssertionError("the scripted server failed") from failures[0]


async def expect_error(stream: GrpcStream) -> GrpcError:
    """Read until the stream fails; the error."""
    with pytest.raises(GrpcError) as info:
        for _ in range(1000):
            await stream.read()
    return info.value


# ---------------------------------------------------------------------- against grpcio


def test_a_round_trip_with_metadata_and_messages_larger_than_every_window(grpc_server: GrpcServer) -> None:
    big = bytes(random.Random(7).randbytes(3 * MiB))  # over the 1 MiB windows both ways

    async def main() -> list[bytes | None]:
        stream = await open_stream(endpoint(grpc_server.port), "/test.Echo/Chat",
                                   [("authorization", "Bearer s3cret")])
        try:
            replies: list[bytes | None] = [await stream.read()]
            for message in (b"hello", b"", big):
                await stream.write(message)
                replies.append(await stream.read())
            await stream.write(b"end")
            replies.append(await stream.read())
            return replies
        finally:
            stream.close()

    assert run(main()) == [b"Bearer s3cret", b"hello", b"", big, None]  # None: the server ended with OK


def test_a_refusal_before_any_message_is_a_trailers_only_status_percent_decoded(grpc_server: GrpcServer) -> None:
    async def main() -> GrpcError:
        stream = await open_stream(endpoint(grpc_server.port), "/test.Echo/Deny")
        try:
            await stream.write(b"hi")
            return await expect_error(stream)
        finally:
            stream.close()

    error = run(main())
    assert error.code == StatusCode.PERMISSION_DENIED
    assert error.message == "nope: 100% ✓ denied"


def test_messages_before_an_error_status_are_read_first(grpc_server: GrpcServer) -> None:
    async def main() -> tuple[bytes | None, GrpcError]:
        stream = await open_stream(endpoint(grpc_server.port), "/test.Echo/Partial")
        try:
            first = await stream.read()
            return first, await expect_error(stream)
        finally:
            stream.close()

    first, error = run(main())
    assert first == b"first"
    assert (error.code, error.message) == (StatusCode.NOT_FOUND, "gone")


def test_an_unknown_method_is_unimplemented(grpc_server: GrpcServer) -> None:
    async def main() -> GrpcError:
        stream = await open_stream(endpoint(grpc_server.port), "/test.Echo/Nothing")
        try:
            return await expect_error(stream)
        finally:
            stream.close()

    assert run(main()).code == StatusCode.UNIMPLEMENTED


def test_a_message_over_the_limit_from_grpcio_is_resource_exhausted(grpc_server: GrpcServer) -> None:
    async def main() -> GrpcError:
        stream = await open_stream(endpoint(grpc_server.port, max_message_bytes=MiB), "/test.Echo/Big")
        try:
            await stream.write(str(2 * MiB).encode())
            return await expect_error(stream)
        finally:
            stream.close()

    error = run(main())
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert error.message == f"received a message of {2 * MiB} bytes, over the limit of {MiB} bytes"


# ---------------------------------------------------------------------- framing, frame by frame

MESSAGES = [b"hello", b"", b"a", b"bc", bytes(range(256)) * 20, b"x" * 40_000]
WIRE = b"".join(framed(m) for m in MESSAGES)


def _cuts(kind: str) -> list[bytes]:
    if kind == "byte by byte, then whole":  # cuts inside every part of the first prefixes
        return [WIRE[i:i + 1] for i in range(30)] + [WIRE[i:i + 16384] for i in range(30, len(WIRE), 16384)]
    if kind == "several messages a frame":  # the first frame holds five whole messages and a part
        return [WIRE[i:i + 16384] for i in range(0, len(WIRE), 16384)]
    rng = random.Random(kind)
    chunks = []
    pos = 0
    while pos < len(WIRE):
        size = rng.randint(1, 9000)
        chunks.append(WIRE[pos:pos + size])
        pos += size
    return chunks


@pytest.mark.parametrize("kind", ["byte by byte, then whole", "several messages a frame", "random 1", "random 2"])
def test_messages_cut_anywhere_across_data_frames_come_out_whole(kind: str) -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        for chunk in _cuts(kind):
            peer.data(chunk)  # what WIRE holds fits the client's window: no waiting needed
        peer.trailers(0)
        await peer.drain_events()

    async def main() -> list[bytes | None]:
        async with scripted(script) as (port, _):
            stream = await open_stream(endpoint(port), "/test.Echo/Chat")
            try:
                return [await stream.read() for _ in range(len(MESSAGES) + 1)]
            finally:
                stream.close()

    assert run(main()) == [*MESSAGES, None]


def test_the_request_is_a_grpc_post_and_writes_are_framed_messages() -> None:
    async def script(peer: Peer) -> None:
        while len(peer.request_data) < len(framed(b"one")) + len(framed(b"two")):
            await peer.receive()
        peer.head(end=False)
        peer.trailers(0)
        await peer.drain_events()

    async def main() -> Peer:
        async with scripted(script) as (port, peers):
            stream = await open_stream(endpoint(port), "/turnout.v1.SessionDiscovery/DeltaSessions",
                                       [("authorization", "Bearer t"), ("x-node", "n1")])
            try:
                await stream.write(b"one")
                await stream.write(b"two")
                assert await stream.read() is None
            finally:
                stream.close()
            return peers[0]

    peer = run(main())
    head = dict(peer.request_headers)
    assert head[b":method"] == b"POST" and head[b":scheme"] == b"http"
    assert head[b":path"] == b"/turnout.v1.SessionDiscovery/DeltaSessions"
    assert head[b"content-type"] == b"application/grpc" and head[b"te"] == b"trailers"
    assert head[b"authorization"] == b"Bearer t" and head[b"x-node"] == b"n1"
    assert bytes(peer.request_data) == framed(b"one") + framed(b"two")


def test_a_prefix_over_the_limit_fails_at_once_without_waiting_for_or_buffering_the_body() -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        peer.data(framed(b"m" * 1000))  # exactly the limit: fine
        peer.data(struct.pack(">BL", 0, 1 << 30))  # announces 1 GiB, and never sends it
        await peer.drain_events()

    async def main() -> tuple[bytes | None, GrpcError, float, Peer]:
        async with scripted(script) as (port, peers):
            stream = await open_stream(endpoint(port, max_message_bytes=1000), "/test.Echo/Chat")
            try:
                first = await stream.read()
                started = time.monotonic()
                error = await expect_error(stream)
                elapsed = time.monotonic() - started
            finally:
                stream.close()
            await asyncio.sleep(0.2)  # the peer reads the reset and the GOAWAY
            return first, error, elapsed, peers[0]

    first, error, elapsed, peer = run(main())
    assert first == b"m" * 1000
    assert error.code == StatusCode.RESOURCE_EXHAUSTED
    assert error.message == f"received a message of {1 << 30} bytes, over the limit of 1000 bytes"
    assert elapsed < 1.0  # decided on the prefix alone: nothing of the body was awaited
    resets = [e for e in peer.events if isinstance(e, h2.events.StreamReset)]
    assert [e.error_code for e in resets] == [ErrorCodes.CANCEL]


def test_an_unread_message_holds_the_server_to_one_stream_window() -> None:
    second = b"y" * (3 * MiB)

    async def script(peer: Peer) -> None:
        peer.head()
        peer.data(framed(b"first"))
        await peer.data_flow_controlled(framed(second))
        peer.trailers(0)
        await peer.drain_events()

    async def main() -> tuple[int, list[bytes | None]]:
        async with scripted(script) as (port, peers):
            stream = await open_stream(endpoint(port, max_message_bytes=4 * MiB), "/test.Echo/Chat")
            try:
                await asyncio.sleep(0.5)  # the caller does not read yet
                sent_unread = peers[0].sent
                return sent_unread, [await stream.read(), await stream.read(), await stream.read()]
            finally:
                stream.close()

    sent_unread, messages = run(main())
    assert sent_unread <= MiB  # the stream window: what waits behind an unread message
    assert messages == [b"first", second, None]


# ---------------------------------------------------------------------- how streams end


def _ends_with(script: Script, max_message_bytes: int = MiB) -> GrpcError:
    async def main() -> GrpcError:
        async with scripted(script) as (port, _):
            stream = await open_stream(endpoint(port, max_message_bytes=max_message_bytes), "/test.Echo/Chat")
            try:
                return await expect_error(stream)
            finally:
                stream.close()

    return run(main())


def test_a_trailers_only_response_carries_the_status_and_its_message_percent_decoded() -> None:
    async def script(peer: Peer) -> None:
        peer.head([*OK_HEAD, (b"grpc-status", b"16"), (b"grpc-message", b"bad%20token%3A%20%E2%9C%93")], end=True)
        await peer.drain_events()

    error = _ends_with(script)
    assert (error.code, error.message) == (StatusCode.UNAUTHENTICATED, "bad token: ✓")


def test_grpc_message_is_decoded_leniently() -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        peer.trailers(13, b"50%25 done, %zz %4 %E2%28")  # invalid escapes stay; invalid UTF-8 is replaced
        await peer.drain_events()

    error = _ends_with(script)
    assert (error.code, error.message) == (StatusCode.INTERNAL, "50% done, %zz %4 \ufffd(")


@pytest.mark.parametrize(("status", "end", "code"), [
    (b"503", True, StatusCode.UNAVAILABLE), (b"404", False, StatusCode.UNIMPLEMENTED),
    (b"401", True, StatusCode.UNAUTHENTICATED), (b"418", True, StatusCode.UNKNOWN)])
def test_an_http_status_without_grpc_status_is_mapped(status: bytes, end: bool, code: StatusCode) -> None:
    async def script(peer: Peer) -> None:
        peer.head([(b":status", status)], end=end)
        await peer.drain_events()

    error = _ends_with(script)
    assert error.code == code and status.decode() in error.message


@pytest.mark.parametrize(("act", "code", "text"), [
    (lambda peer: peer.data(framed(b"abc")[:6], end=True), StatusCode.INTERNAL, "without a status"),
    (lambda peer: (peer.data(framed(b"abc")[:6]), peer.trailers(0)), StatusCode.INTERNAL, "middle of a message"),
    (lambda peer: peer.trailers(99, b"odd"), StatusCode.UNKNOWN, "odd"),
    (lambda peer: peer.data(b"\x01" + framed(b"abc")[1:]), StatusCode.INTERNAL, "compressed"),
    (lambda peer: (peer.conn.reset_stream(peer.stream_id, ErrorCodes.REFUSED_STREAM), peer.flush()),
     StatusCode.UNAVAILABLE, "REFUSED_STREAM"),
    (lambda peer: (peer.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings"), peer.flush()),
     StatusCode.UNAVAILABLE, "GOAWAY ENHANCE_YOUR_CALM: too_many_pings"),
], ids=["data ends the stream", "ok mid-message", "unknown code", "compressed", "reset", "goaway"])
def test_broken_ends_fail_the_stream(act: Callable[[Peer], Any], code: StatusCode, text: str) -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        act(peer)
        await peer.drain_events()

    error = _ends_with(script)
    assert error.code == code and text in error.message, error


def test_a_response_that_is_not_grpc_fails() -> None:
    async def script(peer: Peer) -> None:
        peer.head([(b":status", b"200"), (b"content-type", b"text/html")])
        await peer.drain_events()

    error = _ends_with(script)
    assert error.code == StatusCode.UNKNOWN and "text/html" in error.message


def test_close_fails_a_waiting_read_with_cancelled() -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        await peer.drain_events()

    async def main() -> GrpcError:
        async with scripted(script) as (port, _):
            stream = await open_stream(endpoint(port), "/test.Echo/Chat")
            reader = asyncio.get_running_loop().create_task(stream.read())
            await asyncio.sleep(0.05)
            stream.close()
            with pytest.raises(GrpcError) as info:
                await reader
            return info.value

    assert run(main()).code == StatusCode.CANCELLED


# ---------------------------------------------------------------------- keepalive


def test_a_silent_server_fails_the_stream_after_keepalive_and_its_timeout() -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        await asyncio.sleep(30)  # reads nothing more: the PING is never answered

    async def main() -> tuple[GrpcError, float]:
        async with scripted(script) as (port, _):
            stream = await open_stream(endpoint(port, keepalive_s=0.3, keepalive_timeout_s=0.3), "/test.Echo/Chat")
            started = time.monotonic()
            try:
                return await expect_error(stream), time.monotonic() - started
            finally:
                stream.close()

    error, elapsed = run(main())
    assert error.code == StatusCode.UNAVAILABLE and "keepalive PING within 0.3 s" in error.message
    assert 0.5 <= elapsed < 3.0


def test_a_server_that_answers_pings_keeps_a_quiet_stream() -> None:
    async def script(peer: Peer) -> None:
        peer.head()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # answers PINGs (h2 does) and sends nothing else
            try:
                await peer.receive(timeout_s=deadline - time.monotonic())
            except TimeoutError:
                break
        peer.data(framed(b"still here"))
        await peer.drain_events()

    async def main() -> tuple[bytes | None, int]:
        async with scripted(script) as (port, peers):
            stream = await open_stream(endpoint(port, keepalive_s=0.2, keepalive_timeout_s=0.5), "/test.Echo/Chat")
            try:
                message = await stream.read()
            finally:
                stream.close()
            return message, sum(isinstance(e, h2.events.PingReceived) for e in peers[0].events)

    message, pings = run(main())
    assert message == b"still here"
    assert pings >= 3  # about one per 0.2 s of quiet


# ---------------------------------------------------------------------- connecting


def test_a_refused_connection_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        with pytest.raises(GrpcError) as info:
            run(open_stream(endpoint(port), "/test.Echo/Chat"))
    assert info.value.code == StatusCode.UNAVAILABLE
    assert info.value.message.startswith(f"cannot connect to 127.0.0.1:{port}: ")


def test_a_server_that_never_speaks_http2_times_the_connect_out() -> None:
    async def main() -> GrpcError:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            with pytest.raises(GrpcError) as info:
                await open_stream(endpoint(server.sockets[0].getsockname()[1], connect_timeout_s=0.3), "/x/y")
            return info.value
        finally:
            server.close()

    error = run(main())
    assert error.code == StatusCode.UNAVAILABLE and "within 0.3 s" in error.message


def test_an_http1_server_is_named_as_such() -> None:
    async def main() -> GrpcError:
        async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(100)
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await asyncio.sleep(30)

        server = await asyncio.start_server(http1, "127.0.0.1", 0)
        try:
            with pytest.raises(GrpcError) as info:
                await open_stream(endpoint(server.sockets[0].getsockname()[1]), "/x/y")
            return info.value
        finally:
            server.close()

    error = run(main())
    assert error.code == StatusCode.UNAVAILABLE and "answered in HTTP/1.1" in error.message


@pytest.mark.parametrize("metadata", [[("Authorization", "x")], [("authorization", "Bearer a\nb")],
                                      [("content-type", "text/plain")], [("grpc-timeout", "1S")],
                                      [("authorization", "Bearer é")]])
def test_metadata_a_call_cannot_send_is_refused_before_connecting(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(GrpcError) as info:
        run(open_stream(Endpoint("192.0.2.1", 9), "/x/y", metadata))  # TEST-NET: would hang if tried
    assert info.value.code == StatusCode.INTERNAL and repr(metadata[0][0]) in info.value.message


# ---------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    assert shutil.which("openssl") is not None, "openssl makes the test certificate: `make test` installs it"
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cp.crt", tmp / "cp.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cp.test",
                    "-addext", "subjectAltName=DNS:cp.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(certificate: tuple[Path, Path]) -> Iterator[GrpcServer]:
    cert, key = certificate
    server = GrpcServer(grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    try:
        yield server
    finally:
        server.stop()


def test_tls_with_a_ca_file_and_a_server_name(tls_server: GrpcServer, certificate: tuple[Path, Path]) -> None:
    async def main() -> bytes | None:
        tls = tls_context(str(certificate[0]))
        stream = await open_stream(endpoint(tls_server.port, tls=tls, server_name="cp.test"), "/test.Echo/Chat",
                                   [("authorization", "Bearer tls")])
        try:
            return await stream.read()
        finally:
            stream.close()

    assert run(main()) == b"Bearer tls"


@pytest.mark.parametrize(("ca", "name", "text"), [
    (False, "cp.test", "TLS certificate not trusted"),  # the system's roots do not hold it
    (True, None, "TLS certificate not trusted"),  # 127.0.0.1 is not in the certificate
    (True, "other.test", "TLS certificate not trusted")])
def test_tls_refuses_a_server_it_cannot_verify(tls_server: GrpcServer, certificate: tuple[Path, Path],
                                               ca: bool, name: str | None, text: str) -> None:
    tls = tls_context(str(certificate[0]) if ca else None)
    with pytest.raises(GrpcError) as info:
        run(open_stream(endpoint(tls_server.port, tls=tls, server_name=name), "/test.Echo/Chat"))
    assert info.value.code == StatusCode.UNAVAILABLE and text in info.value.message


def test_tls_without_alpn_h2_is_refused(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)  # and no ALPN

    async def script(peer: Peer) -> None:
        raise AssertionError("the client sent a request head")

    async def main() -> tuple[GrpcError, list[h2.events.Event]]:
        async with scripted(script, tls=server_tls) as (port, peers):
            with pytest.raises(GrpcError) as info:
                await open_stream(endpoint(port, tls=tls_context(str(cert)), server_name="cp.test"), "/x/y")
            for _ in range(100):
                if peers and peers[0].reader.at_eof():
                    break
                await asyncio.sleep(0.02)
            return info.value, peers[0].events

    error, events = run(main())
    assert error.code == StatusCode.UNAVAILABLE and "ALPN h2" in error.message
    assert events == []  # not one HTTP/2 frame went to it


def test_a_ca_file_that_holds_no_certificate_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(OSError) as info:
        tls_context(str(bad))
    assert info.value.filename == str(bad) and "no CA certificate" in str(info.value.strerror)
    with pytest.raises(FileNotFoundError):
        tls_context(str(tmp_path / "missing.pem"))


# ---------------------------------------------------------------------- the proxy process


def test_the_proxy_process_does_not_import_grpc() -> None:
    code = ("import dataplane.cli, dataplane.process.supervisor, dataplane.process.channel, dataplane.proxy, "
            "dataplane.process.worker; import sys; assert 'grpc' not in sys.modules, 'grpc imported'")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
