"""A small HTTP/1.1 JSON server on asyncio streams and h11, for the control plane's API.

API traffic is a few requests a second from the CLI and agents, so streams and h11 are
plenty; what matters is that it is bounded (head, body, idle time, connections) and that
every error, protocol errors included, is a JSON body. The request handler is a plain
function (``Request`` in, ``Reply`` out) and knows nothing about sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

log = logging.getLogger("turnout.controlplane.http")

# A session spec is a few KiB even with long match trees; 1 MiB refuses abuse, never a real session.
MAX_BODY_BYTES = 1 << 20
# The same head budget as the proxy's (Envoy's 60 KiB, rounded up).
MAX_HEAD_BYTES = 64 * 1024
# An idle keep-alive connection is closed after this: nginx's keepalive_timeout is 75 s.
IDLE_TIMEOUT_S = 30.0
# A whole request, from its first byte: trickling bytes cannot hold a connection for longer
# (at this size, 1 MiB needs only 35 KB/s). nginx's client_header_timeout is 60 s.
REQUEST_TIMEOUT_S = 30.0
# TLS handshakes from a scanner must not pile up.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# Connections beyond this are closed at once: the CLI opens one per command.
MAX_CONNECTIONS = 512
# After an error reply, unread input is discarded this long (at most this much) before
# closing: closing with unread bytes makes the kernel send a reset, which can destroy the
# reply before the client reads it. nginx's lingering_time is 30 s, lingering_timeout 5 s.
LINGER_S = 2.0
LINGER_MAX_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Request:
    """One API request: method, path as sent (still percent-encoded), query, headers (lower-case names), body."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of a header that must appear at most once; None when absent or repeated."""
        values = self.headers.get(name)
        return values[0] if values is not None and len(values) == 1 else None


@dataclass(frozen=True, slots=True)
class Reply:
    """One API response; a 204 has an empty body and no content type."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_reply(status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    """A JSON response."""
    return Reply(status, (json.dumps(data, indent=2) + "\n").encode(), "application/json", tuple(headers))


def error_reply(status: int, kind: str, message: str, headers: Sequence[tuple[str, str]] = (),
                **extra: Any) -> Reply:
    """The API's error shape: ``{"error": kind, "message": ..., **extra}``."""
    return json_reply(status, {"error": kind, "message": message, **extra}, headers)


class _Refused(Exception):
    """A request refused before the handler saw it; the reply is sent and the connection closed."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class HttpServer:
    """Serves ``handler`` on one address until ``close``; plain HTTP or HTTPS."""

    def __init__(self, handler: Callable[[Request], Reply]) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        # Connection task -> whether it is between requests (safe to cancel at shutdown).
        self._connections: dict[asyncio.Task[None], bool] = {}
        self._closing = False

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen; returns the bound (host, port), so port 0 picks a free one."""
        self._server = await asyncio.start_server(
            self._accept, host, port, ssl=ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if ssl_context is not None else None,
        )
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def close(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, give requests in flight ``grace_s``, then cut the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, idle in list(self._connections.items()):
            if idle:
                task.cancel()
        pending = list(self._connections)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._closing or len(self._connections) >= MAX_CONNECTIONS:
            writer.close()
            return
        self._connections[task] = True
        try:
            await self._serve(task, reader, writer)
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass  # the peer went away or stalled; nothing to answer
        except asyncio.CancelledError:
            # close() cancels idle connections. Ending normally matters: on Python 3.11 the
            # streams callback calls exception() on a cancelled task and logs the error.
            pass
        finally:
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, task: asyncio.Task[None], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while not self._closing:
            try:
                request = await self._read_request(task, conn, reader, writer)
            except _Refused as refused:
                await self._send(conn, writer, refused.reply, close=True)
                await _linger(reader, writer)
                return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    reply = error_reply(exc.error_status_hint, "bad_request", f"malformed HTTP request: {exc}")
                    await self._send(conn, writer, reply, close=True)
                    await _linger(reader, writer)
                return
            if request is None:
                return
            try:
                reply = self._handler(request)
            except Exception as exc:  # a handler bug must answer 500, not kill the listener
                log.exception("API handler failed on %s %s", request.method, request.path)
                reply = error_reply(500, "internal", f"internal error: {exc.__class__.__name__}")
            await self._send(conn, writer, reply, close=self._closing)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _read_request(self, task: asyncio.Task[None], conn: h11.Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Request | None:
        head: h11.Request | None = None
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                started = head is not None or bool(conn.trailing_data[0])
                if started and deadline is None:
                    deadline = loop.time() + REQUEST_TIMEOUT_S
                timeout_s = IDLE_TIMEOUT_S if deadline is None else deadline - loop.time()
                if timeout_s <= 0:
                    raise _Refused(error_reply(408, "timeout", f"request not received within {REQUEST_TIMEOUT_S} s"))
                # Cancellable at shutdown only while no byte of the next request has arrived.
                self._connections[task] = not started
                try:
                    # asyncio.timeout, not wait_for: no task per read (3.11's wait_for makes one).
                    async with asyncio.timeout(timeout_s):
                        data = await reader.read(65536)
                except TimeoutError:
                    if not started:
                        raise  # an idle keep-alive connection: close it quietly
                    continue  # the deadline check above answers 408
                finally:
                    self._connections[task] = False
                if deadline is None and data:
                    deadline = loop.time() + REQUEST_TIMEOUT_S
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
                self._check_length(event)
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _Refused(_too_large())
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return _request(head, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    @staticmethod
    def _check_length(head: h11.Request) -> None:
        for name, value in head.headers:
            # h11 has checked it is one decimal number.
            if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                raise _Refused(_too_large())

    @staticmethod
    async def _send(conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, close: bool) -> None:
        headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body)))] \
            if reply.status != 204 else []
        headers.extend(reply.headers)
        if close:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers,
                                           reason=_REASONS.get(reply.status, b""))) or b"")
        if reply.body:
            writer.write(conn.send(h11.Data(data=reply.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    if writer.can_write_eof():
        writer.write_eof()
    discarded = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            while discarded < LINGER_MAX_BYTES:
                data = await reader.read(65536)
                if not data:
                    return
                discarded += len(data)


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def _too_large() -> Reply:
    return error_reply(413, "too_large", f"request body larger than {MAX_BODY_BYTES} bytes")


def _request(head: h11.Request, body: bytes) -> Request:
    url = urlsplit(head.target.decode("latin-1"))
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(url.query, keep_blank_values=True):
        query.setdefault(key, []).append(value)
    headers: dict[str, list[str]] = {}
    for raw_name, raw_value in head.headers:
        headers.setdefault(raw_name.decode("latin-1"), []).append(raw_value.decode("latin-1"))
    return Request(head.method.decode("latin-1"), url.path, query, headers, body)
