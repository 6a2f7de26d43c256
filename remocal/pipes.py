"""Byte pipes over one HTTP/2 connection (``CONNECT`` streams, RFC 9113 §8.5), on turnout's engine.

The outgoing link of ``turnout connect``: the machine is the HTTP/2 client and opens one
``CONNECT host:port`` stream per connection its program makes through the local proxy; the
gateway is the server, dials ``host:port`` from inside the cluster (when the caller's policy
allows it) and answers ``200`` (or ``403`` naming the rule, ``502`` when the dial fails),
after which DATA frames carry the bytes both ways and END_STREAM is a half-close. Flow
control is the engine's: what arrives is acknowledged when the reader takes it, and a
writer waits (``Pipe.write``) while the peer's window is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

from dataplane.http2.engine import (
    ConnectionTerminated,
    DataReceived,
    ErrorCodes,
    H2Engine,
    Headers,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

WINDOW: Final = 256 * 1024
CONNECTION_WINDOW: Final = 1024 * 1024
MAX_PIPES: Final = 256


class Pipe:
    """One stream as a byte pipe."""

    def __init__(self, conn: PipeConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.head: asyncio.Future[Headers] = conn.loop.create_future()
        self._inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._outbound = bytearray()
        self._end = False  # END_STREAM wanted (no more writes)
        self._end_sent = False
        self._drained = asyncio.Event()
        self._drained.set()
        self.closed = False

    async def read(self) -> bytes:
        """The next bytes from the peer; ``b""`` at its end (or when the pipe broke)."""
        data = await self._inbound.get()
        if data is None:
            self._inbound.put_nowait(None)  # every later read sees the end too
            return b""
        self.conn.acknowledge(self.stream_id, len(data))
        return data

    async def write(self, data: bytes) -> None:
        """Send bytes; waits while more than a window's worth is waiting for the peer."""
        self._check_open()
        self._outbound += data
        self._drained.clear()
        self.conn.pump(self)
        if len(self._outbound) > WINDOW:
            await self._drained.wait()
            if self._outbound:
                self._check_open()

    def _check_open(self) -> None:
        if self.closed or self._end:
            raise ConnectionError("the pipe is closed")

    def end(self) -> None:
        """Half-close: END_STREAM after what is queued."""
        if not self._end and not self.closed:
            self._end = True
            self.conn.pump(self)

    def reset(self) -> None:
        """Abort the stream."""
        if not self.closed:
            self.conn.reset(self.stream_id)
            self._broken()

    # ------------------------------------------------------------------ from the connection

    def _feed(self, data: bytes) -> None:
        self._inbound.put_nowait(data)

    def _eof(self) -> None:
        self._inbound.put_nowait(None)

    def _broken(self) -> None:
        self.closed = True
        self._inbound.put_nowait(None)
        self._drained.set()
        if not self.head.done():
            self.head.set_exception(ConnectionError("the stream was reset"))
            self.head.exception()


class PipeConnection(asyncio.Protocol):
    """An HTTP/2 connection whose streams are pipes. ``on_connect(pipe, authority)`` serves each
    ``CONNECT`` request on the server side."""

    def __init__(self, client_side: bool, loop: asyncio.AbstractEventLoop,
                 on_connect: Callable[[Pipe, str], None] | None = None) -> None:
        self.h2 = H2Engine(client_side, max_concurrent_streams=0 if client_side else MAX_PIPES,
                           initial_window_size=WINDOW, connection_window_size=CONNECTION_WINDOW)
        self.loop = loop
        self.on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.pipes: dict[int, Pipe] = {}
        self.ready: asyncio.Future[None] = loop.create_future()
        self._write_paused = False
        self._flush_scheduled = False

    # ------------------------------------------------------------------ opening (client side)

    async def open(self, authority: str) -> Pipe:
        """``CONNECT authority``; raises ``ConnectionRefusedError`` with the peer's reason when
        it answers anything but 2xx."""
        stream_id = self.h2.get_next_available_stream_id()
        pipe = self.pipes[stream_id] = Pipe(self, stream_id)
        self.h2.send_headers(stream_id, [(b":method", b"CONNECT"), (b":authority", authority.encode("latin-1"))])
        self.flush()
        headers = await pipe.head
        status = dict(headers).get(b":status", b"0")
        if not status.startswith(b"2"):
            reason = dict(headers).get(b"x-turnout-error", b"").decode("latin-1")
            message = (await pipe.read()).decode("utf-8", "replace").strip()
            raise ConnectionRefusedError(f"{status.decode()} {message or reason}".strip())
        return pipe

    # ------------------------------------------------------------------ answering (server side)

    def answer(self, pipe: Pipe, status: int, message: str = "", error: str = "") -> None:
        """Answer a CONNECT: 2xx opens the pipe; anything else carries ``message`` and ends it."""
        headers: Headers = [(b":status", b"%d" % status)]
        if error:
            headers.append((b"x-turnout-error", error.encode("latin-1", "replace")))
        if 200 <= status < 300:
            self.h2.send_headers(pipe.stream_id, headers)
        else:
            body = message.encode() + b"\n"
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
            self.h2.send_headers(pipe.stream_id, headers)
            pipe._outbound += body
            pipe._end = True
            self.pump(pipe)
        self.flush()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self._flush_now()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, DataReceived):
                pipe = self.pipes.get(event.stream_id)
                if pipe is None:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                    continue
                if event.data:
                    pipe._feed(event.data)
                    if event.flow_controlled_length > len(event.data):  # padding
                        self.acknowledge(event.stream_id, event.flow_controlled_length - len(event.data))
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                if event.stream_ended:
                    pipe._eof()
            elif isinstance(event, RequestReceived):
                self._request(event.stream_id, event.headers, event.stream_ended)
            elif isinstance(event, ResponseReceived):
                pipe = self.pipes.get(event.stream_id)
                if pipe is not None and not pipe.head.done():
                    pipe.head.set_result(event.headers)
                    if event.stream_ended:
                        pipe._eof()
            elif isinstance(event, TrailersReceived):
                pipe = self.pipes.get(event.stream_id)
                if pipe is not None:
                    pipe._eof()
            elif isinstance(event, StreamReset):
                pipe = self.pipes.pop(event.stream_id, None)
                if pipe is not None:
                    pipe._broken()
            elif isinstance(event, WindowUpdated):
                for pipe in list(self.pipes.values()) if not event.stream_id else \
                        [p for p in (self.pipes.get(event.stream_id),) if p is not None]:
                    self.pump(pipe)
            elif isinstance(event, RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                for pipe in list(self.pipes.values()):
                    self.pump(pipe)
            elif isinstance(event, ConnectionTerminated):
                self._break_all()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before SETTINGS"))
            self.ready.exception()
        self._break_all()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for pipe in list(self.pipes.values()):
            self.pump(pipe)

    # ------------------------------------------------------------------ plumbing

    def flush(self) -> None:
        """Write what the engine produced, at the end of this loop iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def acknowledge(self, stream_id: int, flow_len: int) -> None:
        """Bytes taken: open the window again."""
        if self.h2.acknowledge(stream_id, flow_len):
            self.flush()

    def pump(self, pipe: Pipe) -> None:
        """Send what the windows allow of a pipe's queued bytes, then its end."""
        h2 = self.h2
        stream_id = pipe.stream_id
        while not self._write_paused and not pipe._end_sent:
            size = h2.sendable(stream_id)
            if size < 0:
                pipe._outbound.clear()
                pipe._broken()
                break
            if not pipe._outbound:
                if pipe._end:
                    pipe._end_sent = True
                    h2.end_stream(stream_id)
                break
            if size == 0:
                break  # until the peer opens its window
            chunk = bytes(pipe._outbound[:size])
            del pipe._outbound[:size]
            last = pipe._end and not pipe._outbound
            h2.send_data(stream_id, chunk, last)
            pipe._end_sent = last
        if not pipe._outbound:
            pipe._drained.set()
        self.flush()

    def reset(self, stream_id: int) -> None:
        """RST_STREAM CANCEL."""
        self.pipes.pop(stream_id, None)
        self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        self.flush()

    def _request(self, stream_id: int, headers: Headers, ended: bool) -> None:
        fields = dict(headers)
        pipe = self.pipes[stream_id] = Pipe(self, stream_id)
        if ended:
            pipe._eof()
        authority = fields.get(b":authority", b"").decode("latin-1")
        if fields.get(b":method") != b"CONNECT" or not authority or b":path" in fields or self.on_connect is None:
            self.answer(pipe, 405, "only CONNECT host:port is served here", "method_not_allowed")
            return
        self.on_connect(pipe, authority)

    def _break_all(self) -> None:
        for pipe in list(self.pipes.values()):
            pipe._broken()
        self.pipes.clear()


async def splice(pipe: Pipe, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 first: bytes = b"") -> None:
    """Copy both ways between a pipe and a socket until both sides ended."""

    async def up() -> None:
        try:
            if first:
                await pipe.write(first)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await pipe.write(data)
        except (ConnectionError, OSError):
            pipe.reset()
            return
        pipe.end()

    async def down() -> None:
        try:
            while True:
                data = await pipe.read()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pipe.reset()

    try:
        await asyncio.gather(up(), down())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
