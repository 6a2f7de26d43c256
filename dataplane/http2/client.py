"""Upstream HTTP/2 connections: many requests multiplexed on one connection, one stream each.

A connection (``H2Client``) is a carrier while the peer's ``max_concurrent_streams``
leaves room; each request on it is an ``H2ClientStream``. A connection belongs to one
destination address for its whole life. A request that an upstream refused unprocessed
(REFUSED_STREAM, or above a GOAWAY's last stream id) fails as ``REFUSED``, so the router
may send it again; a connection that answers in HTTP/1.1 is a protocol mismatch, never a
connect failure.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final, Protocol

from dataplane.http2.engine import (
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    H2Engine,
    ProtocolError,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from dataplane.http2.link import H2Link
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, NO_FIELDS, Response
from dataplane.upstream import REFUSED, SENT, STARTED, UpstreamError, UpstreamListener, UpstreamStream

if TYPE_CHECKING:
    from dataplane.config import Limits
    from dataplane.message import Fields, Request
    from filters import Address

# Request fields never sent on HTTP/2: ``host`` travels as :authority, ``expect`` is answered
# by the proxy itself, and HTTP/1.1's connection-specific fields are already gone.
_NEVER_SENT_FIELDS: Final = frozenset({b"host", b"expect", b"content-length"})
_PING_DATA: Final = b"turnout!"
_HTTP1: Final = b"HTTP/1."


class ProtocolMismatch(Exception):
    """The upstream answered the HTTP/2 preface in HTTP/1.1."""


class H2Owner(Protocol):
    """Where a connection reports that it is gone."""

    def forget(self, conn: H2Client) -> None:
        """The connection is closed: never hand it out again."""


class H2ClientStream(UpstreamStream):
    """One request on an upstream HTTP/2 connection."""

    __slots__ = ("conn", "stream_id", "listener", "ended", "responded")

    def __init__(self, conn: H2Client, stream_id: int, listener: UpstreamListener, ended: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.listener: UpstreamListener | None = listener
        self.ended = ended  # END_STREAM sent (with the head, or by send_end)
        self.responded = False  # the response head arrived

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Request DATA, sent as the upstream's window allows."""
        if not self.ended and data:
            self.conn.queue_data(self.stream_id, data, flow_len)
        elif flow_len and self.listener is not None:
            self.listener.on_request_taken(flow_len)

    def send_end(self, trailers: Fields) -> None:
        """END_STREAM, with trailers when there are any."""
        if not self.ended:
            self.ended = True
            self.conn.queue_end(self.stream_id, trailers or None)

    def acknowledge(self, flow_len: int) -> None:
        """The client took response bytes: open the stream's window again."""
        self.conn.acknowledge(self.stream_id, flow_len)

    def cancel(self) -> None:
        """RST_STREAM CANCEL when the stream is still open; nothing more is reported."""
        self.listener = None
        self.conn.forget_stream(self.stream_id)

    def finish(self) -> None:
        """The exchange is over: a stream still open on our side (the response came before the
        whole request) is cancelled."""
        self.cancel()


class H2Client(H2Link):
    """One HTTP/2 connection to one destination, carrying many requests."""

    def __init__(self, owner: H2Owner, address: Address, limits: Limits, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(H2Engine(True, initial_window_size=limits.h2_initial_stream_window_bytes,
                                  connection_window_size=limits.h2_initial_connection_window_bytes,
                                  max_header_list_size=limits.max_head_bytes), False)
        self.owner = owner
        self.address = address
        self.key = (address.host, address.port)
        self.limits = limits
        self.streams: dict[int, H2ClientStream] = {}
        self.going_away = False
        self.idle_since = 0.0
        self.reserved = 0  # carriers handed out and not opened yet
        self.last_frame_at = 0.0  # loop time of the last read: the peer is alive
        self.ping_sent_at = 0.0  # a liveness PING is outstanding since then (0: none)
        self._probe = b""  # the first bytes, until they show whether the peer speaks HTTP/2
        self.loop = loop
        # Set by the peer's first SETTINGS: until then its max_concurrent_streams is unknown.
        self.ready: asyncio.Future[None] = loop.create_future()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send the preface and our SETTINGS."""
        limits = self.limits
        self.setup_transport(transport, limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        self.h2.initiate_connection()
        self.flush()
        self.idle_since = self.loop.time()

    def data_received(self, data: bytes) -> None:
        """Frames from the upstream, dispatched to their streams."""
        now = self.loop.time()
        self.last_frame_at = now
        self.ping_sent_at = 0.0  # any frame proves the peer alive, a PING ACK included
        if not self.ready.done():
            # Before the peer's SETTINGS: an HTTP/1.1 server answers the preface with a status
            # line, which may arrive a few bytes at a time.
            data = self._probe + data
            if len(data) < len(_HTTP1) and _HTTP1.startswith(data):
                self._probe = data
                return
            self._probe = b""
            if data.startswith(_HTTP1):
                self._fail_ready(ProtocolMismatch("the upstream answered in HTTP/1.1"))
                return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush_now()  # the engine queued a GOAWAY
            self._fail_ready(ConnectionError("HTTP/2 protocol error"))
            self._fail_all(None, UpstreamError(502, "upstream broke the HTTP/2 protocol", "upstream_reset", SENT))
            return
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                listener = stream.listener if stream is not None else None
                if listener is None:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                    if stream is not None and event.stream_ended:
                        self._stream_done(event.stream_id)
                    continue
                if event.data:
                    listener.on_response_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)  # padding only
                if event.stream_ended:
                    self._stream_done(event.stream_id)
                    listener.on_response_end(NO_FIELDS)
            elif isinstance(event, ResponseReceived):
                stream = streams.get(event.stream_id)
                if stream is None:
                    continue
                stream.responded = True
                listener = stream.listener
                ended = event.stream_ended
                if ended:
                    self._stream_done(event.stream_id)  # a trailers-only response: the stream is over
                if listener is not None:
                    listener.on_response_head(_response(event.headers, ended))
                    if ended:
                        listener.on_response_end(NO_FIELDS)
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._stream_done(event.stream_id)
                    if stream.listener is not None:
                        stream.listener.on_response_end(event.headers)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    self.pump(event.stream_id)
                else:
                    self.pump_all()
            elif isinstance(event, StreamReset):
                self.discard(event.stream_id)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._stream_done(event.stream_id)
                    if stream.listener is not None:
                        stream.listener.on_upstream_error(_reset_error(event.error_code, stream.responded))
            elif isinstance(event, RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                self.pump_all()  # a new initial window may let queued data go
            elif isinstance(event, ConnectionTerminated):
                self.going_away = True
                self._fail_all(event.last_stream_id,
                               UpstreamError(503, "upstream refused the stream", "upstream_refused", REFUSED))
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every request still on the connection fails."""
        self.closed = True
        self._fail_ready(ConnectionError("closed before SETTINGS"))
        self.owner.forget(self)
        self._fail_all(None, UpstreamError(502, "upstream closed the connection", "upstream_reset", SENT))

    # ------------------------------------------------------------------ flow control hooks

    def data_sent(self, stream_id: int, flow_len: int) -> None:
        """Request DATA went out: the client may send more."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.listener is not None:
            stream.listener.on_request_taken(flow_len)

    # ------------------------------------------------------------------ Carrier

    @property
    def busy(self) -> bool:
        """Whether it carries streams or reservations."""
        return bool(self.streams) or self.reserved > 0

    def has_capacity(self) -> bool:
        """Whether another stream may be opened now."""
        return (not self.closed and not self.going_away
                and len(self.streams) + self.reserved < self.h2.remote_max_concurrent_streams)

    def open_stream(self, listener: UpstreamListener, request: Request, fields: Fields, extra: Fields,
                    extra_lines: bytes, length: int) -> UpstreamStream:
        """Send the request head on a new stream (taking this carrier's reservation)."""
        self.reserved -= 1
        headers: Fields = [(b":method", request.method), (b":scheme", b"http"),
                           (b":authority", request.authority), (b":path", request.target)]
        for name, value in fields:
            if name not in _NEVER_SENT_FIELDS:
                headers.append((name, value))
        headers.extend(extra)
        if length > 0:
            headers.append((b"content-length", b"%d" % length))
        end = length == 0
        h2 = self.h2
        try:
            stream_id = h2.get_next_available_stream_id()
            h2.send_headers(stream_id, headers, end_stream=end)
        except ProtocolError:
            # The connection went away between reserving and using it: nothing was sent.
            raise UpstreamError(503, "upstream connection closing", "upstream_refused", REFUSED) from None
        stream = H2ClientStream(self, stream_id, listener, end)
        self.streams[stream_id] = stream
        self.flush()
        return stream

    def release(self) -> None:
        """Give back a reservation not used."""
        self.reserved -= 1
        if not self.streams and not self.reserved:
            self.idle_since = self.loop.time()

    # ------------------------------------------------------------------ used by the owner

    def check_liveness(self, now: float) -> None:
        """PING a quiet connection that carries streams; close it if the PING goes unanswered."""
        if not self.streams or self.closed:
            return
        limits = self.limits
        if self.ping_sent_at:
            if now - self.ping_sent_at >= limits.h2_upstream_ping_timeout_s:
                self.close()
                if self.transport is not None:
                    self.transport.abort()  # a dead peer never drains what close() would flush
        elif now - self.last_frame_at >= limits.h2_upstream_ping_interval_s:
            self.ping_sent_at = now
            self.h2.ping(_PING_DATA)
            self.flush()

    def forget_stream(self, stream_id: int) -> None:
        """The exchange is done with a stream: cancel it if it is still open."""
        if stream_id and self.streams.pop(stream_id, None) is not None:
            self.reset(stream_id, ErrorCodes.CANCEL)
            self._idle_check()
        else:
            self.discard(stream_id)

    def close(self) -> None:
        """Close now (shutdown, idle, or a dead peer)."""
        self.owner.forget(self)
        self.close_with(ErrorCodes.NO_ERROR)

    # ------------------------------------------------------------------ internals

    def _stream_done(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self._idle_check()

    def _idle_check(self) -> None:
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.going_away and not self.reserved:
                self.close()

    def _fail_ready(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: the connect that awaits it reports the failure
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _fail_all(self, last_stream_id: int | None, error: UpstreamError) -> None:
        # With a GOAWAY, streams above its last id were never processed: ``error`` says so.
        for stream_id, stream in list(self.streams.items()):
            if last_stream_id is not None and stream_id <= last_stream_id:
                continue
            del self.streams[stream_id]
            self.discard(stream_id)
            listener = stream.listener
            if listener is not None:
                stream.listener = None
                phase = STARTED if stream.responded else error.phase
                listener.on_upstream_error(UpstreamError(error.status, error.reason, error.cause, phase))
        if last_stream_id is not None:
            self._idle_check()
        elif self.transport is not None:
            self.closed = True
            self.transport.close()


def _response(headers: Fields, ended: bool) -> Response:
    """A response HEADERS frame (already checked by the engine) as the router's ``Response``."""
    status = 0
    length = -1
    fields: Fields = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":status":
                status = int(value)
            continue
        if name == b"content-length":
            length = int(value)  # the engine checked it is digits
        fields.append((name, value))
    if ended or status in (204, 304):
        body = BODY_NONE
    elif length >= 0:
        body = BODY_LENGTH if length else BODY_NONE
    else:
        body = BODY_CHUNKED
    return Response(status, b"", fields, body, length)


def _reset_error(code: int, responded: bool) -> UpstreamError:
    if responded:
        return UpstreamError(502, "upstream reset the stream mid-response", "upstream_reset", STARTED)
    if code == ErrorCodes.REFUSED_STREAM:
        return UpstreamError(503, "upstream refused the stream", "upstream_refused", REFUSED)
    return UpstreamError(502, "upstream reset the stream", "upstream_reset", SENT)
