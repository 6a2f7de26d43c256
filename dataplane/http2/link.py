"""What both ends of an HTTP/2 hop share: an HTTP/2 engine on a transport, and data
queued per stream until the peer's flow-control window and our write buffer allow it.

Flow control is end to end, per stream: when queued bytes go out, ``data_sent`` tells the
subclass, which tells the other side of the exchange, which gives the bytes back to its own
sender (opening that stream's window again). A peer that stops reading therefore stops the
peer that writes, and the proxy holds at most one stream window per stream in between. The
connection's own window is opened again as soon as DATA arrives (as Envoy does; the engine
does it): the stream windows bound what is held, and one stream whose reader is slow (one
client that does not read, sharing an upstream connection with everyone else) never stalls
the other streams.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import cast

from dataplane.http2.engine import ErrorCodes, H2Engine, Headers


class _Outbound:
    """Data for one stream waiting for window or buffer space, then how the stream ends."""

    __slots__ = ("chunks", "end", "trailers")

    def __init__(self) -> None:
        # [data, flow-controlled length to report through data_sent once it went out]
        self.chunks: deque[tuple[bytes, int]] = deque()
        self.end = False
        self.trailers: Headers | None = None


class H2Link(asyncio.Protocol):
    """An HTTP/2 engine on an asyncio transport, with per-stream outbound queues."""

    def __init__(self, h2: H2Engine, pause_reading_when_blocked: bool) -> None:
        self.h2 = h2
        # A client that does not read gets nothing more processed while our buffer is full:
        # its PINGs and SETTINGS would otherwise queue acknowledgements without bound. Not for
        # upstreams: one that stops reading while we stop reading it would never recover.
        self.pause_reading_when_blocked = pause_reading_when_blocked
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self.closed = False
        self._queues: dict[int, _Outbound] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.linger_s = 0.0  # > 0: close_with half-closes and discards input this long (client side)

    # ------------------------------------------------------------------ transport

    def setup_transport(self, transport: asyncio.BaseTransport, high: int, low: int) -> asyncio.Transport:
        """Keep the transport, set its watermarks and disable Nagle (frames are small)."""
        self.transport = tr = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._loop = asyncio.get_running_loop()
        tr.set_write_buffer_limits(high, low)
        sock = tr.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return tr

    def flush(self) -> None:
        """Write what the engine has produced at the end of this loop iteration: every frame made
        meanwhile, for every stream, leaves in one write (one system call, one wake-up of
        the peer) instead of one each."""
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        """Write whatever the engine has produced, now (before a close, or before raw frames)."""
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.pause_reading_when_blocked and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.pause_reading_when_blocked and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self.pump_all()

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """A GOAWAY that leaves the connection usable for streams up to ``last_stream_id``
        (the first, advisory GOAWAY of RFC 9113 §6.8)."""
        self.h2.goaway(last_stream_id, error_code)
        self.flush_now()

    def close_with(self, error_code: int, last_stream_id: int | None = None) -> None:
        """Send a final GOAWAY and close after it is written."""
        if self.closed:
            return
        self.h2.close_connection(error_code, last_stream_id)
        self.flush_now()
        self.closed = True
        transport = self.transport
        if transport is None:
            return
        if self.linger_s > 0 and self._loop is not None and not transport.is_closing() and transport.can_write_eof():
            # Lingering close (as for HTTP/1.1 error replies): FIN after the GOAWAY, then read
            # and drop what the client still sends (WINDOW_UPDATEs, SETTINGS ACKs) for a
            # while. Closing with unread input would make the kernel send RST, and a client
            # that gets RST may lose the GOAWAY and the tail of its last responses.
            transport.write_eof()
            transport.resume_reading()
            self._loop.call_later(self.linger_s, transport.close)
        else:
            transport.close()

    # ------------------------------------------------------------------ flow control

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """The bytes received on ``stream_id`` were taken: let the sender send more on it."""
        if self.h2.acknowledge(stream_id, flow_len):
            self.flush()

    def queue_data(self, stream_id: int, data: bytes, flow_len: int) -> None:
        """Send ``data`` on ``stream_id`` when window and buffer allow; ``data_sent(stream_id,
        flow_len)`` follows once it went out."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = _Outbound()
        queue.chunks.append((data, flow_len))
        self.pump(stream_id)

    def queue_last(self, stream_id: int, data: bytes) -> None:
        """Send ``data`` as the end of ``stream_id`` (END_STREAM on its last DATA frame)."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = _Outbound()
        queue.chunks.append((data, 0))
        queue.end = True
        self.pump(stream_id)

    def queue_end(self, stream_id: int, trailers: Headers | None) -> None:
        """End ``stream_id`` (with trailers, if any) after the data queued before."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = _Outbound()
        queue.end = True
        queue.trailers = trailers
        self.pump(stream_id)

    def queued(self, stream_id: int) -> bool:
        """Whether data or an end is still waiting to be sent on ``stream_id``."""
        return stream_id in self._queues

    def discard(self, stream_id: int) -> None:
        """Drop what is queued for a stream (its window no longer matters: the stream is over,
        and connection windows reopen as DATA arrives, not as it is passed on)."""
        self._queues.pop(stream_id, None)

    def pump_all(self) -> None:
        """Send what the windows allow on every stream that has something queued."""
        for stream_id in list(self._queues):
            if self.write_paused:
                return
            self.pump(stream_id)

    def pump(self, stream_id: int) -> None:
        """Send queued data on one stream as far as the windows and the write buffer allow;
        the stream's end goes with its last DATA frame when there are no trailers."""
        queue = self._queues.get(stream_id)
        if queue is None or self.closed:
            return
        h2 = self.h2
        size = h2.sendable(stream_id)
        if size < 0:
            # The stream was reset or closed meanwhile: nothing more can go on it.
            self.discard(stream_id)
            return
        chunks = queue.chunks
        while chunks and not self.write_paused:
            data, flow_len = chunks[0]
            if len(data) > size:
                if size == 0:
                    return  # until the peer gives window
                h2.send_data(stream_id, data[:size])
                chunks[0] = (data[size:], flow_len)
                self.flush()
                size = h2.sendable(stream_id)
                continue
            chunks.popleft()
            last = not chunks and queue.end and queue.trailers is None
            if data or last:
                h2.send_data(stream_id, data, last)
                self.flush()
                size = h2.sendable(stream_id)
            if flow_len:
                self.data_sent(stream_id, flow_len)
            if last:
                del self._queues[stream_id]
                self.stream_sent(stream_id)
                return
        if chunks or not queue.end or self.write_paused:
            return
        del self._queues[stream_id]
        if queue.trailers is not None:
            h2.send_headers(stream_id, queue.trailers, end_stream=True)
        else:
            h2.end_stream(stream_id)
        self.flush()
        self.stream_sent(stream_id)

    def data_sent(self, stream_id: int, flow_len: int) -> None:
        """Data queued on ``stream_id`` with ``flow_len`` went out: credit whoever sent it."""

    def stream_sent(self, stream_id: int) -> None:
        """Everything for ``stream_id`` was handed to the transport, end included."""

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """Reset one stream and forget what was queued for it."""
        self.discard(stream_id)
        if self.closed:
            return
        self.h2.reset_stream(stream_id, code)
        self.flush()
