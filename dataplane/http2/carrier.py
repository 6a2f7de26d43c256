"""An HTTP/1.1 request sent to an HTTP/2 upstream (a route's ``upstream_protocol: http2``).

``H2Carrier`` stands where an HTTP/1.1 ``UpstreamConnection`` would for one ``Exchange``:
the exchange begins it with the request head it built and sends the body through it, and
hears back through the same ``UpstreamUser`` callbacks. In between, one stream of a
multiplexed HTTP/2 connection (``H2Pool``) carries the exchange:

* request: the request line becomes ``:method``/``:path``, Host ``:authority``; the
  body's framing becomes DATA frames (chunked trailers become HTTP/2 trailers);
* response: an HTTP/2 head becomes a ``ResponsePlan`` framed by its content-length, else
  chunked towards the client (so trailers survive); HEAD, 204 and 304 have no body.

Flow control stays end to end: response DATA is acknowledged to the upstream only while
the client's connection is not paused; request bytes queued for the upstream's window past
the high watermark pause reading from the client.

This module is compiled with the rest of the per-request path (setup.py's HOT_MODULES):
an ``Exchange`` holds its upstream as an ``UpstreamConnection``, so the carrier subclasses it.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Final

from dataplane.errors import HttpError
from dataplane.http1.semantics import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, ResponsePlan
from dataplane.http2.engine import ErrorCodes, ProtocolError
from dataplane.upstream import NO_TRAILERS, Pool, UpstreamConnection, UpstreamUser
from filters import Address

if TYPE_CHECKING:
    from dataplane.http2.engine import Headers
    from dataplane.http2.upstream import H2Upstream
    from dataplane.worker import WorkerState

# Framing is DATA frames; Expect: 100-continue is answered by the carrier itself.
_NOT_SENT: Final = frozenset({b"transfer-encoding", b"expect"})
_PHRASES: Final = {s.value: s.phrase.encode() for s in HTTPStatus}  # HTTP/2 has no reason phrase: the standard one


class H2Carrier(UpstreamConnection):
    """One HTTP/1.1 exchange on one stream of an HTTP/2 upstream connection."""

    def __init__(self, pool: Pool, address: Address, h2conn: H2Upstream, reserved: bool) -> None:
        super().__init__(pool, address)
        self.h2conn = h2conn
        self.reserved = reserved  # a stream promised by H2Pool.connect, not opened yet
        self.stream_id = 0
        self.request_method = b"GET"
        self.ended = False  # the upstream's response ended (or the stream is gone)
        self.request_ended = False  # END_STREAM was sent (with the head, or by end_body)
        self.queued = 0  # request bytes waiting for the upstream's window
        self.write_blocked = False
        self.hold = False  # the client is slow: response DATA is not acknowledged meanwhile
        self.held = 0

    @staticmethod
    def acquire(state: WorkerState, address: Address) -> H2Carrier | None:
        """A carrier on a pooled HTTP/2 connection with room for a stream, or None."""
        h2conn = state.h2_pool.acquire(address)
        return None if h2conn is None else H2Carrier(state.pool, address, h2conn, False)

    @staticmethod
    async def connect(state: WorkerState, address: Address) -> H2Carrier:
        """A carrier on a new (or newly usable) connection; raises ``HttpError`` 503."""
        h2conn = await state.h2_pool.connect(address)
        return H2Carrier(state.pool, address, h2conn, True)

    # ------------------------------------------------------------------ request side

    def begin(self, user: UpstreamUser, method: bytes, head: bytes, body: int = BODY_NONE) -> None:
        """Send the request head (HTTP/1.1 bytes as ``Exchange`` builds them) on a new stream."""
        self.user = user
        self.request_method = method
        lines = head.split(b"\r\n")
        _, target, _ = lines[0].split(b" ", 2)
        headers: Headers = [(b":method", method), (b":scheme", b"http"), (b":authority", b""), (b":path", target)]
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b": ")
            if name == b"host":
                headers[2] = (b":authority", value)
            elif name not in _NOT_SENT:
                headers.append((name, value))
        reserved = self.reserved
        self.reserved = False
        self.request_ended = body == BODY_NONE
        try:
            self.stream_id = self.h2conn.open_stream(self, headers, body == BODY_NONE, reserved)
        except ProtocolError:
            # The connection went away between choosing it and using it: nothing was sent.
            # Reported from the loop, not from inside the exchange's own begin.
            self.ended = True
            self.pool.state.loop.call_soon(self.on_up_reset, ErrorCodes.REFUSED_STREAM, True)
            return
        if body != BODY_NONE:
            # HTTP/2 takes the body under flow control: a client waiting for 100 Continue
            # (Expect is not forwarded) may send it now, as Envoy answers it by default.
            user.on_informational(100)

    def send_body(self, data: bytes) -> None:
        """Request body bytes: a DATA frame once the upstream's window allows."""
        if self.ended or not data:
            return
        self.queued += len(data)
        self.h2conn.queue_data(self.stream_id, data, self, 0, len(data))
        if not self.write_blocked and self.queued > self.pool.state.limits.write_high_watermark_bytes:
            self.write_blocked = True
            if self.user is not None:
                self.user.on_upstream_writable(False)

    def end_body(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The request is complete: END_STREAM, with trailers when there are any."""
        if not self.ended and not self.request_ended:
            self.request_ended = True
            self.h2conn.queue_end(self.stream_id, trailers or None)

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """Queued request bytes went out: let the client send more once little is left."""
        self.queued -= flow_len
        if self.write_blocked and self.queued <= self.pool.state.limits.write_low_watermark_bytes:
            self.write_blocked = False
            if self.user is not None:
                self.user.on_upstream_writable(True)

    def pause_reading(self) -> None:
        """The client is slow: stop opening the upstream's window."""
        self.hold = True

    def resume_reading(self) -> None:
        """The client caught up: acknowledge what it took meanwhile."""
        self.hold = False
        held = self.held
        if held:
            self.held = 0
            self.h2conn.acknowledge(self.stream_id, held)

    def finish(self, reusable: bool) -> None:
        """The exchange is over: cancel the stream if either side is still open."""
        self.close()

    def close(self) -> None:
        """Give the stream up (RST_STREAM CANCEL when it is still open)."""
        self.user = None
        if self.reserved:
            self.reserved = False
            self.h2conn.release()
        elif self.stream_id:
            self.h2conn.forget_stream(self.stream_id)
        self.ended = True

    # ------------------------------------------------------------------ H2UpstreamUser

    def on_up_headers(self, headers: Headers, end: bool) -> None:
        """The response head: a ``ResponsePlan`` for the exchange."""
        self.got_bytes = True
        status = 0
        length = -1
        lines: list[bytes] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":status":
                    status = int(value)
                continue
            if name == b"content-length":
                length = int(value) if value.isdigit() else -1
            lines.append(name + b": " + value + b"\r\n")
        if end or self.request_method == b"HEAD" or status in (204, 304):
            body = BODY_NONE
        elif length != -1:
            body = BODY_LENGTH if length else BODY_NONE
        else:
            body = BODY_CHUNKED
        user = self.user
        if user is None:
            return
        user.on_response_head(ResponsePlan(status, _PHRASES.get(status, b""), b"".join(lines), body, length, True))
        if end:
            self.ended = True
            if self.user is not None:
                self.user.on_response_end(NO_TRAILERS)
        elif self.user is not None:
            self.user.flush_response_head()

    def on_up_data(self, data: bytes, flow_len: int) -> None:
        """Response DATA: on to the client, acknowledged unless the client is slow."""
        if data and self.user is not None:  # an empty DATA frame (END_STREAM alone) is no chunk
            self.user.on_response_data(data)
        if not flow_len:
            return
        if self.hold:
            self.held += flow_len
        else:
            self.h2conn.acknowledge(self.stream_id, flow_len)

    def on_up_end(self, trailers: Headers | None) -> None:
        """The response is complete (HTTP/2 trailers go out in the client's last chunk)."""
        self.ended = True
        if self.user is not None:
            self.user.on_response_end(trailers or NO_TRAILERS)

    def on_up_reset(self, code: int, retryable: bool) -> None:
        """The stream was reset or the connection failed; ``retryable``: never processed."""
        self.ended = True
        user = self.user
        if user is None:
            return
        if retryable:
            self.reused = True  # as a stale pooled HTTP/1.1 connection: Exchange may retry
            self.got_bytes = False
        if code == ErrorCodes.REFUSED_STREAM:
            error = HttpError(503, "upstream refused the stream", "upstream_refused")
        else:
            error = HttpError(502, "upstream reset the stream", "upstream_reset")
        user.on_upstream_error(error, self.got_bytes)
