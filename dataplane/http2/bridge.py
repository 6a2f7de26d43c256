"""An HTTP/2 request sent to an HTTP/1.1 upstream (a route's ``upstream_protocol: http1``),
and its response translated back.

``H1Bridge`` stands where an ``H2Upstream`` would for one ``H2Stream``: the stream hands it
request DATA, the end and trailers with the same calls, and hears back through the same
``H2UpstreamUser`` callbacks. In between, one pooled HTTP/1.1 connection
(``dataplane.upstream``) carries the exchange:

* request: ``:method``/``:path`` become the request line, ``:authority`` the Host field,
  ``cookie`` fields are joined with ``"; "`` (RFC 9113 §8.2.3), ``te`` is dropped; the body
  is framed by the client's content-length, by its known size when the request already
  ended, else chunked (request trailers then go in the last chunk, otherwise they are
  dropped: HTTP/1.1 cannot carry them);
* response: status and fields become an HTTP/2 head (names are lower case already, the
  hop-by-hop fields are gone), a chunked body's trailers become HTTP/2 trailers, 1xx
  responses are not forwarded.

Flow control stays end to end: client DATA is acknowledged once the upstream transport took
it and is below its high watermark; the upstream is read again only once the client took
what was queued for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from dataplane.errors import HttpError
from dataplane.http1.semantics import BODY_CHUNKED, BODY_LENGTH, ResponsePlan
from dataplane.http2.engine import ErrorCodes
from dataplane.upstream import UpstreamConnection, UpstreamUser

if TYPE_CHECKING:
    from dataplane.http2.engine import Headers
    from dataplane.http2.link import Acknowledger
    from dataplane.http2.server import H2Stream
    from filters import Address

# Methods whose requests carry no body when none is sent: no "content-length: 0" for them.
_BODILESS: Final = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})
_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
_DROPPED: Final = frozenset({b"te", b"cookie", b"content-length"})


class H1Bridge(UpstreamUser):
    """One HTTP/2 stream's exchange with an HTTP/1.1 upstream."""

    conn: UpstreamConnection | None = None
    request_ended = False  # the whole request was handed to the upstream connection
    response_started = False
    done = False  # the response ended or the exchange was given up
    _write_paused = False
    _read_paused = False
    _queued = 0  # response bytes handed to the client's connection, not yet taken

    def __init__(self, stream: H2Stream, destination: Address) -> None:
        self.stream = stream
        self.state = stream.state
        self.destination = destination
        self._held_acks: list[tuple[Acknowledger, int, int]] = []

    # ------------------------------------------------------------------ connecting

    def start(self) -> None:
        """Use a pooled connection to the destination, or open one."""
        conn = self.state.pool.acquire(self.destination)
        if conn is not None:
            self.stream.attach_upstream(self, conn)
        else:
            self.state.spawn(self._connect())

    async def _connect(self) -> None:
        try:
            conn = await self.state.pool.connect(self.destination)
        except HttpError as exc:
            self.done = True
            self.stream.upstream_failed(exc)
            return
        if self.done or self.stream.finished:
            self.done = True
            conn.finish(reusable=True)
            return
        self.stream.attach_upstream(self, conn)

    def send_head(self, conn: UpstreamConnection, headers: Headers, pending: list[tuple[bytes, int]] | None,
                  ended: bool, content_length: int) -> None:
        """Write the request head built from the stream's HTTP/2 head (``pending``: DATA held
        while connecting; ``ended``: the client's request is already complete)."""
        self.conn = conn
        method = headers[0][1]  # H2Stream puts :method first
        body = BODY_LENGTH
        if content_length != -1:
            framing = b"content-length: %d\r\n\r\n" % content_length
        elif ended:
            size = sum(len(data) for data, _ in pending) if pending else 0
            framing = b"content-length: %d\r\n\r\n" % size if size or method not in _BODILESS else b"\r\n"
        else:
            body = BODY_CHUNKED
            framing = b"transfer-encoding: chunked\r\n\r\n"
        conn.begin(self, method, http1_block(headers) + framing, body)

    # ------------------------------------------------------------------ as the stream's upstream

    def queue_data(self, stream_id: int, data: bytes, sender: Acknowledger | None, sender_stream: int,
                   flow_len: int) -> None:
        """Request DATA: written now, acknowledged to the client unless the upstream is full."""
        conn = self.conn
        if conn is None or self.done:
            if sender is not None:
                sender.acknowledge(sender_stream, flow_len)
            return
        if data:
            conn.send_body(data)
        if sender is not None:
            if self._write_paused:
                self._held_acks.append((sender, sender_stream, flow_len))
            else:
                sender.acknowledge(sender_stream, flow_len)

    def queue_end(self, stream_id: int, trailers: Headers | None) -> None:
        """The client's request is complete (trailers only survive chunked framing)."""
        self.request_ended = True
        if self.conn is not None and not self.done:
            self.conn.end_body(trailers or [])

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """The client's connection took ``flow_len`` response bytes: read the upstream again
        once little is left queued."""
        self._queued -= flow_len
        if self._read_paused and self._queued <= self.state.limits.write_low_watermark_bytes:
            self._read_paused = False
            if self.conn is not None:
                self.conn.resume_reading()

    def forget_stream(self, stream_id: int) -> None:
        """The stream is over: an unfinished exchange closes its connection."""
        self._release_acks()
        if self.done:
            return
        self.done = True
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------------ UpstreamUser

    def on_response_head(self, plan: ResponsePlan) -> None:
        """Status and fields become an HTTP/2 head."""
        if plan.status == 101:
            self._failed(HttpError(502, "upstream switched protocols unasked", "upstream_bad_head"), False)
            return
        self.response_started = True
        headers: Headers = [(b":status", b"%d" % plan.status)]
        for line in plan.fields.split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                headers.append((name, value.strip(b" \t")))
        self.stream.on_up_headers(headers, False)

    def on_response_data(self, data: bytes) -> None:
        """Body bytes: on to the client; stop reading the upstream while a window's worth waits."""
        if self.done:
            return
        self._queued += len(data)
        if not self._read_paused and self._queued > self.state.limits.write_high_watermark_bytes:
            self._read_paused = True
            if self.conn is not None:
                self.conn.pause_reading()
        self.stream.on_up_data(data, len(data))

    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response is complete: the connection goes back to the pool if the request did too."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        self.conn = None
        if conn is not None:
            if self._read_paused:
                conn.resume_reading()
            conn.finish(reusable=self.request_ended)
        self.stream.on_up_end(trailers or None)

    def on_upstream_writable(self, writable: bool) -> None:
        """The upstream's write buffer crossed a watermark: hold or release the client's window."""
        self._write_paused = not writable
        if writable:
            self._release_acks()

    def on_upstream_error(self, error: HttpError, response_started: bool) -> None:
        """The connection failed or sent something invalid."""
        self._failed(error, response_started)

    # ------------------------------------------------------------------ internals

    def _failed(self, error: HttpError, response_started: bool) -> None:
        if self.done:
            return
        self.done = True
        conn = self.conn
        self.conn = None
        stream = self.stream
        if self.response_started or response_started:
            if conn is not None:
                conn.close()
            stream.on_up_reset(ErrorCodes.INTERNAL_ERROR, False)
            return
        retry = (conn is not None and conn.reused and not conn.got_bytes and not stream.sent_body and not stream.retried
                 and stream.plan.method in _IDEMPOTENT)
        if conn is not None:
            conn.close()
        if retry:
            stream.on_up_reset(ErrorCodes.REFUSED_STREAM, True)  # a pooled connection the upstream had closed
        else:
            stream.upstream_failed(error)

    def _release_acks(self) -> None:
        held = self._held_acks
        if held:
            self._held_acks = []
            for sender, sender_stream, flow_len in held:
                sender.acknowledge(sender_stream, flow_len)


def http1_block(headers: Headers) -> bytes:
    """An HTTP/2 request head as an HTTP/1.1 request line and fields, without framing fields or
    the blank line: ``:authority`` becomes Host, ``cookie`` fields one field, ``te`` is dropped."""
    method = path = authority = b""
    lines: list[bytes] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name in _DROPPED:
            if name == b"cookie":
                cookies.append(value)
        else:
            lines.append(name + b": " + value + b"\r\n")
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies) + b"\r\n")
    return b"".join([method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"\r\n", *lines])
