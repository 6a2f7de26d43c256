"""Mirroring: a best-effort copy of a request to a session's sandbox.

The client's answer always comes from baseline. The copy's body is held in memory up to
``mirror_max_body_bytes`` and sent only once the client's request is complete, so it can
never slow the client down; copies over the size cap, over ``mirror_max_in_flight``, or
that fail are dropped and counted. A copy goes through the same upstream interface as every
request, over HTTP/1.1 or HTTP/2 as the route says (gRPC always HTTP/2), with its
trailers when the protocol can carry them, and is marked ``x-turnout-mirror: <session>``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from dataplane.message import field_lines
from dataplane.upstream import UpstreamError, UpstreamListener

if TYPE_CHECKING:
    from dataplane.config import Limits
    from dataplane.message import Fields, Request, Response
    from dataplane.metrics import Metrics
    from dataplane.upstream import Carrier, UpstreamStream
    from dataplane.upstreams import Upstreams
    from filters import Address


class MirrorCopy(UpstreamListener):
    """The copy of one request, filled as the client's body arrives, then sent and its answer
    thrown away."""

    def __init__(self, manager: MirrorManager, destination: Address, session_id: str, request: Request,
                 fields: Fields, extra: Fields, limits: Limits, http2: bool) -> None:
        self.manager = manager
        self.destination = destination
        self.request = request
        self.fields = fields  # the head as forwarded to baseline, then the proxy's own and the marker
        self.extra: Fields = [*extra, (b"x-turnout-mirror", session_id.encode())]
        self.limits = limits
        self.http2 = http2
        self.trailers: Fields = []
        self.parts: list[bytes] = []
        self.size = 0
        self.dropped = False
        self.stream: UpstreamStream | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False

    def feed(self, data: bytes) -> None:
        """More body bytes; past the size cap the copy is dropped."""
        if self.dropped:
            return
        self.size += len(data)
        if self.size > self.limits.mirror_max_body_bytes:
            self.dropped = True
            self.parts = []
            self.manager.metrics.mirror_dropped("too_large")
            return
        self.parts.append(data)

    def end(self, trailers: Fields) -> None:
        """The client's request is complete: send the copy."""
        if not self.dropped:
            self.trailers = trailers
            self.manager.send(self)

    def cancel(self) -> None:
        """The client's request broke off: never send a partial copy."""
        self.dropped = True
        self.parts = []

    # ------------------------------------------------------------------ sending

    async def run(self) -> None:
        """Connect (or take a pooled connection) and send the whole copy."""
        http2 = self.http2
        manager = self.manager
        self._timer = manager.loop.call_later(self.limits.upstream_response_timeout_s, self._timed_out)
        upstreams = manager.upstreams
        carrier: Carrier | None = upstreams.acquire(self.destination, http2)
        if carrier is None:
            try:
                carrier = await upstreams.connect(self.destination, http2)
            except UpstreamError as exc:
                self._drop(exc.cause)
                return
        if self._done:
            carrier.release()
            return
        try:
            stream = carrier.open_stream(self, self.request, self.fields, self.extra, field_lines(self.extra),
                                         self.size)
        except UpstreamError as exc:
            self._drop(exc.cause)
            return
        self.stream = stream
        for data in self.parts:
            stream.send_data(data, 0)
        self.parts = []
        stream.send_end(self.trailers)

    def on_response_head(self, head: Response) -> None:
        """The sandbox answered: counted, the answer is read and dropped."""
        self.manager.metrics.mirror_sent(head.status)

    def on_response_data(self, data: bytes, flow_len: int) -> None:
        """Thrown away, and the sandbox may send more."""
        if self.stream is not None:
            self.stream.acknowledge(flow_len)

    def on_response_end(self, trailers: Fields) -> None:
        """The answer is complete: the connection may serve another request."""
        stream = self.stream
        if self._finish() and stream is not None:
            stream.finish()

    def on_upstream_error(self, error: UpstreamError) -> None:
        """The copy failed: dropped and counted."""
        self._drop(error.cause)

    def _timed_out(self) -> None:
        stream = self.stream
        if self._finish():
            if stream is not None:
                stream.cancel()
            self.manager.metrics.mirror_dropped("timeout")

    def _drop(self, cause: str) -> None:
        if self._finish():
            self.manager.metrics.mirror_dropped(cause)

    def _finish(self) -> bool:
        # The in-flight slot is held until the answer ends or the time is up: never longer
        # than a real request may wait for its answer.
        if self._done:
            return False
        self._done = True
        self.stream = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.manager.in_flight -= 1
        return True


class MirrorManager:
    """Bounds mirrored requests in flight for one worker."""

    def __init__(self, upstreams: Upstreams, metrics: Metrics, loop: asyncio.AbstractEventLoop,
                 spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.upstreams = upstreams
        self.metrics = metrics
        self.loop = loop
        self.spawn = spawn
        self.in_flight = 0

    def start(self, destination: Address, session_id: str, request: Request, fields: Fields, extra: Fields,
              limits: Limits, http2: bool, request_done: bool) -> MirrorCopy | None:
        """A copy of ``request`` for a mirror route (``http2``: sent over HTTP/2), or None when
        too many are in flight."""
        if self.in_flight >= limits.mirror_max_in_flight:
            self.metrics.mirror_dropped("too_many_in_flight")
            return None
        copy = MirrorCopy(self, destination, session_id, request, fields, extra, limits, http2)
        if request_done:
            copy.end([])
        return copy

    def send(self, copy: MirrorCopy) -> None:
        """Send a complete copy in the background."""
        if self.in_flight >= copy.limits.mirror_max_in_flight:
            self.metrics.mirror_dropped("too_many_in_flight")
            return
        self.in_flight += 1
        self.spawn(copy.run())
