"""The HTTP/1.1 connection manager: one ``Downstream`` per client connection, one
``Exchange`` per request.

Per request: scan and parse the head (either codec), validate it (``semantics``), decide
on the snapshot current at that moment, pick a pooled upstream connection for the
destination, send a head rebuilt from parsed fields, then stream the body both ways.
Flow control is watermarks: a slow upstream pauses reading from the client, a slow client
pauses reading from the upstream. Responses to pipelined requests go out in order because
the next head is not parsed before the current exchange ends.

Phases of a downstream connection::

    HEAD --head parsed--> BODY --body complete--> WAIT --response complete--> HEAD
      \\                                                 (keep-alive) or close
       +--101 Switching Protocols--> TUNNEL
    any --error reply--> LINGER (FIN sent, input discarded until EOF or lingering_timeout_s)
"""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from dataplane.deadline import Deadline
from dataplane.errors import HttpError
from dataplane.http1.framing import ChunkedDecoder, ContentLengthDecoder, Decoder, chunk, last_chunk
from dataplane.http1.scan import check_head, find_head_end, skip_leading_crlf
from dataplane.http1.semantics import (
    BODY_LENGTH,
    BODY_NONE,
    RequestPlan,
    ResponsePlan,
    field_lines,
    plan_request,
)
from dataplane.http2.carrier import H2Carrier
from dataplane.upstream import NO_TRAILERS, UpstreamConnection, UpstreamUser
from filters import Address, Decision, RequestHead
from filters.head import joined_fields

if TYPE_CHECKING:
    from dataplane.config import Listener
    from dataplane.mirror import MirrorCopy
    from dataplane.worker import WorkerState

_HEAD, _BODY, _WAIT, _TUNNEL, _CLOSED, _LINGER = range(6)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Status lines by (status, reason) for the registered codes and their usual phrases.
_STATUS_LINES = {(s.value, s.phrase.encode()): b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())
                 for s in HTTPStatus}
# A response's first body bytes up to this size are copied after its head, so both leave in
# one buffer; larger ones are written beside it.
_COPY_MAX_BYTES = 16 * 1024
_REASONS = {
    400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class Downstream(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state: WorkerState, listener: Listener) -> None:
        self.state = state
        self.listener = listener
        # An inbound listener routes every request to the same service: resolved once here.
        self.fixed_target = listener.target("") if listener.mode == "inbound" else None
        self.baseline_http2 = listener.upstream_protocol == "http2"  # read per request: resolved here once
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.phase = _HEAD
        self.exchange: Exchange | None = None
        self._buf = b""
        self._decoder: Decoder | None = None
        self._read_pauses = 0
        self._pipeline_paused = False
        self.write_paused = False
        self.deadline = Deadline(state.loop, self._deadline_reached)
        self._idle = True  # between requests: closed silently when draining or idle too long

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        state = self.state
        limits = state.limits
        transport.set_write_buffer_limits(limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode("latin-1") if isinstance(peer, tuple) else b"unix"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(state.connections) >= limits.max_connections_per_worker:
            state.metrics.connection_refused()
            self.phase = _CLOSED  # never counted as open, so close() must not count it as closed
            self.local_reply(503, "too many connections", "overloaded")
            return
        state.connections.add(self)
        state.metrics.connection_opened()
        self.deadline.move(limits.header_read_timeout_s)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == _BODY:
            self.deadline.move(self.state.limits.body_idle_timeout_s)
            assert self._decoder is not None
            try:
                rest = self._decoder.feed(data)
            except HttpError as exc:
                self._request_failed(exc)
                return
            if rest:
                self._buffer(rest)
        elif phase == _HEAD:
            first_bytes = self._idle
            self._idle = False
            self._buf = self._buf + data if self._buf else data
            self._read_heads()
            if first_bytes and self.phase == _HEAD and not self._idle:
                # The head is not complete: it must be, header_read_timeout_s after its first byte.
                self.deadline.move(self.state.limits.header_read_timeout_s)
        elif phase == _WAIT:
            self._buffer(data)
        elif phase == _TUNNEL:
            exchange = self.exchange
            if exchange is not None and exchange.upstream is not None:
                exchange.upstream.write(data)
        # _LINGER and _CLOSED: input after an error reply is discarded

    def eof_received(self) -> bool | None:
        if self.phase == _LINGER:
            self._abort()
            return None
        if self.phase == _BODY and self._decoder is not None:
            try:
                self._decoder.eof()
            except HttpError as exc:
                self._request_failed(exc)
                return None
        if self.phase == _TUNNEL and self.exchange is not None:
            if self.exchange.upstream is not None:
                self.exchange.upstream.write_eof()  # the client is done sending: so is the tunnel
            return True  # the upstream's bytes still flow back
        if self.phase == _WAIT:
            return True  # half-close: the response still flows back
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase not in (_CLOSED, _LINGER):
            self.state.metrics.connection_closed()
        self.phase = _CLOSED
        self.state.connections.discard(self)
        self.deadline.cancel()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.abort()
        self.state.connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        exchange = self.exchange
        if exchange is not None and exchange.upstream is not None:
            exchange.upstream.resume_reading()

    # ------------------------------------------------------------------ flow control

    def pause_reading(self) -> None:
        """Count one more reason to stop reading from the client."""
        self._read_pauses += 1
        if self._read_pauses == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Drop one reason to stop reading; reading resumes when none is left."""
        self._read_pauses -= 1
        if self._read_pauses == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _buffer(self, data: bytes) -> None:
        # Bytes of the next pipelined request, held until the current exchange ends.
        self._buf = self._buf + data if self._buf else data
        if not self._pipeline_paused and len(self._buf) > self.state.limits.pipeline_buffer_bytes:
            self._pipeline_paused = True
            self.pause_reading()

    # ------------------------------------------------------------------ timers

    def _deadline_reached(self) -> None:
        phase = self.phase
        if phase == _HEAD:
            if self._idle and not self._buf:
                self.close()  # keep-alive idle timeout, or a client that never spoke
            else:
                self.state.metrics.downstream_error("header_timeout")
                self.local_reply(408, "timed out reading the request head", "header_timeout")
        elif phase == _BODY:
            self._request_failed(HttpError(408, "timed out reading the request body", "body_timeout"))
        elif phase == _WAIT and self.exchange is not None:
            self.exchange.timed_out()
        elif phase == _TUNNEL:
            self.close()
        elif phase == _LINGER:
            self._abort()

    # ------------------------------------------------------------------ requests

    def _read_heads(self) -> None:
        state = self.state
        limits = state.limits
        buf = self._buf
        try:
            pos = skip_leading_crlf(buf, 0) if buf.startswith(b"\r\n") else 0
            end = find_head_end(buf, pos, limits.max_head_bytes, "request", limits.max_request_line_bytes)
            if end == -1:
                if pos:
                    self._buf = buf[pos:]
                return
            head = buf[pos:end]
            check_head(head, limits.max_header_count, limits.max_request_line_bytes)
            plan = plan_request(state.codec.parse_request(head))
        except HttpError as exc:
            self._buf = b""
            state.metrics.downstream_error(exc.cause)
            self.local_reply(exc.status, exc.reason, exc.cause)
            return
        self._buf = b""
        rest = buf[end:]
        self._start(plan)
        if rest:
            if self.phase == _BODY:
                self.data_received(rest)
            elif self.phase != _CLOSED:
                self._buffer(rest)

    def _start(self, plan: RequestPlan) -> None:
        state = self.state
        target = self.fixed_target
        if target is None:
            try:
                target = self.listener.target(plan.authority.decode("latin-1").lower())
            except ValueError:
                self.local_reply(400, "cannot route to authority " + repr(plan.authority.decode("latin-1")),
                                 "bad_authority")
                return
        service, baseline = target
        if not plan.authority:
            # HTTP/1.0 without Host: the upstream request is HTTP/1.1, which requires one.
            plan.authority = str(baseline).encode("latin-1")
            plan.headers = [*plan.headers, (b"host", plan.authority)]
            plan.fields = None
        fields = plan.fields
        if fields is None:
            by_name = dict(plan.headers)
            fields = by_name if len(by_name) == len(plan.headers) else None  # None: a name repeats
        head = RequestHead(plan.method.decode("latin-1"), plan.target.decode("latin-1"),
                           joined_fields(plan.headers, fields))
        snapshot = state.snapshot  # a request keeps the snapshot it started with
        decision = snapshot.decide(service, head, state.wall_time())
        exchange = Exchange(self, plan, service, decision, baseline, head, fields)
        self.exchange = exchange
        self._idle = False
        if plan.body == BODY_NONE:
            self.phase = _WAIT
            self.deadline.move(state.limits.upstream_response_timeout_s)
            exchange.request_done = True
        else:
            self.phase = _BODY
            self.deadline.move(state.limits.body_idle_timeout_s)
            if plan.body == BODY_LENGTH:
                self._decoder = ContentLengthDecoder(plan.content_length, exchange.on_request_data,
                                                     self._on_request_end)
            else:
                self._decoder = ChunkedDecoder(exchange.on_request_data, self._on_request_end,
                                               state.limits.max_chunk_line_bytes, state.limits.max_trailer_bytes)
        exchange.begin()

    def _on_request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self._decoder = None
        exchange = self.exchange
        if self.phase == _BODY:
            self.phase = _WAIT
            self.deadline.move(self.state.limits.upstream_response_timeout_s)
        if exchange is not None:
            exchange.on_request_end(trailers)

    def _request_failed(self, exc: HttpError) -> None:
        self.state.metrics.downstream_error(exc.cause)
        exchange = self.exchange
        self.exchange = None
        if exchange is not None:
            exchange.abort()
            if exchange.response_started:
                self.close()
                return
        self.local_reply(exc.status, exc.reason, exc.cause)

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """The response is complete: next pipelined request, or close."""
        if self.exchange is not exchange:
            return
        self.exchange = None
        self._decoder = None
        if not keep_alive or self.state.draining or self.phase == _CLOSED:
            self.close()
            return
        self.phase = _HEAD
        self._idle = True
        self.deadline.move(self.state.limits.keepalive_idle_timeout_s)
        if self._pipeline_paused:
            self._pipeline_paused = False
            self.resume_reading()
        if self._buf:
            self._idle = False
            self.deadline.move(self.state.limits.header_read_timeout_s)
            self._read_heads()

    def enter_tunnel(self) -> None:
        """The upstream accepted a WebSocket upgrade: bytes now flow both ways untouched."""
        self.phase = _TUNNEL
        self.deadline.move(self.state.limits.keepalive_idle_timeout_s)
        rest = self._buf
        self._buf = b""
        if rest and self.exchange is not None and self.exchange.upstream is not None:
            self.exchange.upstream.write(rest)

    def tunnel_activity(self) -> None:
        """Bytes moved through the tunnel: push the idle deadline back."""
        self.deadline.move(self.state.limits.keepalive_idle_timeout_s)

    # ------------------------------------------------------------------ replies

    def write(self, data: bytes) -> None:
        """Write to the client."""
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, parts: tuple[bytes, ...] | list[bytes]) -> None:
        """Write several buffers to the client."""
        if self.transport is not None:
            self.transport.writelines(parts)

    def local_reply(self, status: int, reason: str, cause: str, session: str | None = None,
                    keep_alive: bool = False, grpc: bool = False) -> None:
        """Answer the client directly (an error turnout made), then close unless told not to."""
        body = reason.encode("utf-8", "replace") + b"\n"
        error = cause if session is None else cause + "; session=" + session
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
            self.state.date_header,
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-turnout-error: " + error.encode("latin-1", "replace") + b"\r\n",
        ]
        if not keep_alive or self.state.draining:
            head.append(b"connection: close\r\n")
            keep_alive = False
        head.append(b"\r\n")
        head.append(body)
        self.writelines(head)
        self.state.metrics.local_reply(status)
        if not keep_alive:
            self._linger()

    def _linger(self) -> None:
        # Closing at once would make the kernel answer bytes still in flight from the
        # client with a reset, which can destroy the error reply before it is read.
        if self.phase not in (_CLOSED, _LINGER):
            self.state.metrics.connection_closed()
        self.phase = _LINGER
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.deadline.move(self.state.limits.lingering_timeout_s)

    def _abort(self) -> None:
        self.phase = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Close after what was written has been sent."""
        if self.phase not in (_CLOSED, _LINGER):
            self.state.metrics.connection_closed()
        self.phase = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        if self._idle and not self._buf and self.exchange is None:
            self.close()


class Exchange(UpstreamUser):
    """One request and its response, from the routing decision to the last byte."""

    # Per-request state that starts the same for every request: class defaults, so an
    # exchange writes only what differs.
    upstream: UpstreamConnection | None = None
    request_done = False
    response_started = False
    finished = False
    status = 0
    bytes_out = 0
    retried = False
    fallback_used = False
    grpc_status = b""  # HTTP/1.1 carries no gRPC; the field is shared with HTTP/2 streams
    mirror: MirrorCopy | None = None
    _pending: list[bytes] | None = None  # body bytes held while connecting
    _trailers: list[tuple[bytes, bytes]] | None = None
    _upstream_paused = False
    _pending_paused = False
    _client_chunked = False
    _held_head: bytes | None = None
    _body_started = False
    _h2 = False  # the upstream is an HTTP/2 stream (route upstream_protocol: http2)

    def __init__(self, conn: Downstream, plan: RequestPlan, service: str, decision: Decision,
                 baseline: Address, head: RequestHead, fields: dict[bytes, bytes] | None) -> None:
        self.conn = conn
        self.state = state = conn.state
        self.plan = plan
        self.service = service
        self.decision = decision
        self.baseline = baseline
        kind = self.route_kind = decision.kind
        self.destination: Address = (
            decision.destination if kind == "sandbox" and decision.destination else baseline)
        self._client_keep_alive = plan.keep_alive
        self.started_at = state.clock()
        block = self._upstream_block(head, fields)
        if plan.body == BODY_NONE:
            self._head_bytes = block + b"\r\n"
        elif plan.body == BODY_LENGTH:
            self._head_bytes = block + b"content-length: %d\r\n\r\n" % plan.content_length
        else:
            self._head_bytes = block + b"transfer-encoding: chunked\r\n\r\n"
        if kind == "mirror":
            self.mirror = state.mirrors.start(decision, plan.method, block)
            if self.mirror is not None and plan.body == BODY_NONE:
                self.mirror.end()

    # ------------------------------------------------------------------ request side

    def _upstream_block(self, head: RequestHead, fields: dict[bytes, bytes] | None) -> bytes:
        """Request line and forwarded fields, without framing fields or the blank line."""
        plan = self.plan
        found = head.found_key
        if (fields is not None and b"x-forwarded-for" not in fields
                and (found is None or not found.source.propagate)):
            # The usual request: every field as parsed, then the proxy's own.
            return b"".join((plan.method, b" ", plan.target, b" HTTP/1.1\r\n", field_lines(plan.headers),
                             b"x-forwarded-for: ", self.conn.peer,
                             b"\r\n" if b"x-forwarded-proto" in fields else b"\r\nx-forwarded-proto: http\r\n"))
        lines: list[bytes] = []
        xff = None
        proto = False
        baggage_index = -1
        for name, value in plan.headers:
            if name == b"x-forwarded-for":
                xff = value if xff is None else xff + b", " + value
                continue
            if name == b"x-forwarded-proto":
                proto = True
            elif name == b"baggage":
                baggage_index = len(lines)
            lines.append(name + b": " + value + b"\r\n")
        if found is not None and found.source.propagate:
            member = self.state.propagate_member + b"=" + found.value.encode("latin-1", "replace")
            if baggage_index == -1:
                lines.append(b"baggage: " + member + b"\r\n")
            else:
                lines[baggage_index] = lines[baggage_index][:-2] + b"," + member + b"\r\n"
        lines.append(b"x-forwarded-for: " + (self.conn.peer if xff is None else xff + b", " + self.conn.peer)
                     + b"\r\n")
        if not proto:
            lines.append(b"x-forwarded-proto: http\r\n")
        return b"".join([plan.method, b" ", plan.target, b" HTTP/1.1\r\n", *lines])

    def begin(self) -> None:
        """Send the request to a pooled connection, or start connecting."""
        http2 = self.decision.upstream_http2 if self.route_kind == "sandbox" else self.conn.baseline_http2
        conn: UpstreamConnection | None
        if http2 and not self.plan.websocket:  # an upgrade has no HTTP/2 form here
            self._h2 = True
            conn = H2Carrier.acquire(self.state, self.destination)
        else:
            self._h2 = False
            conn = self.state.pool.acquire(self.destination)
        if conn is not None:
            self._bind(conn)
        else:
            if self._pending is None:
                self._pending = []
            self.state.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            if self._h2:
                conn: UpstreamConnection = await H2Carrier.connect(self.state, self.destination)
            else:
                conn = await self.state.pool.connect(self.destination)
        except HttpError as exc:
            self._connect_failed(exc)
            return
        if self.finished:
            conn.finish(reusable=True)
            return
        self._bind(conn)

    def _connect_failed(self, exc: HttpError) -> None:
        if self.finished:
            return
        decision = self.decision
        self.state.metrics.upstream_error(self.service, self.route_kind, exc.cause)
        if self.route_kind == "sandbox" and decision.fallback == "baseline" and not self.fallback_used:
            # Nothing reached the sandbox: re-send on baseline.
            self.fallback_used = True
            self.route_kind = "baseline"
            self.destination = self.baseline
            self.state.metrics.fallback(self.service)
            self.begin()
            return
        session = decision.session_id if self.route_kind == "sandbox" else None
        self._fail_before_response(exc, session)

    def _bind(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.begin(self, self.plan.method, self._head_bytes, self.plan.body)
        if self.conn.write_paused:
            conn.pause_reading()  # the client is still behind on an earlier response
        pending = self._pending
        if pending is None:
            return  # a pooled connection at once: nothing was held
        self._pending = None
        if self._pending_paused:
            self._pending_paused = False
            self.conn.resume_reading()
        for data in pending:
            conn.send_body(data)
        if self.request_done:
            conn.end_body(self._trailers or NO_TRAILERS)

    def on_request_data(self, data: bytes) -> None:
        """Request body bytes from the client."""
        self._body_started = True
        if self.mirror is not None:
            self.mirror.feed(data)
        if self._pending is not None:
            self._pending.append(data)
            if len(self._pending) == 8 and not self._pending_paused:  # connecting: hold a little, then wait
                self._pending_paused = True
                self.conn.pause_reading()
            return
        upstream = self.upstream
        if upstream is not None:
            upstream.send_body(data)

    def on_request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The client's request body is complete."""
        self.request_done = True
        if self.mirror is not None:
            self.mirror.end()
        if self._pending is not None:
            self._trailers = trailers
        elif self.upstream is not None:
            self.upstream.end_body(trailers)

    def on_upstream_writable(self, writable: bool) -> None:
        """Upstream buffer crossed a watermark: stop or restart reading the client."""
        if writable == self._upstream_paused:
            self._upstream_paused = not writable
            if writable:
                self.conn.resume_reading()
            else:
                self.conn.pause_reading()

    # ------------------------------------------------------------------ response side

    def on_informational(self, status: int) -> None:
        """Relay ``100 Continue`` when the client asked for it; drop other 1xx."""
        if status == 100 and self.plan.expect_continue and not self._body_started:
            self.conn.write(_CONTINUE)

    def on_response_head(self, plan: ResponsePlan) -> None:
        """Write the response head to the client, rebuilt from parsed fields."""
        state = self.state
        conn = self.conn
        status = plan.status
        if status == 101 and not self.plan.websocket:
            # Not started: the client gets a 502, and nothing the upstream sent after the 101.
            self.on_upstream_error(HttpError(502, "upstream switched protocols unasked", "upstream_bad_head"), False)
            return
        self.response_started = True
        self.status = status
        if status == 101:
            conn.write(b"HTTP/1.1 101 Switching Protocols\r\n" + plan.fields
                       + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
            conn.enter_tunnel()
            return
        # Answered before the whole body arrived (or, with Expect: 100-continue, before the
        # client decided to send it): what follows cannot be framed, so close afterwards.
        keep_alive = self._client_keep_alive and not state.draining and self.request_done
        status_line = _STATUS_LINES.get((status, plan.reason))
        if status_line is None:
            status_line = b"HTTP/1.1 %d %s\r\n" % (status, plan.reason or _REASONS.get(status, b"Unknown"))
        head = status_line + plan.fields
        if plan.body > BODY_LENGTH:  # chunked or until-close upstream
            if self.plan.version == b"1.1":
                self._client_chunked = True
                head += b"transfer-encoding: chunked\r\n"
            else:
                keep_alive = False  # HTTP/1.0 client: the body ends when the connection does
        if state.debug_headers:
            route = b"baseline" if self.route_kind == "baseline" else self.decision.session_id.encode()  # type: ignore[union-attr]
            head += b"x-turnout-route: " + route + b"\r\n"
        if not keep_alive:
            head += b"connection: close\r\n\r\n"
        elif self.plan.version == b"1.0":
            head += b"connection: keep-alive\r\n\r\n"
        else:
            head += b"\r\n"
        self._client_keep_alive = keep_alive
        # Held until the first body bytes (or the end, or the end of this upstream read),
        # so a small response leaves in one write instead of two.
        self._held_head = head

    def flush_response_head(self) -> None:
        """Send a held response head now; the rest of the body is awaited from now on."""
        held = self._held_head
        if held is not None:
            self._held_head = None
            self.conn.write(held)
        if not self.finished:
            self.conn.deadline.move(self.state.limits.body_idle_timeout_s)

    def on_response_data(self, data: bytes) -> None:
        """Stream response body bytes to the client."""
        self.bytes_out += len(data)
        held = self._held_head
        if held is not None:
            # The head arrived in this same upstream read: flush_response_head sets the
            # body deadline at its end, unless the response is complete by then.
            self._held_head = None
            if self._client_chunked:
                self.conn.writelines((held, *chunk(data)))
            elif len(data) <= _COPY_MAX_BYTES:
                self.conn.write(held + data)
            else:
                self.conn.writelines((held, data))
            return
        self.conn.deadline.move(self.state.limits.body_idle_timeout_s)
        if self._client_chunked:
            self.conn.writelines(chunk(data))
        else:
            self.conn.write(data)

    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response is complete: release the upstream and move the client on."""
        held = self._held_head
        if held is not None:
            self._held_head = None
            self.conn.write(held + last_chunk(trailers) if self._client_chunked else held)
        elif self._client_chunked:
            self.conn.write(last_chunk(trailers))
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.finish(reusable=self.request_done)
        self._complete(self._client_keep_alive and self.request_done)

    def on_tunnel_data(self, data: bytes) -> None:
        """Upgraded-connection bytes from the upstream."""
        self.conn.write(data)
        self.conn.tunnel_activity()

    def on_tunnel_end(self) -> None:
        """The upstream closed the tunnel: close the client after what it was sent."""
        self.upstream = None
        self._complete(False)

    def on_upstream_error(self, error: HttpError, response_started: bool) -> None:
        """The upstream failed: retry, fall back, answer with an error, or cut the client off."""
        if self.finished:
            return
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close()
        if self.response_started or response_started:
            # Never turn a broken response into a well-formed short one.
            self.state.metrics.upstream_error(self.service, self.route_kind, error.cause)
            self._complete(False)
            if self.conn.transport is not None:
                self.conn.transport.abort()
            return
        if (upstream is not None and upstream.reused and not upstream.got_bytes and not self.retried
                and self.plan.method in _IDEMPOTENT and self.plan.body == BODY_NONE):
            # A pooled connection the upstream had closed: once more on a fresh one.
            self.retried = True
            self._pending = []
            self.state.spawn(self._connect())
            return
        self.state.metrics.upstream_error(self.service, self.route_kind, error.cause)
        session = self.decision.session_id if self.route_kind == "sandbox" else None
        self._fail_before_response(error, session)

    def timed_out(self) -> None:
        """No response head within the upstream response timeout."""
        if self.response_started:
            self.on_upstream_error(HttpError(504, "upstream response stalled", "upstream_timeout"), True)
            return
        session = self.decision.session_id if self.route_kind == "sandbox" else None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close()
        self.state.metrics.upstream_error(self.service, self.route_kind, "upstream_timeout")
        self._fail_before_response(HttpError(504, "upstream did not answer in time", "upstream_timeout"), session)

    def _fail_before_response(self, error: HttpError, session: str | None) -> None:
        self.status = error.status
        keep = self.request_done and self._client_keep_alive
        self._complete(keep, local=True)
        self.conn.local_reply(error.status, error.reason, error.cause, session, keep_alive=keep)
        if keep:
            self.conn.exchange_done(self, True)

    def _complete(self, keep_alive: bool, local: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        if self._upstream_paused:
            self._upstream_paused = False
            self.conn.resume_reading()
        if self._pending_paused:
            self._pending_paused = False
            self.conn.resume_reading()
        self.state.request_finished(self)
        if not local:
            self.conn.exchange_done(self, keep_alive)

    def abort(self) -> None:
        """The client went away or sent a broken body: drop the upstream side."""
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.close()
        if self.mirror is not None:
            self.mirror.cancel()
        if not self.finished:
            self.finished = True
            if self.status == 0:
                self.status = 499  # nginx's "client closed request"
            self.state.request_finished(self)

