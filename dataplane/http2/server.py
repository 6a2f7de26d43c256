"""The HTTP/2 connection manager: one ``H2Connection`` per client connection speaking
HTTP/2 (prior knowledge), one ``H2Stream`` per request.

Per stream: validate the head (a malformed one is a stream error, RFC 9113 §8.1.1, never
turned into an HTTP/1.1 request), build the same ``RequestHead`` HTTP/1.1 builds, decide
on the snapshot current at that moment, open a stream on a multiplexed upstream HTTP/2
connection to the destination, then stream both ways with end-to-end flow control
(``link.py``). gRPC errors the proxy makes are trailers-only replies (``grpc.py``).

Abuse accounting h2 leaves to its user (HARDENING.md): concurrent streams beyond the
limit get REFUSED_STREAM; a client that resets most of its streams early, floods PING,
SETTINGS or PRIORITY, or sends empty DATA frames gets GOAWAY ENHANCE_YOUR_CALM and its upstream
streams are cancelled; a client that does not read stops being read (``link.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

from dataplane.deadline import Deadline
from dataplane.errors import HttpError
from dataplane.http2.bridge import H1Bridge
from dataplane.http2.engine import (
    CONNECTION_SPECIFIC,
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
from dataplane.http2.grpc import GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, parse_grpc_timeout, trailers_only
from dataplane.http2.link import Acknowledger, H2Link
from dataplane.http2.upstream import H2Upstream, H2UpstreamUser
from filters import Address, Decision, RequestHead
from filters.head import joined_fields

if TYPE_CHECKING:
    import asyncio

    from dataplane.config import Listener
    from dataplane.mirror import MirrorCopy
    from dataplane.upstream import UpstreamConnection
    from dataplane.worker import WorkerState

_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path"})
_GRPC_CONTENT_TYPE: Final = b"application/grpc"
_TEXT_PLAIN: Final = b"text/plain; charset=utf-8"


class StreamUpstream(Acknowledger, Protocol):
    """Where a stream's request goes: an ``H2Upstream`` stream, or an ``H1Bridge``."""

    def queue_data(self, stream_id: int, data: bytes, sender: Acknowledger | None, sender_stream: int,
                   flow_len: int) -> None:
        """Request DATA, acknowledged to ``sender`` once taken."""

    def queue_end(self, stream_id: int, trailers: Headers | None) -> None:
        """The request is complete."""

    def forget_stream(self, stream_id: int) -> None:
        """The downstream stream is over: cancel what is left."""


class _Malformed(Exception):
    """A request head RFC 9113 calls malformed: a stream error of type PROTOCOL_ERROR."""


class RequestLine:
    """Method, target and fields of an HTTP/2 request, as the access log and the tracer
    read them (an exchange's ``plan``)."""

    __slots__ = ("method", "target", "headers")

    def __init__(self, method: bytes, target: bytes, headers: Headers) -> None:
        self.method = method
        self.target = target
        self.headers = headers


class H2Connection(H2Link):
    """One client connection speaking HTTP/2."""

    def __init__(self, state: WorkerState, listener: Listener) -> None:
        limits = state.limits
        # Inbound heads are checked by H2Stream.start, so a malformed one is a stream error.
        super().__init__(H2Engine(False, max_concurrent_streams=limits.h2_max_concurrent_streams,
                                  initial_window_size=limits.h2_initial_stream_window_bytes,
                                  connection_window_size=limits.h2_initial_connection_window_bytes,
                                  max_header_list_size=limits.max_head_bytes), True)
        self.state = state
        self.listener = listener
        self.peer = b""
        self.streams: dict[int, H2Stream] = {}
        self.counted = False  # counted as an open connection in metrics and state.connections
        self.last_stream_id = 0
        self.draining = False
        self._final_goaway = False
        self._streams_total = 0
        self._premature_resets = 0
        self._empty_frames = 0
        self._control_frames = 0
        self._control_window_start = 0.0
        self.deadline = Deadline(state.loop, self._deadline_reached)

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        limits = state.limits
        tr = self.setup_transport(transport, limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        self.linger_s = limits.lingering_timeout_s
        peer = tr.get_extra_info("peername")
        self.peer = peer[0].encode("latin-1") if isinstance(peer, tuple) else b"unix"
        self.h2.initiate_connection()
        if len(state.connections) >= limits.max_connections_per_worker:
            state.metrics.connection_refused()
            self.close_with(ErrorCodes.REFUSED_STREAM, 0)
            return
        self.counted = True
        state.connections.add(self)
        state.metrics.connection_opened()
        self.flush()
        self.deadline.move(limits.header_read_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            # The engine queued a GOAWAY naming the error (this covers CONTINUATION floods,
            # HPACK bombs and oversized header lists: it stops at its limits).
            self.state.metrics.downstream_error("h2_protocol_error")
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
                    if self._empty_frames > self.state.limits.h2_max_consecutive_empty_frames:
                        self._calm("h2_empty_frames")
                        return
                else:
                    self._empty_frames = 0
                if stream is not None:
                    stream.on_request_data(event.data, event.flow_controlled_length)
                    if event.stream_ended:
                        stream.on_request_end(None)
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
                    stream.on_request_end(event.headers)
            elif isinstance(event, StreamReset):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    self._premature_resets += 1
                    stream.on_client_reset()
                    limit = self.state.limits.h2_max_premature_resets
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
        self._abort_streams()
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.state.metrics.connection_closed()
            self.state.connections.discard(self)
        self.deadline.cancel()
        self._abort_streams()
        self.state.connection_gone()

    # ------------------------------------------------------------------ streams

    def _request(self, stream_id: int, headers: Headers, ended: bool) -> None:
        state = self.state
        limits = state.limits
        if self._final_goaway and stream_id > self.last_stream_id:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= limits.h2_max_concurrent_streams:
            self.reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        self.last_stream_id = stream_id
        self._streams_total += 1
        if len(self.streams) == 0:
            self.deadline.clear()  # a stream is active: the connection is not idle
        try:
            H2Stream.start(self, stream_id, headers, ended)
        except _Malformed:
            state.metrics.downstream_error("h2_malformed_request")
            self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def stream_sent(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.response_sent()

    def stream_finished(self, stream: H2Stream) -> None:
        """A stream is over: forget it; an idle connection starts its idle timeout."""
        if self.streams.pop(stream.stream_id, None) is None:
            return
        self.discard(stream.stream_id)
        if not self.streams:
            if self.draining and self._final_goaway:
                self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)
            else:
                self.deadline.move(self.state.limits.keepalive_idle_timeout_s)

    def _abort_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.abort()

    # ------------------------------------------------------------------ abuse accounting

    def _control_frame(self) -> bool:
        # PING and SETTINGS each make h2 queue an acknowledgement, PRIORITY costs work for
        # nothing (turnout does not prioritise): count them per second.
        now = self.state.loop_time()
        if now - self._control_window_start >= 1.0:
            self._control_window_start = now
            self._control_frames = 0
        self._control_frames += 1
        if self._control_frames > self.state.limits.h2_max_control_frames_per_s:
            self._calm("h2_control_flood")
            return True
        return False

    def _calm(self, cause: str) -> None:
        """GOAWAY ENHANCE_YOUR_CALM, cancel every stream (and its upstream work), close."""
        self.state.metrics.downstream_error(cause)
        self._abort_streams()
        self.close_with(ErrorCodes.ENHANCE_YOUR_CALM, self.last_stream_id)

    # ------------------------------------------------------------------ timers

    def _deadline_reached(self) -> None:
        if self.closed or self.streams:
            return  # active streams have their own deadlines
        if not self._streams_total:
            self.state.metrics.downstream_error("header_timeout")
        self.close_with(ErrorCodes.NO_ERROR, self.last_stream_id)

    # ------------------------------------------------------------------ shutdown

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
        self.state.loop.call_later(self.state.limits.h2_goaway_grace_s, self._second_goaway)

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


class H2Stream(H2UpstreamUser):
    """One HTTP/2 request and its response, from the routing decision to the last frame."""

    def __init__(self, conn: H2Connection, stream_id: int, service: str, decision: Decision, baseline: Address,
                 plan: RequestLine, upstream_headers: Headers, grpc: bool, content_length: int) -> None:
        self.conn = conn
        self.state = state = conn.state
        self.stream_id = stream_id
        self.service = service
        self.decision = decision
        self.baseline = baseline
        self.plan = plan
        kind = self.route_kind = decision.kind
        self.destination: Address = (
            decision.destination if kind == "sandbox" and decision.destination else baseline)
        self.upstream_headers = upstream_headers
        self.grpc = grpc
        self.content_length = content_length  # -1: none given
        self.started_at = state.clock()
        self.idle = Deadline(state.loop, self._idle_reached)  # response / stream idle timeout
        self.upstream: StreamUpstream | None = None
        self.up_stream_id = 0
        self.request_done = False
        self.response_started = False
        self.finished = False
        self.status = 0
        self.bytes_out = 0
        self.fallback_used = False
        self.retried = False
        self.sent_body = False  # request DATA was handed to the upstream: no retry or fallback any more
        self.grpc_status = b""
        self.mirror: MirrorCopy | None = None  # a mirror decision's copy of the request, filled as it arrives
        self._pending: list[tuple[bytes, int]] | None = None  # request DATA held while connecting
        self._request_trailers: Headers | None = None
        self._received_bytes = 0
        self._deadline_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, conn: H2Connection, stream_id: int, headers: Headers, ended: bool) -> None:
        """Validate a request head, route it and start forwarding it; raises ``_Malformed``."""
        state = conn.state
        limits = state.limits
        method = scheme = path = authority = host = None
        content_length = -1
        grpc = False
        timeout = b""
        pairs: list[tuple[bytes, bytes]] = []
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
                if not value.isdigit() or content_length != -1:
                    raise _Malformed
                content_length = int(value)
            elif name == b"content-type":
                grpc = value.startswith(_GRPC_CONTENT_TYPE)
            elif name == b"grpc-timeout":
                timeout = value
            elif name == b"host":
                host = value
            pairs.append((name, value))
        if method is None or method == b"CONNECT" or scheme is None or not path:
            raise _Malformed  # CONNECT (plain or extended) is not offered: SETTINGS say so
        if authority is None:
            authority = host
        elif host is not None and host != authority:
            raise _Malformed  # two different hosts: route on neither
        if ended and content_length > 0:
            raise _Malformed
        if len(pairs) > limits.max_header_count:
            conn.streams[stream_id] = stream = cls(conn, stream_id, "", _NO_ROUTE, _NO_ADDRESS,
                                                   RequestLine(method, path, pairs), [], grpc, content_length)
            stream.request_done = ended
            stream.fail(HttpError(431, "too many header fields", "too_many_headers"), None)
            return
        listener = conn.listener
        plan = RequestLine(method, path, pairs)
        authority_str = "" if authority is None else authority.decode("latin-1").lower()
        try:
            service, baseline = listener.target(authority_str)
        except ValueError:
            conn.streams[stream_id] = stream = cls(conn, stream_id, authority_str, _NO_ROUTE, _NO_ADDRESS, plan, [],
                                                   grpc, content_length)
            stream.request_done = ended
            stream.fail(HttpError(400, "cannot route to authority " + repr(authority_str), "bad_authority"), None)
            return
        if authority is None:
            authority = str(baseline).encode("latin-1")
        fields = joined_fields(pairs)
        fields["host"] = authority.decode("latin-1")
        head = RequestHead(method.decode("latin-1"), path.decode("latin-1"), fields)
        decision = state.snapshot.decide(service, head, state.wall_time())  # the stream keeps this snapshot's answer
        upstream_headers = _upstream_headers(conn, head, method, authority, path, pairs)
        stream = cls(conn, stream_id, service, decision, baseline, plan, upstream_headers, grpc, content_length)
        conn.streams[stream_id] = stream
        stream.request_done = ended
        if decision.kind == "mirror":
            stream.mirror = state.mirrors.start_h2(decision, upstream_headers, grpc)
            if stream.mirror is not None and ended:
                stream.mirror.end()
        if timeout:
            seconds = parse_grpc_timeout(timeout)
            if seconds is not None:
                stream._deadline_timer = state.loop.call_later(seconds, stream.deadline_exceeded)
        stream.idle.move(limits.h2_stream_idle_timeout_s if grpc else limits.upstream_response_timeout_s)
        stream.begin()

    # ------------------------------------------------------------------ request side

    def begin(self) -> None:
        """Open the upstream stream on a pooled connection, or start connecting."""
        protocol = (self.decision.upstream_protocol if self.route_kind == "sandbox"
                    else self.conn.listener.upstream_protocol)
        if protocol == "http1" and not self.grpc:  # gRPC always goes HTTP/2 end to end
            if self._pending is None:
                self._pending = []
            H1Bridge(self, self.destination).start()
            return
        conn = self.state.h2_pool.acquire(self.destination)
        if conn is not None:
            self._bind(conn)
        else:
            if self._pending is None:
                self._pending = []
            self.state.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.state.h2_pool.connect(self.destination)
        except HttpError as exc:
            self.upstream_failed(exc)
            return
        if self.finished:
            conn.release()
        else:
            self._bind(conn, True)

    def _bind(self, conn: H2Upstream, reserved: bool = False) -> None:
        pending = self._pending
        self._pending = None
        end = self.request_done and not pending and self._request_trailers is None
        try:
            self.up_stream_id = conn.open_stream(self, self.upstream_headers, end, reserved)
        except ProtocolError:
            # The connection went away between choosing it and using it: nothing was sent.
            self._pending = pending
            if not self.retried:
                self.retried = True
                self.begin()
            else:
                self.upstream_failed(HttpError(503, "upstream connection closing", "upstream_reset"))
            return
        self._attach(conn, pending, not end)

    def attach_upstream(self, bridge: H1Bridge, conn: UpstreamConnection) -> None:
        """An HTTP/1.1 connection is ready for the bridge: send the head and what was held."""
        pending = self._pending
        self._pending = None
        bridge.send_head(conn, self.upstream_headers, pending, self.request_done, self.content_length)
        self._attach(bridge, pending, True)

    def _attach(self, upstream: StreamUpstream, pending: list[tuple[bytes, int]] | None, send_end: bool) -> None:
        self.upstream = upstream
        if pending:
            self.sent_body = True
            for data, flow_len in pending:
                upstream.queue_data(self.up_stream_id, data, self.conn, self.stream_id, flow_len)
        if self.request_done and send_end:
            upstream.queue_end(self.up_stream_id, self._request_trailers)

    def on_request_data(self, data: bytes, flow_len: int) -> None:
        """Request DATA from the client (acknowledged once the upstream took it)."""
        self._received_bytes += len(data)
        if self.content_length != -1 and self._received_bytes > self.content_length:
            self._malformed()
            return
        if self.mirror is not None:
            self.mirror.feed(data)
        if self.finished:
            self.conn.acknowledge(self.stream_id, flow_len)
            return
        self.idle.move(self.state.limits.h2_stream_idle_timeout_s if self.grpc or self.response_started
                    else self.state.limits.upstream_response_timeout_s)
        upstream = self.upstream
        if upstream is not None:
            self.sent_body = True
            upstream.queue_data(self.up_stream_id, data, self.conn, self.stream_id, flow_len)
        elif self._pending is not None:
            self._pending.append((data, flow_len))  # bounded by the window the client was given
        else:
            self.conn.acknowledge(self.stream_id, flow_len)

    def on_request_end(self, trailers: Headers | None) -> None:
        """The client's request is complete."""
        if self.request_done:
            return  # ended with its HEADERS frame: already known (and forwarded) at start
        if self.content_length not in (-1, self._received_bytes):
            self._malformed()
            return
        self.request_done = True
        self._request_trailers = trailers
        if self.mirror is not None:
            self.mirror.end(trailers)
        if self.finished:
            return
        if self.upstream is not None:
            self.upstream.queue_end(self.up_stream_id, trailers)

    def _malformed(self) -> None:
        # content-length and the DATA total disagree: RFC 9113 §8.1.1, a stream error.
        self.state.metrics.downstream_error("h2_content_length")
        self.conn.reset(self.stream_id, ErrorCodes.PROTOCOL_ERROR)
        if self.status == 0:
            self.status = 400
        self._finish()

    def on_client_reset(self) -> None:
        """The client reset the stream: cancel the upstream stream."""
        if self.status == 0:
            self.status = 499  # nginx's "client closed request"
        self._finish()

    def abort(self) -> None:
        """The connection is going away: cancel the upstream side."""
        if self.status == 0:
            self.status = 499
        self._finish()

    # ------------------------------------------------------------------ response side

    def on_up_headers(self, headers: Headers, end: bool) -> None:
        """Pass the response head on (``end``: it is the whole response)."""
        if self.finished:
            return
        conn = self.conn
        status = 0
        out: Headers = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name == b"grpc-status":
                self.grpc_status = value
            out.append((name, value))
        if self.state.debug_headers:
            route = b"baseline" if self.route_kind == "baseline" else str(self.decision.session_id).encode()
            out.append((b"x-turnout-route", route))
        self.status = status
        self.response_started = True
        self.idle.move(self.state.limits.h2_stream_idle_timeout_s)
        try:
            conn.h2.send_headers(self.stream_id, out, end_stream=end)
        except ProtocolError:
            self._finish()
            return
        conn.flush()
        if end:
            self.upstream = None
            self.response_sent()

    def on_up_data(self, data: bytes, flow_len: int) -> None:
        """Response DATA: on to the client; the upstream is acknowledged once it took it."""
        self.bytes_out += len(data)
        conn = self.conn
        if self.finished:
            if self.upstream is not None:
                self.upstream.acknowledge(self.up_stream_id, flow_len)
            return
        self.idle.move(self.state.limits.h2_stream_idle_timeout_s)
        conn.queue_data(self.stream_id, data, self.upstream, self.up_stream_id, flow_len)

    def on_up_end(self, trailers: Headers | None) -> None:
        """The response is complete: end the client's stream after its queued data."""
        if self.finished:
            return
        if trailers is not None:
            for name, value in trailers:
                if name == b"grpc-status":
                    self.grpc_status = value
        self.upstream = None  # the upstream stream is closed on its side
        self.conn.queue_end(self.stream_id, trailers)

    def response_sent(self) -> None:
        """The whole response was handed to the client's transport."""
        if not self.request_done:
            # Answered before the request ended (RFC 9113 §8.1): stop the rest of it.
            self.conn.reset(self.stream_id, ErrorCodes.NO_ERROR)
        self._finish()

    def on_up_reset(self, code: int, retryable: bool) -> None:
        """The upstream reset the stream or its connection failed."""
        if self.finished:
            return
        self.upstream = None
        if not self.response_started:
            if retryable and not self.sent_body and not self.retried:
                # Never processed upstream (REFUSED_STREAM, above a GOAWAY): once more.
                self.retried = True
                self._pending = self._pending or []
                self.begin()
                return
            if code == ErrorCodes.REFUSED_STREAM:
                self.upstream_failed(HttpError(503, "upstream refused the stream", "upstream_refused"))
            else:
                self.upstream_failed(HttpError(502, "upstream reset the stream", "upstream_reset"))
            return
        # Never turn a broken response into a well-formed short one: reset the client too.
        self.state.metrics.upstream_error(self.service, self.route_kind, "upstream_reset")
        self.conn.reset(self.stream_id, code)
        self._finish()

    def upstream_failed(self, error: HttpError) -> None:
        """No response came: fall back to baseline when the route allows it, else answer the error."""
        if self.finished:
            return
        decision = self.decision
        self.state.metrics.upstream_error(self.service, self.route_kind, error.cause)
        if (self.route_kind == "sandbox" and decision.fallback == "baseline" and not self.fallback_used
                and not self.sent_body):
            # Nothing reached the sandbox: send it to baseline instead.
            self.fallback_used = True
            self.route_kind = "baseline"
            self.destination = self.baseline
            self.state.metrics.fallback(self.service)
            self._pending = self._pending or []
            self.begin()
            return
        self.fail(error, decision.session_id if self.route_kind == "sandbox" else None)

    # ------------------------------------------------------------------ timers

    def _idle_reached(self) -> None:
        if self.finished:
            return
        self._cancel_upstream()
        self.state.metrics.upstream_error(self.service, self.route_kind, "upstream_timeout")
        if self.response_started:
            self.conn.reset(self.stream_id, ErrorCodes.CANCEL)
            self._finish()
        else:
            self.fail(HttpError(504, "upstream did not answer in time", "upstream_timeout"), None)

    def deadline_exceeded(self) -> None:
        """``grpc-timeout`` fired: cancel upstream, answer DEADLINE_EXCEEDED."""
        self._deadline_timer = None
        if self.finished:
            return
        self._cancel_upstream()
        self.state.metrics.upstream_error(self.service, self.route_kind, "grpc_deadline")
        conn = self.conn
        if not self.response_started:
            self.fail(HttpError(504, "deadline exceeded", "grpc_deadline"), None, GRPC_DEADLINE_EXCEEDED)
            return
        conn.discard(self.stream_id)
        self.grpc_status = GRPC_DEADLINE_EXCEEDED
        conn.queue_end(self.stream_id, [(b"grpc-status", GRPC_DEADLINE_EXCEEDED),
                                        (b"grpc-message", b"deadline exceeded")])

    # ------------------------------------------------------------------ replies and the end

    def fail(self, error: HttpError, session: str | None, grpc_code: bytes = GRPC_UNAVAILABLE) -> None:
        """Answer the client with an error turnout made (trailers-only for gRPC)."""
        conn = self.conn
        if self.response_started:
            conn.reset(self.stream_id, ErrorCodes.INTERNAL_ERROR)
            self._finish()
            return
        self.response_started = True
        cause = error.cause if session is None else error.cause + "; session=" + session
        cause_bytes = cause.encode("latin-1", "replace")
        if self.grpc:
            self.status = 200
            self.grpc_status = grpc_code
            message = error.reason if session is None else error.reason + " (session " + session + ")"
            headers = trailers_only(grpc_code, message, cause_bytes)
            body = b""
        else:
            self.status = error.status
            body = error.reason.encode("utf-8", "replace") + b"\n"
            headers = [(b":status", b"%d" % error.status), (b"content-type", _TEXT_PLAIN),
                       (b"content-length", b"%d" % len(body)), (b"x-turnout-error", cause_bytes)]
        self.state.metrics.local_reply(self.status)
        try:
            conn.h2.send_headers(self.stream_id, headers, end_stream=not body)
            conn.flush()
        except ProtocolError:
            self._finish()
            return
        if body:
            conn.queue_data(self.stream_id, body, None, 0, 0)
            conn.queue_end(self.stream_id, None)
        else:
            self.response_sent()

    def _cancel_upstream(self) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.forget_stream(self.up_stream_id)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.mirror is not None and not self.request_done:
            self.mirror.cancel()  # never a partial copy
        self.idle.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._cancel_upstream()
        pending = self._pending
        if pending:
            self._pending = None
            for _, flow_len in pending:
                self.conn.acknowledge(self.stream_id, flow_len)  # the connection window still counts them
        if self.decision is not _NO_ROUTE:
            self.state.request_finished(self)
        self.conn.stream_finished(self)


def _upstream_headers(conn: H2Connection, head: RequestHead, method: bytes, authority: bytes, path: bytes,
                      pairs: list[tuple[bytes, bytes]]) -> Headers:
    """The request head sent upstream: pseudo-headers, the client's fields, the proxy's own."""
    out: Headers = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path)]
    xff = None
    proto = False
    baggage_index = -1
    for name, value in pairs:
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if name == b"host":
            continue  # :authority carries it
        if name == b"x-forwarded-proto":
            proto = True
        elif name == b"baggage":
            baggage_index = len(out)
        out.append((name, value))
    found = head.found_key
    if found is not None and found.source.propagate:
        member = conn.state.propagate_member + b"=" + found.value.encode("latin-1", "replace")
        if baggage_index == -1:
            out.append((b"baggage", member))
        else:
            out[baggage_index] = (b"baggage", out[baggage_index][1] + b"," + member)
    out.append((b"x-forwarded-for", conn.peer if xff is None else xff + b", " + conn.peer))
    if not proto:
        out.append((b"x-forwarded-proto", b"http" if conn.listener.tls is None else b"https"))
    return out


# A stream refused before routing (too many fields, bad authority): not counted per route.
_NO_ROUTE: Final = Decision("baseline")
_NO_ADDRESS: Final = Address("0.0.0.0", 0)
