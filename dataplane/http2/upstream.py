"""Multiplexed HTTP/2 upstream connections and their per-destination pool.

One h2 client connection carries many streams; a second one to the same destination is
opened only when the first has reached the peer's ``max_concurrent_streams`` or received
a GOAWAY. A connection belongs to one destination address for its whole life.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from dataplane.errors import HttpError
from dataplane.http2.engine import (
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    H2Engine,
    Headers,
    ProtocolError,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from dataplane.http2.link import H2Link
from filters import Address

if TYPE_CHECKING:
    from dataplane.worker import WorkerState


class H2UpstreamUser(Protocol):
    """What an upstream HTTP/2 stream reports to whoever uses it (a downstream ``H2Stream``,
    an HTTP/1.1 exchange's ``H2Carrier``, a mirrored copy)."""

    def on_up_headers(self, headers: Headers, end: bool) -> None:
        """The final response head arrived (``end``: a trailers-only response)."""

    def on_up_data(self, data: bytes, flow_len: int) -> None:
        """Response body bytes; acknowledge ``flow_len`` once they were passed on."""

    def on_up_end(self, trailers: Headers | None) -> None:
        """The response is complete."""

    def on_up_reset(self, code: int, retryable: bool) -> None:
        """The stream was reset or its connection failed; ``retryable``: the upstream
        did not process it (REFUSED_STREAM, or above a GOAWAY's last stream id)."""


class H2Upstream(H2Link):
    """One HTTP/2 client connection to one destination, carrying many streams."""

    def __init__(self, pool: H2Pool, address: Address) -> None:
        limits = pool.state.limits
        super().__init__(H2Engine(True, initial_window_size=limits.h2_initial_stream_window_bytes,
                                  connection_window_size=limits.h2_initial_connection_window_bytes,
                                  max_header_list_size=limits.max_head_bytes), False)
        self.pool = pool
        self.address = address
        self.key = (address.host, address.port)
        self.users: dict[int, H2UpstreamUser] = {}
        self.going_away = False
        self.idle_since = 0.0
        self.reserved = 0  # streams promised to callers of H2Pool.connect, not yet opened
        self.last_frame_at = 0.0  # loop time of the last read: the peer is alive
        self.ping_sent_at = 0.0  # a liveness PING is outstanding since then (0: none)
        # Set by the peer's first SETTINGS: until then its max_concurrent_streams is unknown.
        self.ready: asyncio.Future[None] = pool.state.loop.create_future()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.pool.state.limits
        self.setup_transport(transport, limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        self.h2.initiate_connection()
        self.flush()
        self.idle_since = self.pool.state.loop_time()

    def data_received(self, data: bytes) -> None:
        self.last_frame_at = self.pool.state.loop_time()
        self.ping_sent_at = 0.0  # any frame proves the peer alive, a PING ACK included
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush_now()  # the engine queued a GOAWAY
            self._fail_all(ErrorCodes.PROTOCOL_ERROR, None)
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        users = self.users
        for event in events:
            if isinstance(event, DataReceived):
                ended = event.stream_ended
                user = users.pop(event.stream_id, None) if ended else users.get(event.stream_id)
                if user is not None:
                    user.on_up_data(event.data, event.flow_controlled_length)
                    if ended:
                        self._stream_gone()
                        user.on_up_end(None)
                else:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, ResponseReceived):
                ended = event.stream_ended
                user = users.pop(event.stream_id, None) if ended else users.get(event.stream_id)
                if user is not None:
                    if ended:
                        self._stream_gone()  # a trailers-only response: the stream is over
                    user.on_up_headers(event.headers, ended)
            elif isinstance(event, TrailersReceived):
                user = users.pop(event.stream_id, None)
                if user is not None:
                    self._stream_gone()
                    user.on_up_end(event.headers)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    self.pump(event.stream_id)
                else:
                    self.pump_all()
            elif isinstance(event, StreamReset):
                self.discard(event.stream_id)
                user = users.pop(event.stream_id, None)
                if user is not None:
                    self._stream_gone()
                    user.on_up_reset(event.error_code or ErrorCodes.INTERNAL_ERROR,
                                     event.error_code == ErrorCodes.REFUSED_STREAM)
            elif isinstance(event, RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                self.pump_all()  # a new initial window may let queued data go
            elif isinstance(event, ConnectionTerminated):
                self.going_away = True
                self._fail_all(ErrorCodes.REFUSED_STREAM, event.last_stream_id)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before SETTINGS"))
            self.ready.exception()  # retrieved: the connect that awaits it reports the failure
        self.pool.forget(self)
        self._fail_all(ErrorCodes.INTERNAL_ERROR, None)

    # ------------------------------------------------------------------ used by streams

    def has_capacity(self) -> bool:
        """Whether another stream may be opened now."""
        return (not self.closed and not self.going_away
                and len(self.users) + self.reserved < self.h2.remote_max_concurrent_streams)

    def open_stream(self, user: H2UpstreamUser, headers: Headers, end: bool, reserved: bool) -> int:
        """Send a request head on a new stream (taking the caller's reservation, if any);
        returns its id."""
        if reserved:
            self.reserved -= 1
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        h2.send_headers(stream_id, headers, end_stream=end)
        self.users[stream_id] = user
        self.flush()
        return stream_id

    def check_liveness(self, now: float) -> None:
        """PING a quiet connection that carries streams; close it if the PING goes unanswered."""
        if not self.users or self.closed:
            return
        limits = self.pool.state.limits
        if self.ping_sent_at:
            if now - self.ping_sent_at >= limits.h2_upstream_ping_timeout_s:
                self.close()
                if self.transport is not None:
                    self.transport.abort()  # a dead peer never drains what close() would flush
        elif now - self.last_frame_at >= limits.h2_upstream_ping_interval_s:
            self.ping_sent_at = now
            self.h2.ping(b"turnout!")
            self.flush()

    def release(self) -> None:
        """Give back a stream reserved by ``H2Pool.connect`` and not used."""
        self.reserved -= 1
        if not self.users and not self.reserved:
            self.idle_since = self.pool.state.loop_time()

    def forget_stream(self, stream_id: int) -> None:
        """The downstream is done with a stream: cancel it if it is still open."""
        if self.users.pop(stream_id, None) is not None:
            self.reset(stream_id, ErrorCodes.CANCEL)
            self._stream_gone()
        else:
            self.discard(stream_id)

    def close(self) -> None:
        """Close now (shutdown or idle)."""
        self.pool.forget(self)
        self.close_with(ErrorCodes.NO_ERROR)

    # ------------------------------------------------------------------ internals

    def _stream_gone(self) -> None:
        if not self.users:
            self.idle_since = self.pool.state.loop_time()
            if self.going_away:
                self.close()

    def _fail_all(self, code: int, last_stream_id: int | None) -> None:
        # With a GOAWAY, streams above its last id were never processed: retryable.
        for stream_id, user in list(self.users.items()):
            if last_stream_id is not None and stream_id <= last_stream_id:
                continue
            del self.users[stream_id]
            self.discard(stream_id)
            user.on_up_reset(code, last_stream_id is not None)
        if last_stream_id is not None and not self.users:
            self.close()


class H2Pool:
    """HTTP/2 upstream connections per destination; new ones only when all are full."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self._conns: dict[tuple[str, int], list[H2Upstream]] = {}
        self._connecting: dict[tuple[str, int], asyncio.Future[H2Upstream]] = {}
        self._sweeping = False

    def acquire(self, address: Address) -> H2Upstream | None:
        """An open connection to ``address`` with room for one more stream, or None."""
        conns = self._conns.get((address.host, address.port))
        if conns:
            for conn in conns:
                if conn.has_capacity():
                    return conn
        return None

    async def connect(self, address: Address) -> H2Upstream:
        """A connection with one stream reserved for the caller (``open_stream`` takes it,
        ``release`` gives it back), joining connects already under way while they have
        room; raises ``HttpError`` 503 on failure or timeout."""
        key = (address.host, address.port)
        for _ in range(16):  # bounded: every round waits for one connect to finish
            conn = self.acquire(address)
            if conn is not None:
                conn.reserved += 1
                return conn
            pending = self._connecting.get(key)
            if pending is None:
                break
            await asyncio.shield(pending)
        future: asyncio.Future[H2Upstream] = self.state.loop.create_future()
        self._connecting[key] = future
        try:
            conn = await self._open(address)
        except HttpError as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: joiners re-raise it, nobody else must log it
            raise
        finally:
            if self._connecting.get(key) is future:
                del self._connecting[key]
        conn.reserved += 1
        future.set_result(conn)
        return conn

    async def _open(self, address: Address) -> H2Upstream:
        loop = self.state.loop
        conn: H2Upstream | None = None
        try:
            async with asyncio.timeout(self.state.limits.upstream_connect_timeout_s):
                _, conn = await loop.create_connection(lambda: H2Upstream(self, address),
                                                       address.host, address.port)
                # Streams are counted against the peer's max_concurrent_streams, which its
                # SETTINGS carry: one round trip on a new connection, never per request.
                await conn.ready
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise HttpError(503, "connect to " + str(address) + " timed out", "connect_timeout") from None
        except OSError as exc:
            if conn is not None:
                conn.close()
            reason = exc.strerror or type(exc).__name__
            raise HttpError(503, "connect to " + str(address) + " failed: " + reason, "connect_failed") from None
        self._conns.setdefault(conn.key, []).append(conn)
        if not self._sweeping:
            self._sweeping = True
            loop.call_later(1.0, self._sweep)
        return conn

    def forget(self, conn: H2Upstream) -> None:
        """Drop a closed connection from the books."""
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def _sweep(self) -> None:
        # Once a second while any connection exists: close those idle too long, PING quiet ones.
        now = self.state.loop_time()
        limit = now - self.state.limits.upstream_idle_timeout_s
        for conns in list(self._conns.values()):
            for conn in list(conns):
                if not conn.users and not conn.reserved and conn.idle_since < limit:
                    conn.close()
                else:
                    conn.check_liveness(now)
        if self._conns:
            self.state.loop.call_later(1.0, self._sweep)
        else:
            self._sweeping = False

    def close_all(self) -> None:
        """Close every connection (shutdown)."""
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close()
