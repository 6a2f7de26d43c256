"""A small HTTP/1.1 JSON server on asyncio streams and h11, for the control plane's API.

API traffic is a few requests a second from the CLI and agents, so streams and h11 are
plenty; what matters is that it is bounded (head, body, idle time, connections), that no
one who has not authenticated can hold what authenticated callers need, and that every
error, protocol errors included, is a JSON body. The request handler is a plain function
(``Request`` in, ``Reply`` out) and knows nothing about sockets.

Connections are admitted in two pools. A new connection is *unauthenticated* until one of
its requests presents valid credentials: it must get there within
``unauthenticated_timeout_s`` of being accepted (TLS handshake and request head included),
and when the unauthenticated pool (or its source's share of it) is full, the oldest
unauthenticated connection is closed to make room. So idle or trickling sockets, however
many, delay a real client by at most the time it takes to send its request. Credentials are
checked as soon as the head has arrived (``admit``), before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

from controlplane.identity import Identity
from controlplane.limits import Limits

log = logging.getLogger("turnout.controlplane.http")

# Every reply says what answered, so the CLI can tell a turnout control plane from any other server.
SERVER = "turnout-control-plane"
# TLS handshakes from a scanner must not pile up.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# A whole request, from its first byte: trickling bytes cannot hold a connection for longer
# (at this size, 1 MiB needs only 35 KB/s). nginx's client_header_timeout is 60 s.
REQUEST_TIMEOUT_S = 30.0
# After an error reply, unread input is discarded this long (at most this much) before
# closing: closing with unread bytes makes the kernel send a reset, which can destroy the
# reply before the client reads it. nginx's lingering_time is 30 s, lingering_timeout 5 s.
LINGER_S = 2.0
LINGER_MAX_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Request:
    """One API request: method, path as sent (still percent-encoded), query, headers (lower-case
    names), body, the peer's address and, once admitted, the caller's identity."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]]
    body: bytes
    peer: str = ""
    identity: Identity | None = None

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


# Checks a request's head (its body is still unread): the request with its identity to go
# on with, or the reply that refuses it.
Admit = Callable[[Request], Awaitable["Request | Reply"]]


def json_reply(status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    """A JSON response."""
    return Reply(status, (json.dumps(data, indent=2) + "\n").encode(), "application/json", tuple(headers))


def error_reply(status: int, kind: str, message: str, headers: Sequence[tuple[str, str]] = (),
                **extra: Any) -> Reply:
    """The API's error shape: ``{"error": kind, "message": ..., **extra}``."""
    return json_reply(status, {"error": kind, "message": message, **extra}, headers)


async def _admit_all(request: Request) -> Request | Reply:
    return request


class _Refused(Exception):
    """A request refused before the handler saw it; the reply is sent and the connection closed."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class _Connection:
    """One accepted connection: its task, where it comes from, and its state."""

    __slots__ = ("task", "source", "authenticated", "idle", "deadline")

    def __init__(self, task: asyncio.Task[None], source: str, deadline: float) -> None:
        self.task = task
        self.source = source
        self.authenticated = False
        self.idle = True  # between requests: safe to cancel at shutdown
        self.deadline = deadline  # until authenticated: when it must have done so


class HttpServer:
    """Serves ``handler`` on one address until ``close``; plain HTTP or HTTPS.

    ``admit`` authenticates a request from its head (see ``Admit``); ``limits`` bounds heads,
    bodies, connections and idle time.
    """

    def __init__(self, handler: Callable[[Request], Reply], admit: Admit = _admit_all,
                 limits: Limits | None = None) -> None:
        self._handler = handler
        self._admit = admit
        self.limits = limits or Limits()
        self._server: asyncio.Server | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}
        # Unauthenticated connections, oldest first, overall and by source: who is evicted first.
        self._unauthenticated: OrderedDict[asyncio.Task[None], _Connection] = OrderedDict()
        self._by_source: dict[str, OrderedDict[asyncio.Task[None], _Connection]] = {}
        self._closing = False
        self.evicted = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> tuple[str, int]:
        """Listen; returns the bound (host, port), so port 0 picks a free one."""
        # TLS is started per connection after it is admitted to a pool, so pending handshakes
        # count against the unauthenticated limits like any other silent socket.
        self._ssl_context = ssl_context
        self._server = await asyncio.start_server(self._accept, host, port)
        bound = self._server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    @property
    def connections(self) -> int:
        """Open connections."""
        return len(self._connections)

    @property
    def unauthenticated(self) -> int:
        """Open connections that have not authenticated yet."""
        return len(self._unauthenticated)

    async def close(self, grace_s: float) -> None:
        """Stop accepting, close idle connections, give requests in flight ``grace_s``, then cut the rest."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, conn in list(self._connections.items()):
            if conn.idle:
                task.cancel()
        pending = list(self._connections)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # ------------------------------------------------------------------ pools

    def _admit_connection(self, conn: _Connection) -> None:
        """Add a new connection to the unauthenticated pool, evicting the oldest to make room."""
        limits = self.limits
        same_source = self._by_source.get(conn.source)
        if same_source is not None and len(same_source) >= limits.max_unauthenticated_per_source:
            self._evict(next(iter(same_source.values())))
        if len(self._unauthenticated) >= limits.max_unauthenticated_connections:
            self._evict(next(iter(self._unauthenticated.values())))
        self._connections[conn.task] = conn
        self._unauthenticated[conn.task] = conn
        self._by_source.setdefault(conn.source, OrderedDict())[conn.task] = conn

    def _evict(self, conn: _Connection) -> None:
        self.evicted += 1
        self._leave_unauthenticated(conn)
        conn.task.cancel()

    def _leave_unauthenticated(self, conn: _Connection) -> None:
        if self._unauthenticated.pop(conn.task, None) is None:
            return
        same_source = self._by_source[conn.source]
        del same_source[conn.task]
        if not same_source:
            del self._by_source[conn.source]

    def _authenticated(self, conn: _Connection) -> bool:
        """Move a connection whose request authenticated to the authenticated pool; False when it is full."""
        if conn.authenticated:
            return True
        if len(self._connections) - len(self._unauthenticated) >= self.limits.max_connections:
            return False
        conn.authenticated = True
        self._leave_unauthenticated(conn)
        return True

    # ------------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) else "unix"
        loop = asyncio.get_running_loop()
        conn = _Connection(task, source, loop.time() + self.limits.unauthenticated_timeout_s)
        if self._closing:
            writer.close()
            return
        self._admit_connection(conn)
        try:
            if self._ssl_context is not None:
                async with asyncio.timeout(min(TLS_HANDSHAKE_TIMEOUT_S, self.limits.unauthenticated_timeout_s)):
                    await writer.start_tls(self._ssl_context)
            await self._serve(conn, reader, writer, _peer_text(peer))
        except (ConnectionError, TimeoutError, ssl.SSLError, OSError):
            pass  # the peer went away, stalled or never finished its handshake; nothing to answer
        except asyncio.CancelledError:
            # close() cancels idle connections and eviction the oldest unauthenticated ones.
            # Ending normally matters: on Python 3.11 the streams callback calls exception()
            # on a cancelled task and logs the error.
            pass
        finally:
            self._leave_unauthenticated(conn)
            del self._connections[task]
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     peer: str) -> None:
        conn_h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        while not self._closing:
            try:
                request = await self._read_request(conn, conn_h11, reader, writer, peer)
            except _Refused as refused:
                await self._send(conn_h11, writer, refused.reply, close=True)
                await _linger(reader, writer)
                return
            except h11.RemoteProtocolError as exc:
                if conn_h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    reply = error_reply(431, "too_large", "request head over the limit of "
                                        f"{self.limits.max_head_bytes} bytes") if exc.error_status_hint == 431 \
                        else error_reply(exc.error_status_hint, "bad_request", f"malformed HTTP request: {exc}")
                    await self._send(conn_h11, writer, reply, close=True)
                    await _linger(reader, writer)
                return
            if request is None:
                return
            try:
                reply = self._handler(request)
            except Exception as exc:  # a handler bug must answer 500, not kill the listener
                log.exception("API handler failed on %s %s", request.method, request.path)
                reply = error_reply(500, "internal", f"internal error: {exc.__class__.__name__}")
            await self._send(conn_h11, writer, reply, close=self._closing)
            if conn_h11.our_state is h11.MUST_CLOSE or conn_h11.their_state is h11.MUST_CLOSE:
                return
            conn_h11.start_next_cycle()

    async def _read_request(self, conn: _Connection, conn_h11: h11.Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, peer: str) -> Request | None:
        limits = self.limits
        request: Request | None = None
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        # Bytes of this request cycle given to h11: with what h11 still holds once the head is
        # parsed, the head's exact size (h11 only bounds a head that is still incomplete).
        fed = len(conn_h11.trailing_data[0])
        while True:
            event = conn_h11.next_event()
            if event is h11.NEED_DATA:
                started = request is not None or bool(conn_h11.trailing_data[0])
                if started and deadline is None:
                    deadline = loop.time() + REQUEST_TIMEOUT_S
                timeout_s = limits.idle_timeout_s if deadline is None else deadline - loop.time()
                if not conn.authenticated:
                    timeout_s = min(timeout_s, conn.deadline - loop.time())
                if timeout_s <= 0:
                    if not conn.authenticated and not started:
                        raise TimeoutError  # connected, sent nothing: close quietly
                    raise _Refused(error_reply(408, "timeout", "request not received in time"))
                # Cancellable at shutdown only while no byte of the next request has arrived.
                conn.idle = not started
                try:
                    # asyncio.timeout, not wait_for: no task per read (3.11's wait_for makes one).
                    async with asyncio.timeout(timeout_s):
                        data = await reader.read(65536)
                except TimeoutError:
                    if not started:
                        raise  # an idle keep-alive connection: close it quietly
                    continue  # the deadline checks above answer 408
                finally:
                    conn.idle = False
                if deadline is None and data:
                    deadline = loop.time() + REQUEST_TIMEOUT_S
                fed += len(data)
                conn_h11.receive_data(data)
            elif isinstance(event, h11.Request):
                head_bytes = fed - len(conn_h11.trailing_data[0])
                if head_bytes > limits.max_head_bytes:
                    raise _Refused(error_reply(431, "too_large", f"request head of {head_bytes} bytes is over the "
                                               f"limit of {limits.max_head_bytes}"))
                self._check_length(event)
                admitted = await self._admit(_request(event, b"", peer))
                if isinstance(admitted, Reply):
                    raise _Refused(admitted)
                request = admitted
                if request.identity is not None and not self._authenticated(conn):
                    raise _Refused(error_reply(503, "overloaded", f"{self.limits.max_connections} authenticated "
                                               "connections are open, the most allowed; retry shortly",
                                               [("retry-after", "1")]))
                if conn_h11.they_are_waiting_for_100_continue:
                    writer.write(conn_h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise _Refused(self._too_large())
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return replace(request, body=bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _check_length(self, head: h11.Request) -> None:
        for name, value in head.headers:
            # h11 has checked it is one decimal number.
            if name == b"content-length" and int(value) > self.limits.max_body_bytes:
                raise _Refused(self._too_large())

    def _too_large(self) -> Reply:
        return error_reply(413, "too_large", f"request body larger than {self.limits.max_body_bytes} bytes")

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, reply: Reply, close: bool) -> None:
        headers = [("server", SERVER)]
        if reply.status != 204:
            headers += [("content-type", reply.content_type), ("content-length", str(len(reply.body)))]
        headers.extend(reply.headers)
        if close:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=reply.status, headers=headers,
                                           reason=_REASONS.get(reply.status, b""))) or b"")
        if reply.body:
            writer.write(conn.send(h11.Data(data=reply.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(self.limits.idle_timeout_s):
            await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # The peer may be gone already (a TLS client that gave up on a plain-HTTP reply).
    with contextlib.suppress(OSError):
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


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return "unix"


def _request(head: h11.Request, body: bytes, peer: str) -> Request:
    url = urlsplit(head.target.decode("latin-1"))
    query: dict[str, list[str]] = {}
    for key, value in parse_qsl(url.query, keep_blank_values=True):
        query.setdefault(key, []).append(value)
    headers: dict[str, list[str]] = {}
    for raw_name, raw_value in head.headers:
        headers.setdefault(raw_name.decode("latin-1"), []).append(raw_value.decode("latin-1"))
    return Request(head.method.decode("latin-1"), url.path, query, headers, body, peer)
