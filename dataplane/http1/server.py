"""The HTTP/1.1 server side: one ``H1Server`` per client connection, one exchange at a time.

It reads and validates: scan the head, parse it (either codec), check it
(``semantics.read_request``), hand the ``Request`` to the router, and feed the body through
turnout's own framing. It writes: the response the router passes back, framed for this
client (Content-Length, chunked, or until close for HTTP/1.0), and the errors it refuses
requests with. Everything in between is the router's. Responses to pipelined requests go
out in order because the next head is not parsed before the current exchange ends.

Phases of a connection::

    HEAD --head parsed--> BODY --body complete--> WAIT --response complete--> HEAD
      \\                                                 (keep-alive) or close
       +--101 Switching Protocols--> TUNNEL
    any --error reply--> LINGER (FIN sent, input discarded until EOF or lingering_timeout_s)
"""

from __future__ import annotations

import asyncio
import socket
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, cast

from dataplane.deadline import Deadline
from dataplane.errors import HttpError
from dataplane.http1.flow import WriteCredit
from dataplane.http1.framing import ChunkedDecoder, ContentLengthDecoder, Decoder, chunk, last_chunk
from dataplane.http1.scan import check_head, find_head_end, skip_leading_crlf
from dataplane.http1.semantics import read_request
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, NO_FIELDS, Fields, field_lines
from dataplane.router import Downstream, listener_plan, local_response

if TYPE_CHECKING:
    from dataplane.config import Limits, Listener
    from dataplane.connections import Connections
    from dataplane.message import Request, Response
    from dataplane.router import Exchange, Router

_HEAD, _BODY, _WAIT, _TUNNEL, _CLOSED, _LINGER = range(6)
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Status lines for the registered codes and their usual phrases (HTTP/2 has no phrase).
_STATUS_LINES: Final = {(s.value, s.phrase.encode()): b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode())
                        for s in HTTPStatus}
_PHRASES: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
# A response's body up to this size is copied after its head, so both leave in one buffer;
# a larger one is written beside it.
_COPY_MAX_BYTES: Final = 16 * 1024


class H1Server(Downstream):
    """One client connection speaking HTTP/1.1 (or 1.0)."""

    def __init__(self, router: Router, connections: Connections, listener: Listener) -> None:
        self.router = router
        self.connections = connections
        self.listener = listener
        self.rt = router.runtime  # the runtime of the request in progress (its limits, its codec)
        self.limits: Limits = self.rt.limits
        self.transport: asyncio.Transport | None = None
        self.peer = b""
        self.forwarded: Fields = NO_FIELDS
        self.forwarded_lines = b""
        self.fixed_target, self.upstream_choice = listener_plan(listener)
        self.phase = _HEAD
        self.exchange: Exchange | None = None
        self.request: Request | None = None
        self.deadline = Deadline(router.loop, self._deadline_reached)
        # A head not complete yet, or the next pipelined request: appended to in place, so a
        # head arriving in many small reads costs time linear in its length.
        self._buf = bytearray()
        self._scanned = 0  # how much of _buf find_head_end has examined already
        self._decoder: Decoder | None = None
        self._read_pauses = 0  # how many reasons there are not to read the client
        self._pipeline_paused = False
        self._unacked = 0  # request body bytes handed to the exchange, not yet taken upstream
        self._unacked_paused = False
        self.credit = WriteCredit()  # for response bytes written while the transport was full
        self._chunked = False  # the current response goes out chunked
        self._keep_alive = False  # the connection stays open after the current response
        self._idle = True  # between requests: closed silently when draining or idle too long
        self._client_done = False  # the client half-closed: close after the current response

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection (or refuse it over the cap) and wait for a head."""
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        limits = self.limits
        transport.set_write_buffer_limits(limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0].encode("latin-1") if isinstance(peer, tuple) else b"unix"
        self.forwarded = [(b"x-forwarded-for", self.peer),
                          (b"x-forwarded-proto", b"http" if self.listener.tls is None else b"https")]
        self.forwarded_lines = field_lines(self.forwarded)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        metrics = self.router.metrics
        if len(self.connections.open) >= limits.max_connections_per_worker:
            metrics.connection_refused()
            self.phase = _CLOSED  # never counted as open, so close() must not count it as closed
            self._refuse(503, "too many connections", "overloaded")
            return
        self.connections.add(self)
        metrics.connection_opened()
        self.deadline.move(limits.header_read_timeout_s)

    def data_received(self, data: bytes) -> None:
        """Bytes from the client: a head, a body, the next pipelined request, or tunnel bytes."""
        phase = self.phase
        if phase == _BODY:
            self.deadline.move(self.limits.body_idle_timeout_s)
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
            if self._buf:
                self._buf += data
                self._read_heads(self._buf)
            else:
                self._read_heads(data)  # the usual case: the whole head in one read, never copied
            if first_bytes and self.phase == _HEAD and not self._idle:
                # The head is not complete: it must be, header_read_timeout_s after its first byte.
                self.deadline.move(self.limits.header_read_timeout_s)
        elif phase == _WAIT:
            self._buffer(data)
        elif phase == _TUNNEL:
            self.deadline.move(self.limits.keepalive_idle_timeout_s)
            if self.exchange is not None:
                self._body(data)
        # _LINGER and _CLOSED: input after an error reply is discarded

    def eof_received(self) -> bool | None:
        """The client stopped sending: a half-close keeps a response or a tunnel flowing back."""
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
            self.exchange.on_request_end(NO_FIELDS)  # the client is done sending: so is the tunnel
            return True
        if self.phase == _WAIT:
            self._client_done = True  # the response still flows back; nothing can follow it
            return True
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone: an exchange in flight is dropped."""
        if self.phase not in (_CLOSED, _LINGER):
            self.router.metrics.connection_closed()
        self.phase = _CLOSED
        self.connections.remove(self)
        self.deadline.cancel()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    def pause_writing(self) -> None:
        """The client reads slowly: response bytes written from now on are reported later."""
        self.credit.paused = True

    def resume_writing(self) -> None:
        """The client caught up: report what it took meanwhile, so the upstream sends more."""
        held = self.credit.drained()
        if held and self.exchange is not None:
            self.exchange.response_taken(held)

    # ------------------------------------------------------------------ reading

    def _pause(self) -> None:
        self._read_pauses += 1
        if self._read_pauses == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume(self) -> None:
        self._read_pauses -= 1
        if self._read_pauses == 0 and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _buffer(self, data: bytes) -> None:
        # Bytes of the next pipelined request, held until the current exchange ends.
        self._buf += data
        if not self._pipeline_paused and len(self._buf) > self.limits.pipeline_buffer_bytes:
            self._pipeline_paused = True
            self._pause()

    def _read_heads(self, buf: bytes | bytearray) -> None:
        """Read the head at the start of ``buf``: the bytes just received, or ``_buf``."""
        rt = self.rt = self.router.runtime  # a new request: the runtime current now
        limits = self.limits = rt.limits
        try:
            pos = skip_leading_crlf(buf, 0) if buf.startswith(b"\r\n") else 0
            end = find_head_end(buf, pos, limits.max_head_bytes, "request", limits.max_request_line_bytes,
                                self._scanned)
            if end == -1:
                if isinstance(buf, bytes):
                    self._buf += buf[pos:] if pos else buf
                elif pos:
                    del buf[:pos]
                self._scanned = len(self._buf)
                return
            head = buf[pos:end] if isinstance(buf, bytes) else bytes(buf[pos:end])
            head = check_head(head, limits.max_header_count, limits.max_request_line_bytes)
            request = read_request(rt.codec, head)
        except HttpError as exc:
            self._buf = bytearray()
            self._scanned = 0
            self.router.metrics.downstream_error(exc.cause)
            self._refuse(exc.status, exc.reason, exc.cause)
            return
        if isinstance(buf, bytes):
            rest = buf[end:]
        else:  # held in _buf: copied out, and _buf starts over
            rest = bytes(buf[end:])
            self._buf = bytearray()
            self._scanned = 0
        self._start(request)
        if rest:
            if self.phase == _BODY:
                self.data_received(rest)
            elif self.phase not in (_CLOSED, _LINGER):
                self._buffer(rest)

    def _start(self, request: Request) -> None:
        self.request = request
        self._idle = False
        self._keep_alive = request.keep_alive
        exchange = self.router.handle(self, request)
        if exchange is None:
            return  # answered already
        self.exchange = exchange
        if request.body == BODY_NONE:
            self.phase = _WAIT
        else:
            self.phase = _BODY
            self.deadline.move(self.limits.body_idle_timeout_s)
            limits = self.limits
            if request.body == BODY_LENGTH:
                self._decoder = ContentLengthDecoder(request.content_length, self._body, self._body_end)
            else:
                self._decoder = ChunkedDecoder(self._body, self._body_end, limits.max_chunk_line_bytes,
                                               limits.max_trailer_bytes)
        exchange.begin()

    def _body(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return  # answered early: the rest of the body is read and dropped
        n = len(data)
        self._unacked += n
        if not self._unacked_paused and self._unacked > self.limits.write_high_watermark_bytes:
            self._unacked_paused = True  # the upstream is behind (or still connecting)
            self._pause()
        exchange.on_request_data(data, n)

    def _body_end(self, trailers: Fields) -> None:
        self._decoder = None
        if self.phase == _BODY:
            self.phase = _WAIT
        exchange = self.exchange
        if exchange is not None:
            exchange.on_request_end(trailers)

    def _request_failed(self, exc: HttpError) -> None:
        self.router.metrics.downstream_error(exc.cause)
        exchange = self.exchange
        self.exchange = None
        self._decoder = None
        if exchange is not None:
            exchange.client_gone(exc.status)
            if exchange.response_started:
                self.close()
                return
        self._refuse(exc.status, exc.reason, exc.cause)

    # ------------------------------------------------------------------ Downstream

    def arm(self, seconds: float) -> None:
        """The exchange's timer (the connection has one, shared by the phases)."""
        if self.phase != _BODY:
            self.deadline.move(seconds)

    def acknowledge(self, flow_len: int) -> None:
        """Request bytes went upstream: read the client again once most are gone."""
        self._unacked -= flow_len
        if self._unacked_paused and self._unacked <= self.limits.write_low_watermark_bytes:
            self._unacked_paused = False
            self._resume()

    def send_informational(self, status: int) -> None:
        """``100 Continue`` to an HTTP/1.1 client that asked for it."""
        request = self.request
        if status == 100 and request is not None and request.expect_continue and self.phase == _BODY:
            self._write(_CONTINUE)

    def send_head(self, head: Response, extra: Fields) -> None:
        """The response head, framed for this client."""
        request = self.request
        assert request is not None
        if head.status == 101:
            self._write(b"HTTP/1.1 101 Switching Protocols\r\n" + _lines(head) + field_lines(extra)
                        + b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
            self._tunnel()
            return
        status_line, keep_alive = self._status_line(head)
        framing = b""
        self._chunked = False
        if head.body >= BODY_CHUNKED or (head.body == BODY_LENGTH and head.content_length < 0):
            if request.version == b"1.1":
                self._chunked = True
                framing = b"transfer-encoding: chunked\r\n"
            else:
                keep_alive = False  # HTTP/1.0: the body ends when the connection does
        self._keep_alive = keep_alive
        self._write(b"".join((status_line, _lines(head), field_lines(extra), framing, _connection(keep_alive,
                                                                                              request.version))))

    def send_response(self, head: Response, extra: Fields, body: bytes) -> None:
        """A whole response, in one write when it is small."""
        status_line, keep_alive = self._status_line(head)
        request = self.request
        version = request.version if request is not None else b"1.1"
        start = b"".join((status_line, _lines(head), field_lines(extra), _connection(keep_alive, version)))
        transport = self.transport
        if transport is not None:
            if len(body) <= _COPY_MAX_BYTES:
                transport.write(start + body)
            else:
                transport.writelines((start, body))
        self._over(keep_alive)

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Response body bytes, as a chunk when the response is chunked."""
        transport = self.transport
        if transport is None:
            return
        if self._chunked:
            transport.writelines(chunk(data))
        else:
            transport.write(data)
        if self.phase == _TUNNEL:
            self.deadline.move(self.limits.keepalive_idle_timeout_s)
        if self.credit.written(flow_len) and self.exchange is not None:
            self.exchange.response_taken(flow_len)

    def send_end(self, trailers: Fields) -> None:
        """The last chunk (with trailers) when chunked; then the next request, or close."""
        if self._chunked:
            self._write(last_chunk(trailers))
        self._over(self._keep_alive and self.phase != _TUNNEL)

    def reset(self) -> None:
        """The response broke: the client must not mistake what it got for a whole response."""
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ writing

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _status_line(self, head: Response) -> tuple[bytes, bool]:
        """The status line, and whether the connection may stay open after this response."""
        status = head.status
        line = _STATUS_LINES.get((status, head.reason))
        if line is None:
            line = b"HTTP/1.1 %d %s\r\n" % (status, head.reason or _PHRASES.get(status, b"Unknown"))
        # Answered before the whole body arrived (or, with Expect: 100-continue, before the
        # client decided to send it): what follows cannot be framed, so close afterwards.
        keep_alive = (self._keep_alive and self.exchange is not None and self.phase == _WAIT
                      and not self.connections.draining)
        return line, keep_alive

    def _tunnel(self) -> None:
        """The upstream accepted a WebSocket upgrade: bytes now flow both ways untouched."""
        self.phase = _TUNNEL
        self.deadline.move(self.limits.keepalive_idle_timeout_s)
        rest = bytes(self._buf)
        self._buf = bytearray()
        if rest and self.exchange is not None:
            self._body(rest)

    def _over(self, keep_alive: bool) -> None:
        """The response is out: on to the next pipelined request, or close."""
        self.exchange = None
        self._chunked = False
        self.credit.held = 0
        self._unacked = 0
        if self._unacked_paused:
            self._unacked_paused = False
            self._resume()
        if self.phase in (_CLOSED, _LINGER):
            return
        if self._client_done:
            self.close()
            return
        if not keep_alive or self.phase == _BODY:
            # Close, and read what the client still sends (the rest of a body answered before
            # it ended) so that the kernel does not reset the connection under the response.
            self._linger()
            return
        self._next()

    def _next(self) -> None:
        self.phase = _HEAD
        self._idle = True
        self._decoder = None
        self.deadline.move(self.limits.keepalive_idle_timeout_s)
        if self._pipeline_paused:
            self._pipeline_paused = False
            self._resume()
        if self._buf:
            self._idle = False
            self.deadline.move(self.limits.header_read_timeout_s)
            self._read_heads(self._buf)

    def _refuse(self, status: int, reason: str, cause: str) -> None:
        """Answer a request refused before routing, then close (lingering)."""
        head, body = local_response(status, reason, cause)
        self.router.metrics.local_reply(status)
        line = _STATUS_LINES.get((status, _PHRASES.get(status, b""))) or b"HTTP/1.1 %d Error\r\n" % status
        self._write(line + _lines(head) + b"connection: close\r\n\r\n" + body)
        self._linger()

    # ------------------------------------------------------------------ timers and closing

    def _deadline_reached(self) -> None:
        phase = self.phase
        if phase == _HEAD:
            if self._idle and not self._buf:
                self.close()  # keep-alive idle timeout, or a client that never spoke
            else:
                self.router.metrics.downstream_error("header_timeout")
                self._refuse(408, "timed out reading the request head", "header_timeout")
        elif phase == _BODY:
            self._request_failed(HttpError(408, "timed out reading the request body", "body_timeout"))
        elif phase == _WAIT and self.exchange is not None:
            exchange = self.exchange
            if self.credit.paused and exchange.response_started:
                # The response stalled because the client stopped reading it, not the upstream.
                self.router.metrics.downstream_error("client_stalled")
                self.exchange = None
                exchange.client_gone()
                self._abort()
            else:
                exchange.timed_out()
        elif phase == _TUNNEL:
            tunnel = self.exchange
            self.exchange = None
            if tunnel is not None:
                tunnel.client_gone()  # idle for too long: the tunnel ends
            self.close()
        elif phase == _LINGER:
            self._abort()

    def _linger(self) -> None:
        # Closing at once would make the kernel answer bytes still in flight from the
        # client with a reset, which can destroy the error reply before it is read.
        if self.phase not in (_CLOSED, _LINGER):
            self.router.metrics.connection_closed()
        self.phase = _LINGER
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.deadline.move(self.limits.lingering_timeout_s)

    def _abort(self) -> None:
        self.phase = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        """Close after what was written has been sent."""
        if self.phase not in (_CLOSED, _LINGER):
            self.router.metrics.connection_closed()
        self.phase = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def drain(self) -> None:
        """Graceful shutdown: close now if idle, else after the current response."""
        if self._idle and not self._buf and self.exchange is None:
            self.close()


def _lines(head: Response) -> bytes:
    block = head.block
    return block if block is not None else field_lines(head.fields)


def _connection(keep_alive: bool, version: bytes) -> bytes:
    if not keep_alive:
        return b"connection: close\r\n\r\n"
    if version == b"1.0":
        return b"connection: keep-alive\r\n\r\n"
    return b"\r\n"
