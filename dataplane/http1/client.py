"""Upstream HTTP/1.1 connections: one request at a time, kept alive between them.

A connection is its own only stream: ``open_stream`` writes the request head, the body
follows framed by the length the router gives (Content-Length, none, or chunked), and the
response is parsed with the same scanning, codec and validation as client requests
(``read_response``), so a response two parsers could read differently is a 502. HTTP/1.1
bytes are written here and nowhere else.

A connection belongs to one destination address for its whole life (routes change often,
so it never serves another address); ``H1Owner`` is told when it is free again or gone.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Final, Protocol, cast

from dataplane.errors import HttpError
from dataplane.http1.flow import WriteCredit
from dataplane.http1.framing import ChunkedDecoder, ContentLengthDecoder, Decoder, UntilCloseDecoder, chunk, last_chunk
from dataplane.http1.scan import check_head, find_head_end
from dataplane.http1.semantics import read_response
from dataplane.message import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, NO_FIELDS, Response, field_lines
from dataplane.upstream import NOT_CONNECTED, SENT, STALE, STARTED, UpstreamError, UpstreamListener, UpstreamStream

if TYPE_CHECKING:
    from dataplane.config import Limits
    from dataplane.http1.codec import HeadCodec
    from dataplane.message import Fields, Request
    from filters import Address

_IDLE, _HEAD, _BODY, _TUNNEL, _CLOSED = range(5)
# Bytes a new connection may receive before its first request is written (an HTTP/2
# server's SETTINGS frame is a few dozen); more than this and the connection is dropped.
_EARLY_BYTES_MAX: Final = 1024
# Methods whose requests mean nothing by a body: no "content-length: 0" when they have none.
_BODILESS: Final = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE", b"CONNECT"})
# Never sent on HTTP/1.1 from an HTTP/2 request: te is hop-by-hop here, cookies are joined.
_FROM_H2_DROPPED: Final = frozenset({b"te", b"cookie"})
_SWITCHED_UNASKED: Final = "upstream switched protocols unasked"


class H1Owner(Protocol):
    """Where a connection reports that it is free for another request, or closed."""

    loop: asyncio.AbstractEventLoop

    def release(self, conn: H1Client) -> None:
        """The connection finished a request cleanly and may be reused."""

    def forget(self, conn: H1Client) -> None:
        """The connection is closed."""


class H1Client(UpstreamStream):
    """One connection to one upstream address, carrying one request at a time."""

    def __init__(self, owner: H1Owner, address: Address, limits: Limits, codec: HeadCodec) -> None:
        self.owner = owner
        self.address = address
        self.key = (address.host, address.port)  # the pool's key: hashed in C, unlike Address
        self.limits = limits
        self.codec = codec
        self.transport: asyncio.Transport | None = None
        self.listener: UpstreamListener | None = None
        self.reused = False  # carried an earlier request: the peer may have closed it meanwhile
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response
        self._fresh = True  # no request written yet
        self._phase = _IDLE
        # A response head not complete yet: appended to in place, so a head arriving in many
        # small reads costs time linear in its length.
        self._buf = bytearray()
        self._scanned = 0  # how much of _buf find_head_end has examined already
        self._decoder: Decoder | None = None
        self._method = b"GET"
        self._websocket = False
        self._keep_alive = True
        self._ended: Fields | None = None  # trailers of a response not yet reported
        self._chunked = False  # the current request's body is chunked
        self._request_ended = True
        self._credit = WriteCredit()  # for request bytes written while the transport was full
        self._unacked = 0  # response bytes handed on and not yet acknowledged
        self._read_paused = False

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Set watermarks and disable Nagle (heads and small bodies go out at once)."""
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        limits = self.limits
        transport.set_write_buffer_limits(limits.write_high_watermark_bytes, limits.write_low_watermark_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        """Response bytes: head, body, or tunnel bytes."""
        phase = self._phase
        if phase == _BODY:
            assert self._decoder is not None
            try:
                rest = self._decoder.feed(data)
            except HttpError as exc:
                self._fail(exc.status, exc.reason, exc.cause, STARTED)
                return
            if rest:
                self._keep_alive = False  # bytes after the response: never reuse
            self._report_end()
            return
        if phase == _HEAD:
            self.got_bytes = True
            if self._buf:
                self._buf += data
                self._parse_head(self._buf)
            else:
                self._parse_head(data)  # the usual case: the whole head in one read, never copied
        elif phase == _TUNNEL:
            self._deliver(data)
        elif phase == _IDLE and self._fresh and (self._buf or data)[0] == 0 and (
                len(self._buf) + len(data) <= _EARLY_BYTES_MAX):
            # Before the first request: an HTTP/2-only server speaks first (its SETTINGS frame,
            # whose length starts with a zero byte; an HTTP/1.1 answer starts with "H"). Kept,
            # so the request that follows learns it reached the wrong protocol.
            self._buf += data
        else:
            self.cancel()  # unsolicited bytes on an idle connection: it is out of step

    def eof_received(self) -> bool | None:
        """The upstream finished sending: ends a tunnel or a read-until-close body."""
        if self._phase == _TUNNEL:
            listener = self.listener
            if listener is not None:
                listener.on_response_end(NO_FIELDS)  # an orderly end, not an error
            return None
        if self._phase == _BODY and self._decoder is not None:
            try:
                self._decoder.eof()
            except HttpError as exc:
                self._fail(exc.status, exc.reason, exc.cause, STARTED)
                return None
            self._report_end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed: a request in flight fails, how far it got decides what may follow."""
        phase = self._phase
        self._phase = _CLOSED
        self.owner.forget(self)
        listener = self.listener
        if listener is None:
            return
        self.listener = None
        if phase == _TUNNEL:
            listener.on_upstream_error(UpstreamError(502, "upstream closed", "upstream_closed", STARTED))
        elif phase == _BODY:
            listener.on_upstream_error(UpstreamError(502, "upstream closed the connection mid-response",
                                                     "upstream_reset", STARTED))
        elif phase == _HEAD:
            # A reused connection closed before any byte of the answer: most likely the peer
            # had closed it idle, and the request never got there.
            stale = self.reused and not self.got_bytes
            listener.on_upstream_error(UpstreamError(502, "upstream closed the connection", "upstream_reset",
                                                     STALE if stale else SENT))

    def pause_writing(self) -> None:
        """The upstream reads slowly: request bytes written from now on are reported later."""
        self._credit.paused = True

    def resume_writing(self) -> None:
        """The write buffer drained: report the request bytes held back."""
        held = self._credit.drained()
        if held and self.listener is not None:
            self.listener.on_request_taken(held)

    # ------------------------------------------------------------------ Carrier

    @property
    def open(self) -> bool:
        """Whether the connection can still carry a request."""
        return self._phase != _CLOSED and self.transport is not None and not self.transport.is_closing()

    def open_stream(self, listener: UpstreamListener, request: Request, fields: Fields, extra: Fields,
                    extra_lines: bytes, length: int) -> UpstreamStream:
        """Write the request head and expect a response; the connection is the stream."""
        self.listener = listener
        method = request.method
        self._method = method
        self._websocket = request.websocket
        self._phase = _HEAD
        early = bytes(self._buf) if self._fresh else b""
        self._fresh = False
        if self._buf:
            self._buf = bytearray()
        self._scanned = 0
        self._keep_alive = True
        self.got_bytes = False
        self._unacked = 0
        self._credit.held = 0
        self._chunked = length < 0
        self._request_ended = length == 0
        if length > 0:
            framing = b"content-length: %d\r\n\r\n" % length
        elif length < 0:
            framing = b"transfer-encoding: chunked\r\n\r\n"
        elif method in _BODILESS:
            framing = b"\r\n"
        else:
            framing = b"content-length: 0\r\n\r\n"  # RFC 9110 §8.6: say so for a method that takes a body
        if request.http2:
            head = _from_http2(request, fields, extra_lines, framing)
        else:
            head = b"".join((method, b" ", request.target, b" HTTP/1.1\r\n", field_lines(fields), extra_lines,
                             framing))
        assert self.transport is not None
        self.transport.write(head)
        if early:
            self._buf += early
            self.got_bytes = True
            self.owner.loop.call_soon(self._parse_head, self._buf)  # after the caller holds the stream
        return self

    def release(self) -> None:
        """A reserved connection not used after all goes back to the pool."""
        self.owner.release(self)

    # ------------------------------------------------------------------ UpstreamStream

    def send_data(self, data: bytes, flow_len: int) -> None:
        """Request body bytes (raw in a tunnel, a chunk when the body is chunked)."""
        transport = self.transport
        if transport is None or self._phase == _CLOSED:
            return
        if not data:
            pass  # never an empty chunk: chunk(b"") is the last-chunk marker
        elif self._chunked and self._phase != _TUNNEL:
            transport.writelines(chunk(data))
        else:
            transport.write(data)
        if self._credit.written(flow_len) and self.listener is not None:
            self.listener.on_request_taken(flow_len)

    def send_end(self, trailers: Fields) -> None:
        """The last chunk (with trailers) for a chunked body; a half-close for a tunnel."""
        self._request_ended = True
        transport = self.transport
        if transport is None or self._phase == _CLOSED:
            return
        if self._phase == _TUNNEL:
            if not transport.is_closing() and transport.can_write_eof():
                transport.write_eof()
        elif self._chunked:
            transport.write(last_chunk(trailers))

    def acknowledge(self, flow_len: int) -> None:
        """The client took response bytes: read the upstream again once little is left queued."""
        self._unacked -= flow_len
        if self._read_paused and self._unacked <= self.limits.write_low_watermark_bytes:
            self._read_paused = False
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def cancel(self) -> None:
        """Close now; pending request bytes are discarded and nothing more is reported."""
        self.listener = None
        if self._phase != _CLOSED:
            self._phase = _CLOSED
            self.owner.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def finish(self) -> None:
        """Back to the pool when the response allows it and the request was sent whole, else close."""
        self.listener = None
        if self._request_ended and self._keep_alive and self._phase == _IDLE and self.open:
            if self._read_paused:
                self._read_paused = False
                assert self.transport is not None
                self.transport.resume_reading()
            self.owner.release(self)
        else:
            self.cancel()

    # ------------------------------------------------------------------ response parsing

    def _parse_head(self, buf: bytes | bytearray) -> None:
        """Read the response heads at the start of ``buf``: the bytes just received, or ``_buf``."""
        limits = self.limits
        while self._phase == _HEAD:
            try:
                end = find_head_end(buf, 0, limits.max_head_bytes, "response", 0, self._scanned)
                if end == -1:
                    if _looks_like_http2(buf):
                        # Its SETTINGS frame came first: it will never answer in HTTP/1.1.
                        raise HttpError(502, "no HTTP/1.1 response", "upstream_bad_head")
                    if isinstance(buf, bytes):
                        self._buf += buf
                    self._scanned = len(self._buf)
                    return
                head = buf[:end] if isinstance(buf, bytes) else bytes(buf[:end])
                head = check_head(head, limits.max_header_count, limits.max_request_line_bytes, "response")
                response = read_response(self.codec, head, self._method)
            except HttpError as exc:
                if _looks_like_http2(buf):
                    self._fail(502, "the upstream answered in HTTP/2; set upstream_protocol: http2 for it",
                               "upstream_protocol_mismatch", NOT_CONNECTED)
                else:
                    self._fail(exc.status, exc.reason, exc.cause, SENT)
                return
            if isinstance(buf, bytes):
                rest = buf[end:]
            else:  # held in _buf: copied out, and _buf starts over
                rest = bytes(buf[end:])
                self._buf = bytearray()
                self._scanned = 0
            listener = self.listener
            assert listener is not None
            status = response.status
            if status < 200:
                if status == 101:
                    if not self._websocket:
                        self._fail(502, _SWITCHED_UNASKED, "upstream_bad_head", SENT)
                        return
                    self._phase = _TUNNEL
                    self._keep_alive = False
                    listener.on_response_head(response)
                    if rest and self._phase == _TUNNEL:
                        self._deliver(rest)
                    return
                listener.on_informational(status)
                buf = rest
                continue
            body = response.body
            length = response.content_length if body == BODY_LENGTH else 0
            if body <= BODY_LENGTH and len(rest) >= length:
                self._whole_response(listener, response, rest, length)
                return
            self._keep_alive = response.keep_alive
            self._phase = _BODY
            self._decoder = self._make_decoder(response)
            listener.on_response_head(response)
            if rest and self._phase == _BODY:
                self.data_received(rest)
            elif rest:
                self._keep_alive = False

    def _whole_response(self, listener: UpstreamListener, response: Response, rest: bytes, length: int) -> None:
        # The usual small response: head and the whole body in one read, handed on in one
        # call (the client gets it in one write) and without a decoder.
        self._keep_alive = response.keep_alive and len(rest) == length  # bytes after it: never reuse
        self._phase = _IDLE
        listener.on_response(response, rest if len(rest) == length else rest[:length])

    def _make_decoder(self, response: Response) -> Decoder:
        if response.body == BODY_LENGTH:
            return ContentLengthDecoder(response.content_length, self._deliver, self._on_end)
        if response.body == BODY_CHUNKED:
            limits = self.limits
            return ChunkedDecoder(self._deliver, self._on_end, limits.max_chunk_line_bytes,
                                  limits.max_trailer_bytes, status=502)
        if response.body == BODY_NONE:
            return ContentLengthDecoder(0, self._deliver, self._on_end)
        return UntilCloseDecoder(self._deliver, self._on_end)

    def _deliver(self, data: bytes) -> None:
        listener = self.listener
        if listener is None:
            return
        n = len(data)
        self._unacked += n
        if not self._read_paused and self._unacked > self.limits.write_high_watermark_bytes:
            # The client is behind: stop reading until it took most of what it was handed.
            self._read_paused = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()
        listener.on_response_data(data, n)

    def _on_end(self, trailers: Fields) -> None:
        # Reported by _report_end once the caller knows whether bytes followed the response:
        # the listener hands the connection back from on_response_end.
        self._phase = _IDLE
        self._decoder = None
        self._ended = trailers

    def _report_end(self) -> None:
        trailers = self._ended
        if trailers is None:
            return
        self._ended = None
        listener = self.listener
        if listener is not None:
            listener.on_response_end(trailers)

    def _fail(self, status: int, reason: str, cause: str, phase: int) -> None:
        listener = self.listener
        if self._phase in (_BODY, _TUNNEL):
            phase = STARTED
        self.cancel()
        if listener is not None:
            listener.on_upstream_error(UpstreamError(status, reason, cause, phase))


def _from_http2(request: Request, fields: Fields, extra_lines: bytes, framing: bytes) -> bytes:
    """An HTTP/2 request's head in HTTP/1.1: ``:authority`` becomes Host, cookie crumbs one
    field (RFC 9113 §8.2.3), ``te`` is dropped (hop-by-hop)."""
    lines = [request.method, b" ", request.target, b" HTTP/1.1\r\nhost: ", request.authority, b"\r\n"]
    cookies: list[bytes] = []
    for name, value in fields:
        if name in _FROM_H2_DROPPED:
            if name == b"cookie":
                cookies.append(value)
        else:
            lines.append(name + b": " + value + b"\r\n")
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
    lines.append(extra_lines)
    lines.append(framing)
    return b"".join(lines)


def _looks_like_http2(buf: bytes | bytearray) -> bool:
    # An HTTP/2-only server answers an HTTP/1.1 request with its SETTINGS frame (type 4 on
    # stream 0), often followed by a GOAWAY; an HTTP/1.1 response starts with "HTTP/".
    return len(buf) >= 9 and not buf.startswith(b"HTTP/") and buf[3] == 4 and buf[5:9] == b"\0\0\0\0"
