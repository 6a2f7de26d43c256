"""Upstream HTTP/1.1 connections and the per-destination keep-alive pool.

A pooled connection belongs to one destination address for its whole life: routes change
often, so a connection is never handed to a request for another address. Idle
connections are swept by the worker's once-a-second tick.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from dataplane.errors import HttpError
from dataplane.http1.framing import ChunkedDecoder, ContentLengthDecoder, Decoder, UntilCloseDecoder, chunk, last_chunk
from dataplane.http1.scan import check_head, find_head_end
from dataplane.http1.semantics import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, ResponsePlan, plan_response
from filters import Address

if TYPE_CHECKING:
    from dataplane.worker import WorkerState


class UpstreamUser:
    """What an upstream connection reports to the exchange using it."""

    def on_informational(self, status: int) -> None:
        """A 1xx response other than 101 arrived."""

    def on_response_head(self, plan: ResponsePlan) -> None:
        """The final response head arrived."""

    def flush_response_head(self) -> None:
        """Everything received so far was handed over: send what is being held."""

    def on_response_data(self, data: bytes) -> None:
        """Response body bytes arrived."""

    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response is complete."""

    def on_tunnel_data(self, data: bytes) -> None:
        """Bytes from an upgraded (WebSocket) connection."""

    def on_tunnel_end(self) -> None:
        """The upstream closed an upgraded connection in an orderly way."""

    def on_upstream_error(self, error: HttpError, response_started: bool) -> None:
        """The connection failed or sent something invalid."""

    def on_upstream_writable(self, writable: bool) -> None:
        """Upstream write buffer crossed a watermark."""


_IDLE, _HEAD, _BODY, _TUNNEL, _CLOSED = range(5)
NO_TRAILERS: list[tuple[bytes, bytes]] = []  # never changed: passed to users only to read


class UpstreamConnection(asyncio.Protocol):
    """One connection to one upstream address, used by one exchange at a time."""

    def __init__(self, pool: Pool, address: Address) -> None:
        self.pool = pool
        self.address = address
        self.key = (address.host, address.port)  # the pool's key: hashed in C, unlike Address
        self.transport: asyncio.Transport | None = None
        self.user: UpstreamUser | None = None
        self.reused = False  # served an earlier exchange: may have been closed by the peer
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response
        self._phase = _IDLE
        self._buf = b""
        self._decoder: Decoder | None = None
        self._method = b"GET"
        self._keep_alive = True
        self._ended: list[tuple[bytes, bytes]] | None = None  # trailers of a response not yet reported
        self._chunked = False  # the current request's body is chunked

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        limits = self.pool.state.limits
        transport.set_write_buffer_limits(limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _BODY:
            assert self._decoder is not None
            try:
                rest = self._decoder.feed(data)
            except HttpError as exc:
                self._fail(exc)
                return
            if rest:
                self._keep_alive = False  # bytes after the response: never reuse
            self._report_end()
            return
        if phase == _HEAD:
            self.got_bytes = True
            self._buf = self._buf + data if self._buf else data
            self._parse_head()
        elif phase == _TUNNEL:
            if self.user is not None:
                self.user.on_tunnel_data(data)
        else:
            # Unsolicited bytes on an idle connection: it is out of step; drop it.
            self.close()

    def eof_received(self) -> bool | None:
        if self._phase == _TUNNEL:
            user = self.user
            self.user = None  # an orderly end, not an error
            if user is not None:
                user.on_tunnel_end()
            return None
        if self._phase == _BODY and self._decoder is not None:
            try:
                self._decoder.eof()
            except HttpError as exc:
                self._fail(exc)
                return None
            self._report_end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        phase = self._phase
        self._phase = _CLOSED
        self.pool.forget(self)
        user = self.user
        if user is None:
            return
        self.user = None
        if phase == _TUNNEL:
            user.on_upstream_error(HttpError(502, "upstream closed", "upstream_closed"), True)
        elif phase in (_HEAD, _BODY):
            started = phase == _BODY
            user.on_upstream_error(
                HttpError(502, "upstream closed the connection" + (" mid-response" if started else ""),
                          "upstream_reset"),
                started,
            )

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.on_upstream_writable(True)

    # ------------------------------------------------------------------ used by exchanges

    @property
    def open(self) -> bool:
        """Whether the connection can still carry a request."""
        return self._phase != _CLOSED and self.transport is not None and not self.transport.is_closing()

    def begin(self, user: UpstreamUser, method: bytes, head: bytes, body: int = BODY_NONE) -> None:
        """Start an exchange: send the request head (framed for ``body``, a ``BODY_*``) and
        expect a response."""
        self.user = user
        self._method = method
        self._chunked = body == BODY_CHUNKED
        self._phase = _HEAD
        self._buf = b""
        self._keep_alive = True
        self.got_bytes = False
        assert self.transport is not None
        self.transport.write(head)

    def send_body(self, data: bytes) -> None:
        """Send request body bytes, as a chunk when the body is chunked."""
        assert self.transport is not None
        if self._chunked:
            self.transport.writelines(chunk(data))
        else:
            self.transport.write(data)

    def end_body(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The request body is complete: the last chunk (with trailers) when it is chunked."""
        if self._chunked:
            assert self.transport is not None
            self.transport.write(last_chunk(trailers))

    def write(self, data: bytes) -> None:
        """Send bytes as they are (tunnel bytes, a mirrored copy's body)."""
        assert self.transport is not None
        self.transport.write(data)

    def writelines(self, parts: tuple[bytes, ...] | list[bytes]) -> None:
        """Send several buffers."""
        assert self.transport is not None
        self.transport.writelines(parts)

    def write_eof(self) -> None:
        """Half-close a tunnel: nothing more will be sent."""
        transport = self.transport
        if transport is not None and not transport.is_closing() and transport.can_write_eof():
            transport.write_eof()

    def pause_reading(self) -> None:
        """Stop reading the response (the client is slow)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the response again."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool if the response allows it, else close."""
        self.user = None
        if reusable and self._keep_alive and self._phase == _IDLE and self.open:
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        """Close now; pending request bytes are discarded."""
        self.user = None
        if self._phase != _CLOSED:
            self._phase = _CLOSED
            self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ response parsing

    def _parse_head(self) -> None:
        state = self.pool.state
        limits = state.limits
        while self._phase == _HEAD:
            buf = self._buf
            try:
                end = find_head_end(buf, 0, limits.max_head_bytes, "response")
                if end == -1:
                    return
                head = buf[:end]
                check_head(head, limits.max_header_count, limits.max_request_line_bytes, "response")
                parsed = state.codec.parse_response(head)
                plan = plan_response(parsed, self._method)
            except HttpError as exc:
                self._fail(exc)
                return
            rest = buf[end:]
            self._buf = b""
            user = self.user
            assert user is not None
            status = plan.status
            if status < 200:
                if status == 101:
                    self._phase = _TUNNEL
                    self._keep_alive = False
                    user.on_response_head(plan)
                    if rest and self._phase == _TUNNEL and self.user is user:
                        user.on_tunnel_data(rest)
                    return
                user.on_informational(status)
                self._buf = rest
                continue
            body = plan.body
            length = plan.content_length if body == BODY_LENGTH else 0
            if body <= BODY_LENGTH and len(rest) >= length:
                self._whole_response(user, plan, rest, length)
                return
            self._keep_alive = plan.keep_alive
            self._phase = _BODY
            self._decoder = self._make_decoder(plan)
            user.on_response_head(plan)
            self._decoder.start()
            if rest and self._phase == _BODY:
                self.data_received(rest)
            elif rest:
                self._keep_alive = False
            self._report_end()
            user.flush_response_head()

    def _whole_response(self, user: UpstreamUser, plan: ResponsePlan, rest: bytes, length: int) -> None:
        # The usual small response: head and the whole body in one read. The same calls a
        # ContentLengthDecoder would make, without one.
        self._keep_alive = plan.keep_alive and len(rest) == length  # bytes after it: never reuse
        self._phase = _BODY
        user.on_response_head(plan)
        if length and self.user is not None:
            self.user.on_response_data(rest if len(rest) == length else rest[:length])
        self._phase = _IDLE
        if self.user is not None:
            self.user.on_response_end(NO_TRAILERS)

    def _make_decoder(self, plan: ResponsePlan) -> Decoder:
        if plan.body == BODY_NONE:
            return ContentLengthDecoder(0, self._on_data, self._on_end)
        if plan.body == BODY_LENGTH:
            return ContentLengthDecoder(plan.content_length, self._on_data, self._on_end)
        if plan.body == BODY_CHUNKED:
            limits = self.pool.state.limits
            return ChunkedDecoder(self._on_data, self._on_end, limits.max_chunk_line_bytes,
                                  limits.max_trailer_bytes, status=502)
        return UntilCloseDecoder(self._on_data, self._on_end)

    def _on_data(self, data: bytes) -> None:
        if self.user is not None:
            self.user.on_response_data(data)

    def _on_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        # Reported by _report_end once the caller knows whether bytes followed the response:
        # the user hands the connection back to the pool from on_response_end.
        self._phase = _IDLE
        self._decoder = None
        self._ended = trailers

    def _report_end(self) -> None:
        trailers = self._ended
        if trailers is None:
            return
        self._ended = None
        user = self.user
        if user is not None:
            user.on_response_end(trailers)

    def _fail(self, exc: HttpError) -> None:
        user = self.user
        started = self._phase == _BODY
        self.close()
        if user is not None:
            user.on_upstream_error(exc, started)


class Pool:
    """Idle keep-alive connections per destination, and new connections when none is idle."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()

    def acquire(self, address: Address) -> UpstreamConnection | None:
        """An idle open connection to ``address``, most recently used first, or None."""
        idle = self._idle.get((address.host, address.port))
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn._phase != _CLOSED and transport is not None and not transport.is_closing():  # conn.open
                conn.reused = True
                return conn
        return None

    async def connect(self, address: Address) -> UpstreamConnection:
        """Open a new connection; raises ``HttpError`` 503 on failure or timeout."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], UpstreamConnection] = lambda: UpstreamConnection(self, address)  # noqa: E731
        try:
            async with asyncio.timeout(self.state.limits.upstream_connect_timeout_s):
                _, protocol = await loop.create_connection(factory, address.host, address.port)
        except TimeoutError:
            raise HttpError(503, f"connect to {address} timed out", "connect_timeout") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise HttpError(503, f"connect to {address} failed: {reason}", "connect_failed") from None
        self._all.add(protocol)
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        """Keep an idle connection for reuse, within the per-destination cap."""
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if len(idle) >= self.state.limits.upstream_max_idle_per_destination:
            conn.close()
            return
        conn.idle_since = self.state.loop_time()
        idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a closed connection from the books."""
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the upstream idle timeout."""
        limit = now - self.state.limits.upstream_idle_timeout_s
        for key, idle in list(self._idle.items()):
            stale = [c for c in idle if c.idle_since < limit]
            for conn in stale:
                conn.close()
            if not self._idle.get(key):
                self._idle.pop(key, None)

    def close_all(self) -> None:
        """Close every connection (shutdown)."""
        for conn in list(self._all):
            conn.close()
        self._idle.clear()

    def stats(self) -> dict[str, Any]:
        """Counts for /config_dump and metrics."""
        return {"open": len(self._all), "idle": sum(len(v) for v in self._idle.values())}
