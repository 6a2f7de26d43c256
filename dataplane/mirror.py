"""Mirroring: a best-effort copy of a request to a session's sandbox.

The client's answer always comes from baseline. The copy's body is held in memory up to
``mirror_max_body_bytes`` and sent only once the client's request is complete, so it can
never slow the client down; copies over the size cap, over ``mirror_max_in_flight``, or
that fail are dropped and counted.

HTTP/1.1 requests are copied over HTTP/1.1 (``start``); HTTP/2 requests (``start_h2``) over
a multiplexed HTTP/2 upstream connection, with their trailers, unless the route says
``upstream_protocol: http1`` (and the request is not gRPC): then as HTTP/1.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from dataplane.errors import HttpError
from dataplane.http1.semantics import ResponsePlan
from dataplane.http2.bridge import http1_block
from dataplane.http2.engine import ProtocolError
from dataplane.http2.upstream import H2Upstream
from dataplane.upstream import UpstreamConnection, UpstreamUser
from filters import Address, Decision

if TYPE_CHECKING:
    from dataplane.worker import WorkerState

Headers = list[tuple[bytes, bytes]]


class MirrorCopy:
    """The copy of one request, filled as the client's body arrives."""

    __slots__ = ("manager", "destination", "session", "method", "head", "h2_head", "trailers", "parts", "size",
                 "dropped")

    def __init__(self, manager: MirrorManager, destination: Address, session: str, method: bytes,
                 head: bytes, h2_head: Headers | None = None) -> None:
        self.manager = manager
        self.method = method
        self.destination = destination
        self.session = session
        self.head = head  # HTTP/1.1: request line and fields, without framing or the blank line
        self.h2_head = h2_head  # HTTP/2: the head to send on a new stream (then ``head`` is unused)
        self.trailers: Headers | None = None
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = False

    def feed(self, data: bytes) -> None:
        """More body bytes; past the size cap the copy is dropped."""
        if self.dropped:
            return
        self.size += len(data)
        if self.size > self.manager.state.limits.mirror_max_body_bytes:
            self.dropped = True
            self.parts = []
            self.manager.state.metrics.mirror_dropped("too_large")
            return
        self.parts.append(data)

    def end(self, trailers: Headers | None = None) -> None:
        """The client's request is complete: send the copy (HTTP/2 copies keep ``trailers``)."""
        if not self.dropped:
            self.trailers = trailers
            self.manager.send(self)

    def cancel(self) -> None:
        """The client's request broke off: never send a partial copy."""
        self.dropped = True
        self.parts = []


class _Slot:
    """One of ``mirror_max_in_flight`` slots, held by a copy until its answer ends or its time
    is up: never longer than a real request may wait for its answer."""

    __slots__ = ("manager", "finished", "timer")

    def __init__(self, manager: MirrorManager, timed_out: Callable[[], None]) -> None:
        self.manager = manager
        self.finished = False
        state = manager.state
        self.timer = state.loop.call_later(state.limits.upstream_response_timeout_s, timed_out)

    def release(self) -> bool:
        """Give the slot back; False when it was already."""
        if self.finished:
            return False
        self.finished = True
        self.timer.cancel()
        self.manager.done()
        return True


class _Discard(UpstreamUser):
    """Reads the sandbox's answer to a copy and throws it away."""

    def __init__(self, manager: MirrorManager, conn: UpstreamConnection) -> None:
        self.manager = manager
        self.conn = conn
        self.slot = _Slot(manager, self.timed_out)

    def _finish(self) -> bool:
        return self.slot.release()

    def on_response_head(self, plan: ResponsePlan) -> None:
        self.manager.state.metrics.mirror_sent(plan.status)

    def on_response_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self._finish():
            self.conn.finish(reusable=True)

    def on_upstream_error(self, error: HttpError, response_started: bool) -> None:
        if self._finish():
            self.manager.state.metrics.mirror_dropped(error.cause)

    def timed_out(self) -> None:
        if self._finish():
            self.conn.close()
            self.manager.state.metrics.mirror_dropped("timeout")


class _DiscardH2:
    """Reads the sandbox's HTTP/2 answer to a copy and throws it away."""

    def __init__(self, manager: MirrorManager, conn: H2Upstream) -> None:
        self.manager = manager
        self.conn = conn
        self.stream_id = 0
        self.slot = _Slot(manager, self.timed_out)

    def _finish(self) -> bool:
        return self.slot.release()

    def on_up_headers(self, headers: Headers, end: bool) -> None:
        for name, value in headers:
            if name == b":status":
                self.manager.state.metrics.mirror_sent(int(value))
        if end:
            self._finish()

    def on_up_data(self, data: bytes, flow_len: int) -> None:
        self.conn.acknowledge(self.stream_id, flow_len)

    def on_up_end(self, trailers: Headers | None) -> None:
        self._finish()

    def on_up_reset(self, code: int, retryable: bool) -> None:
        if self._finish():
            self.manager.state.metrics.mirror_dropped("upstream_reset")

    def timed_out(self) -> None:
        if self._finish():
            self.conn.forget_stream(self.stream_id)
            self.manager.state.metrics.mirror_dropped("timeout")


class MirrorManager:
    """Bounds mirrored requests in flight for one worker."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.in_flight = 0

    def start(self, decision: Decision, method: bytes, block: bytes) -> MirrorCopy | None:
        """A copy for a mirror decision, or None when too many are in flight.

        ``block`` is the forwarded request line and fields, without framing or the blank line.
        """
        if self.in_flight >= self.state.limits.mirror_max_in_flight:
            self.state.metrics.mirror_dropped("too_many_in_flight")
            return None
        assert decision.destination is not None and decision.session_id is not None
        head = block + b"x-turnout-mirror: " + decision.session_id.encode() + b"\r\n"
        return MirrorCopy(self, decision.destination, decision.session_id, method, head)

    def start_h2(self, decision: Decision, headers: Headers, grpc: bool) -> MirrorCopy | None:
        """A copy of an HTTP/2 request (``headers``: the head forwarded upstream, pseudo-fields
        first), or None when too many are in flight."""
        if self.in_flight >= self.state.limits.mirror_max_in_flight:
            self.state.metrics.mirror_dropped("too_many_in_flight")
            return None
        assert decision.destination is not None and decision.session_id is not None
        marker = (b"x-turnout-mirror", decision.session_id.encode())
        method = next((v for n, v in headers if n == b":method"), b"GET")
        if decision.upstream_protocol == "http1" and not grpc:
            return MirrorCopy(self, decision.destination, decision.session_id, method,
                              http1_block(headers) + b"x-turnout-mirror: " + marker[1] + b"\r\n")
        h2_head = [(n, v) for n, v in headers if n != b"content-length"]  # the copy may be cut: framed by DATA
        h2_head.append(marker)
        return MirrorCopy(self, decision.destination, decision.session_id, method, b"", h2_head)

    def send(self, copy: MirrorCopy) -> None:
        """Send a complete copy in the background."""
        if self.in_flight >= self.state.limits.mirror_max_in_flight:
            self.state.metrics.mirror_dropped("too_many_in_flight")
            return
        self.in_flight += 1
        self.state.spawn(self._send(copy))

    async def _send(self, copy: MirrorCopy) -> None:
        if copy.h2_head is not None:
            await self._send_h2(copy, copy.h2_head)
            return
        pool = self.state.pool
        conn = pool.acquire(copy.destination)
        if conn is None:
            try:
                conn = await pool.connect(copy.destination)
            except HttpError as exc:
                self.state.metrics.mirror_dropped(exc.cause)
                self.done()
                return
        head = copy.head + b"content-length: %d\r\n\r\n" % copy.size
        conn.begin(_Discard(self, conn), copy.method, head)
        if copy.parts:
            conn.writelines(copy.parts)

    async def _send_h2(self, copy: MirrorCopy, head: Headers) -> None:
        pool = self.state.h2_pool
        conn = pool.acquire(copy.destination)
        reserved = False
        if conn is None:
            try:
                conn = await pool.connect(copy.destination)
            except HttpError as exc:
                self.state.metrics.mirror_dropped(exc.cause)
                self.done()
                return
            reserved = True
        user = _DiscardH2(self, conn)
        parts = copy.parts
        try:
            user.stream_id = stream_id = conn.open_stream(user, head, not parts and copy.trailers is None, reserved)
        except ProtocolError:
            user.on_up_reset(0, False)  # the connection went away meanwhile
            return
        for data in parts:
            conn.queue_data(stream_id, data, None, 0, 0)
        if parts or copy.trailers is not None:
            conn.queue_end(stream_id, copy.trailers)

    def done(self) -> None:
        """One copy finished, sent or not."""
        self.in_flight -= 1
