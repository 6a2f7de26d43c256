"""The HTTP/2 server side: one ``H2Connection`` per client connection speaking HTTP/2, one
``H2ServerStream`` per request.

It reads and validates: a request head RFC 9113 calls malformed is a stream error
(RST_STREAM PROTOCOL_ERROR, §8.1.1), never turned into a request; a valid one becomes the
router's ``Request``, and its DATA and trailers go to the exchange. It writes the response
the router passes back as HEADERS, DATA and trailers, within the client's flow-control
windows (``link.py``).

Abuse accounting is the connection's: concurrent streams beyond the limit get
REFUSED_STREAM; a client that resets most of its streams early, floods PING, SETTINGS or
PRIORITY, or sends empty DATA frames gets GOAWAY ENHANCE_YOUR_CALM and its streams'
upstream work is cancelled; a client that does not read stops being read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from dataplane.deadline import Deadline
from dataplane.http2.engine import (
    CONNECTION_SPECIFIC,
    MAX_LENGTH_DIGITS,
    MAX_STREAM_ID,
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    H2Engine,
    Headers,
    PingReceived,
    PriorityUpdated,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
    valid_name,
    valid_value,
)
from dataplane.http2.link import H2Link
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, NO_FIELDS, Fields, Request, field_lines
from dataplane.router import Downstream, listener_plan

if TYPE_CHECKING:
    import asyncio

    from dataplane.config import Limits, Listener
    from dataplane.connections import Connections
    from dataplane.message import Response
    from dataplane.router import Exchange, Router

_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_GRPC_CONTENT_TYPE: Final = b"application/grpc"


class _Malformed(Exception):
    """A request head RFC 9113 calls malformed: a stream error of type PROTOCOL_ERROR."""


class H2ServerStream(Downstream):
    """One request on a client's HTTP/2 connection: the router's ``Downstream`` for it."""

    def __init__(self, conn: H2Connection, stream_id: int, ended: bool) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.peer = conn.peer
        self.listener = conn.listener
        self.forwarded = conn.forwarded
        self.forwarded_lines = conn.forwarded_lines
        self.fixed_target = conn.fixed_target
        self.upstream_choice = conn.upstream_choice
        self.exchange: Exchange | None = None
        self.request_done = ended
        self.content_length = -1  # the request's content-length (-1: none given)
        self.received = 0
        self.deadline = Deadline(conn.router.loop, self._deadline_reached)
        self._held: Headers | None = None  # a head with no body, sent with the end in one frame

    # ------------------------------------------------------------------ request side (from the connection)

    def on_data(self, data: bytes, flow_len: int, ended: bool) -> None:
        """Request DATA from the client."""
        self.received += len(data)
        if self.content_length != -1 and (self.received > self.content_length
                                          or (ended and self.received != self.content_length)):
            self._malformed()  # content-length and the DATA total disagree: RFC 9113 §8.1.1
            return
        exchange = self.exchange
        if exchange is None:
            self.conn.acknowledge(self.stream_id, flow_len)
            return
        if not exchange.finished:
            self.deadline.move(self.conn.limits.h2_stream_idle_timeout_s)
        if data:
            exchange.on_request_data(data, flow_len)
        elif flow_len:
            self.conn.acknowledge(self.stream_id, flow_len)  # padding alone
        if ended:
            self.on_end(NO_FIELDS)

    def on_end(self, trailers: Fields) -> None:
        """The request is complete (trailers: HTTP/2 trailers, if any)."""
        if self.request_done:
            return
        if self.content_length not in (-1, self.received):
            self._malformed()
            return
        self.request_done = True
        if self.exchange is not None:
            self.exchange.on_request_end(trailers)

    def on_client_reset(self) -> None:
        """The client reset the stream: the upstream side is dropped."""
        self._finish()

    def _malformed(self) -> None:
        self.conn.router.metrics.downstream_error("h2_content_length")
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.client_gone(400)
        self.conn.reset(self.stream_id, ErrorCodes.PROTOCOL_ERROR)
        self._finish()

    def _deadline_reached(self) -> None:
        exchange = self.exchange
        stalled = self.conn.queued(self.stream_id)  # the response waits for the client's window
        if exchange is not None and not exchange.finished and not stalled and (
                self.request_done or exchange.response_started):
            exchange.timed_out()
            return
        # The client stalled mid-request, or does not read the response queued for it.
        self.conn.router.metrics.downstream_error("client_stalled")
        if exchange is not None:
            exchange.client_gone(408)
        self.conn.reset(self.stream_id, ErrorCodes.CANCEL)
        self._finish()

    # ------------------------------------------------------------------ Downstream

    def arm(self, seconds: float) -> None:
        """The exchange's timer: this stream's deadline."""
        self.deadline.move(seconds)

    def acknowledge(self, flow_len: int) -> None:
        """Request bytes went upstream: give the client its window back."""
        self.conn.acknowledge(self.stream_id, flow_len)

    def send_informational(self, status: int) -> None:
        """Interim responses are not passed on over HTTP/2 (the exchange answers 100 itself)."""

    def send_head(self, head: Response, extra: Fields) -> None:
        """HEADERS; a head with no body waits for the end to leave in the same frame (a gRPC
        trailers-only reply must be one HEADERS frame)."""
        headers: Headers = [(b":status", b"%d" % head.status), *head.fields, *extra]
        if head.body == BODY_NONE:
            self._held = headers
            return
        self._headers(headers, False)

    def send_response(self, head: Response, extra: Fields, body: bytes) -> None:
        """A whole response: HEADERS, then DATA with END_STREAM."""
        headers: Headers = [(b":status", b"%d" % head.status), *head.fields, *extra]
        if not self._headers(headers, not body):
            return
        if body:
            self.conn.queue_last(self.stream_id, body)
        else:
            self.sent()

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Response DATA, sent as the client's window allows."""
        self.conn.queue_data(self.stream_id, data, flow_len)

    def send_end(self, trailers: Fields) -> None:
        """END_STREAM after the queued data, with trailers when there are any."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._headers(held, not trailers):
                return
            if not trailers:
                self.sent()
                return
        self.conn.queue_end(self.stream_id, trailers or None)

    def reset(self) -> None:
        """The response broke: RST_STREAM, never a clean end to a short response."""
        self.exchange = None
        self.conn.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
        self._finish()

    # ------------------------------------------------------------------ the end

    def _headers(self, headers: Headers, end: bool) -> bool:
        conn = self.conn
        try:
            conn.h2.send_headers(self.stream_id, headers, end_stream=end)
        except ProtocolError:
            self._finish()  # the client reset the stream or the connection is closing
            return False
        conn.flush()
        return True

    def sent(self) -> None:
        """The whole response was handed to the transport."""
        if not self.request_done:
            # Answered before the request ended (RFC 9113 §8.1): stop the rest of it.
            self.conn.reset(self.stream_id, ErrorCodes.NO_ERROR)
        self._finish()

    def _finish(self) -> None:
        self.deadline.cancel()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if not exchange.finished:
                exchange.client_gone()
        self.conn.stream_finished(self)


class H2Connection(H2Link):
    """One client connection speaking HTTP/2."""

    def __init__(self, router: Router, connections: Connections, listener: Listener) -> None:
        limits: Limits = router.runtime.limits
        # Request heads are checked by _request, so a malformed one is a stream error.
        super().__init__(H2Engine(False, max_concurrent_streams=limits.h2_max_concurrent_streams,
                                  initial_window_size=limits.h2_initial_stream_window_bytes,
                                  connection_window_size=limits.h2_initial_connection_window_bytes,
                                  max_header_list_size=limits.max_head_bytes), True)
        self.router = router
        self.connections = connections
        self.listener = listener
        self.limits = limits  # the connection's own limits: those current when it opened
        self.peer = b""
        self.forwarded: Fields = NO_FIELDS
        self.forwarded_lines = b""
        self.fixed_target, self.upstream_choice = listener_plan(listener)
        self.streams: dict[int, H2ServerStream] = {}
        self.counted = False  # counted as an open connection in metrics and connections
        self.last_stream_id = 0
        self.draining = False
        self._final_goaway = False
        self._streams_total = 0
        self._premature_resets = 0
        self._empty_frames = 0
        self._control_frames = 0
        self._control_window_start = 0.0
        self.deadline = Deadline(router.loop, self._deadline_reached)

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send our SETTINGS (or refuse the connection over the cap)."""
        limits = self.limits
        tr = self.setup_transport(transport, limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        self.linger_s = limits.lingering_timeout_s
        peer = tr.get_extra_info("peername")
        self.peer = peer[0].encode("latin-1") if isinstance(peer, tuple) else b"unix"
        self.forwarded = [(b"x-forwarded-for", self.peer),
                          (b"x-forwarded-proto", b"http" if self.listener.tls is None else b"https")]
        self.forwarded_lines = field_lines(self.forwarded)
        self.h2.initiate_connection()
        metrics = self.router.metrics
        if len(self.connections.open) >= limits.max_connections_per_worker:
            metrics.connection_refused()
            self.close_with(ErrorCodes.REFUSED_STREAM, 0)
            return
        self.counted = True
        self.connections.add(self)
        metrics.connection_opened()
        self.flush()
        self.deadline.move(limits.header_read_timeout_s)

    def data_received(self, data: bytes) -> None:
        """Frames from the client."""
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            # The engine queued a GOAWAY naming the error (this covers CONTINUATION floods,
            # HPACK bombs and oversized header lists: it stops at its limits).
            self.router.metrics.downstream_error("h2_protocol_error")
            self.flush_now()
            self._abort_streams()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        streams = self.streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if not event.data and not event.stream_ended:
                    self._empty_frames += 1
                    if self._empty_frames > self.limits.h2_max_consecutive_empty_frames:
                        self._calm("h2_empty_frames")
                        return
                else:
                    self._empty_frames = 0
                if stream is not None:
                    stream.on_data(event.data, event.flow_controlled_length, event.stream_ended)
                else:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
            elif isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended)
            elif isinstance(event, WindowUpdated):
                if event.stream_id:
                    self.pump(event.stream_id)
                else:
                    self.pump_all()
            elif isinstance(event, TrailersReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_end(event.headers)
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.on_client_reset()
                    if not event.remote_reset:
                        continue  # a stream error turnout's engine raised: not the client's reset
                    self._premature_resets += 1
                    limit = self.limits.h2_max_premature_resets
                    # Envoy's rule: past the budget, and most of the streams were reset early.
                    if self._premature_resets >= limit and 2 * self._premature_resets >= self._streams_total:
                        self._calm("h2_rapid_reset")
                        return
            elif isinstance(event, (PingReceived, RemoteSettingsChanged, PriorityUpdated)):
                if isinstance(event, RemoteSettingsChanged):
                    self.pump_all()  # a new initial window may let queued data go
                if self._control_frame():
                    return
            elif isinstance(event, ConnectionTerminated):
                self._abort_streams()
                self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)
                return
        self.flush()

    def eof_received(self) -> bool | None:
        """The client closed its side: every stream is dropped."""
        self._abort_streams()
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone: every stream is dropped."""
        self.closed = True
        if self.counted:
            self.counted = False
            self.router.metrics.connection_closed()
            self.connections.remove(self)
        self.deadline.cancel()
        self._abort_streams()

    # ------------------------------------------------------------------ flow control hooks

    def data_sent(self, stream_id: int, flow_len: int) -> None:
        """Response DATA went out: the upstream may send more."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.exchange is not None:
            stream.exchange.response_taken(flow_len)

    def stream_sent(self, stream_id: int) -> None:
        """A response went out whole."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.sent()

    # ------------------------------------------------------------------ streams

    def _request(self, stream_id: int, headers: Headers, ended: bool) -> None:
        limits = self.limits
        if self._final_goaway and stream_id > self.last_stream_id:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= limits.h2_max_concurrent_streams:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.last_stream_id = stream_id
        self._streams_total += 1
        if not self.streams:
            self.deadline.clear()  # a stream is active: the connection is not idle
        try:
            request, content_length = _parse_request(headers, ended)
        except _Malformed:
            self.router.metrics.downstream_error("h2_malformed_request")
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            self._idle_check()
            return
        stream = H2ServerStream(self, stream_id, ended)
        stream.content_length = content_length
        self.streams[stream_id] = stream
        router = self.router
        if len(request.fields) > limits.max_header_count:
            router.metrics.downstream_error("too_many_headers")
            router.reply(stream, request, 431, "too many header fields", "too_many_headers")
            return
        stream.deadline.move(limits.h2_stream_idle_timeout_s if request.grpc else limits.upstream_response_timeout_s)
        exchange = router.handle(stream, request)
        if exchange is None:
            return  # answered already
        stream.exchange = exchange
        exchange.begin()

    def stream_finished(self, stream: H2ServerStream) -> None:
        """A stream is over: forget it; an idle connection starts its idle timeout."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        self.discard(stream.stream_id)
        self._idle_check()

    def _idle_check(self) -> None:
        if not self.streams:
            if self.draining and self._final_goaway:
                self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)
            else:
                self.deadline.move(self.limits.keepalive_idle_timeout_s)

    def _abort_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.on_client_reset()

    # ------------------------------------------------------------------ abuse accounting

    def _control_frame(self) -> bool:
        # PING and SETTINGS each queue an acknowledgement, PRIORITY costs work for nothing
        # (turnout does not prioritise): count them per second.
        now = self.router.loop.time()
        if now - self._control_window_start >= 1.0:
            self._control_window_start = now
            self._control_frames = 0
        self._control_frames += 1
        if self._control_frames > self.limits.h2_max_control_frames_per_s:
            self._calm("h2_control_flood")
            return True
        return False

    def _calm(self, cause: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM, cancel every stream (and its upstream work), close."""
        self.router.metrics.downstream_error(cause)
        self._abort_streams()
        self.close_with(ErrorCodes.ENHANCE_YOUR_CALM, self.last_stream_id)

    # ------------------------------------------------------------------ timers and shutdown

    def _deadline_reached(self) -> None:
        if self.closed or self.streams:
            return  # active streams have their own deadlines
        if not self._streams_total:
            self.router.metrics.downstream_error("header_timeout")
        self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)

    def drain(self) -> None:
        """Graceful shutdown in two steps (RFC 9113 §6.8): GOAWAY with the highest stream
        id, then after ``h2_goaway_grace_s`` the real last one; in-flight streams finish."""
        if self.draining or self.closed:
            return
        self.draining = True
        if not self.streams:
            self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)  # nothing in flight
            return
        self.send_goaway(MAX_STREAM_ID)
        self.router.loop.call_later(self.limits.h2_goaway_grace_s, self._second_goaway)

    def _second_goaway(self) -> None:
        if self.closed:
            return
        self._final_goaway = True
        if not self.streams:
            self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)
        else:
            self.send_goaway(self.last_stream_id)

    def close(self) -> None:
        """Close now: cancel streams, GOAWAY, close after it is written."""
        self._abort_streams()
        self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)


def _parse_request(headers: Headers, ended: bool) -> tuple[Request, int]:
    """A request head as the router's ``Request`` and its content-length (-1: none); raises
    ``_Malformed`` for what RFC 9113 §8.1.1 calls malformed."""
    method = scheme = path = authority = host = None
    content_length = -1
    grpc = False
    timeout = b""
    fields: Fields = []
    regular = False
    for name, value in headers:
        if name in _PSEUDO:
            if regular:
                raise _Malformed
            if name == b":method":
                if method is not None:
                    raise _Malformed
                method = value
            elif name == b":path":
                if path is not None:
                    raise _Malformed
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise _Malformed
                authority = value
            elif scheme is None:
                scheme = value
            else:
                raise _Malformed
            continue
        regular = True
        if (name in CONNECTION_SPECIFIC or not valid_name(name) or not valid_value(value)
                or (name == b"te" and value != b"trailers")):
            raise _Malformed
        if name == b"content-length":
            if content_length != -1 or not value.isdigit() or len(value) > MAX_LENGTH_DIGITS:
                raise _Malformed
            content_length = int(value)
            continue  # framing is the upstream client's to write
        if name == b"host":
            host = value
            continue  # :authority carries it
        if name == b"content-type":
            grpc = value.startswith(_GRPC_CONTENT_TYPE)
        elif name == b"grpc-timeout":
            timeout = value
        fields.append((name, value))
    if method is None or method == b"CONNECT" or scheme is None or not path:
        raise _Malformed  # CONNECT (plain or extended) is not offered: SETTINGS say so
    if authority is None:
        authority = host
    elif host is not None and host != authority:
        raise _Malformed  # two different hosts: route on neither
    if ended and content_length > 0:
        raise _Malformed
    if ended or content_length == 0:
        body = BODY_NONE
    elif content_length > 0:
        body = BODY_LENGTH
    else:
        body = BODY_CHUNKED
    by_name = dict(fields)
    request = Request(method, path, b"2", authority or b"", fields, body, content_length, True, False, False,
                      by_name if len(by_name) == len(fields) else None)
    request.http2 = True
    request.grpc = grpc
    request.grpc_timeout = timeout
    return request, content_length
