"""Mirroring: a best-effort copy of a request to a session's sandbox.

The client's answer always comes from baseline. The copy's body is held in memory up to
``mirror_max_body_bytes`` and sent only once the client's request is complete, so it can
never slow the client down; copies over the size cap, over ``mirror_max_in_flight``, or
that fail are dropped and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataplane.errors import HttpError
from dataplane.http1.semantics import ResponsePlan
from dataplane.upstream import UpstreamConnection, UpstreamUser
from filters import Address, Decision

if TYPE_CHECKING:
    from dataplane.http1.semantics import RequestPlan
    from dataplane.worker import WorkerState


class MirrorCopy:
    """The copy of one request, filled as the client's body arrives."""

    __slots__ = ("manager", "destination", "session", "method", "head", "parts", "size", "dropped")

    def __init__(self, manager: MirrorManager, destination: Address, session: str, method: bytes,
                 head: bytes) -> None:
        self.manager = manager
        self.method = method
        self.destination = destination
        self.session = session
        self.head = head  # request line and fields, without framing or the blank line
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

    def end(self) -> None:
        """The client's request is complete: send the copy."""
        if not self.dropped:
            self.manager.send(self)

    def cancel(self) -> None:
        """The client's request broke off: never send a partial copy."""
        self.dropped = True
        self.parts = []


class _Discard(UpstreamUser):
    """Reads the sandbox's answer to a copy and throws it away."""

    def __init__(self, manager: MirrorManager, conn: UpstreamConnection) -> None:
        self.manager = manager
        self.conn = conn
        self.finished = False
        state = manager.state
        # A copy holds one of mirror_max_in_flight slots: never longer than a real request may wait.
        self.timer = state.loop.call_later(state.limits.upstream_response_timeout_s, self.timed_out)

    def _finish(self) -> bool:
        if self.finished:
            return False
        self.finished = True
        self.timer.cancel()
        self.manager.done()
        return True

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


class MirrorManager:
    """Bounds mirrored requests in flight for one worker."""

    def __init__(self, state: WorkerState) -> None:
        self.state = state
        self.in_flight = 0

    def start(self, decision: Decision, plan: RequestPlan, block: bytes) -> MirrorCopy | None:
        """A copy for a mirror decision, or None when too many are in flight.

        ``block`` is the forwarded request line and fields, without framing or the blank line.
        """
        if self.in_flight >= self.state.limits.mirror_max_in_flight:
            self.state.metrics.mirror_dropped("too_many_in_flight")
            return None
        assert decision.destination is not None and decision.session_id is not None
        head = block + b"x-turnout-mirror: " + decision.session_id.encode() + b"\r\n"
        return MirrorCopy(self, decision.destination, decision.session_id, plan.method, head)

    def send(self, copy: MirrorCopy) -> None:
        """Send a complete copy in the background."""
        if self.in_flight >= self.state.limits.mirror_max_in_flight:
            self.state.metrics.mirror_dropped("too_many_in_flight")
            return
        self.in_flight += 1
        self.state.spawn(self._send(copy))

    async def _send(self, copy: MirrorCopy) -> None:
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

    def done(self) -> None:
        """One copy finished, sent or not."""
        self.in_flight -= 1
