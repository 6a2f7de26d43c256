"""The supervisor's link to a worker for pushed sessions: one kept-open Unix connection.

Pushes are frequent and every worker of every proxy applies each one, so they do not go
through the HTTP admin socket (a connection and an HTTP parse per push): a frame is a
4-byte big-endian length and a JSON change; the answer is a frame holding a 3-digit
status and the worker's message. One change is in flight per link at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable

from dataplane.admin import Response

_LENGTH = struct.Struct(">I")


def push_socket_path(admin_socket: str) -> str:
    """Where a worker takes pushed sessions, next to its admin socket."""
    return admin_socket + ".push"


class PushReceiver(asyncio.Protocol):
    """Worker side: reads change frames, answers each with ``handler``'s response."""

    def __init__(self, handler: Callable[[bytes], Response], max_frame_bytes: int) -> None:
        self._handler = handler
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > self._max:
                assert self._transport is not None
                self._transport.close()  # only the supervisor talks here; a bad frame ends the link
                return
            if len(self._buf) < 4 + length:
                return
            frame = bytes(self._buf[4 : 4 + length])
            del self._buf[: 4 + length]
            status, _, payload = self._handler(frame)
            answer = b"%03d" % status + payload
            assert self._transport is not None
            self._transport.write(_LENGTH.pack(len(answer)) + answer)


class PushLink:
    """Supervisor side: sends a change to one worker and waits for its answer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def send(self, change: bytes, timeout_s: float) -> Response:
        """The worker's (status, content type, message); 503 when it cannot be reached."""
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    if self._writer is None or self._writer.is_closing():
                        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                    assert self._reader is not None
                    self._writer.write(_LENGTH.pack(len(change)) + change)
                    (length,) = _LENGTH.unpack(await self._reader.readexactly(4))
                    answer = await self._reader.readexactly(length)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.close()
                return 503, "text/plain", f"worker push link {self.path}: {exc or type(exc).__name__}\n".encode()
        return int(answer[:3]), "text/plain", answer[3:]

    def close(self) -> None:
        """Drop the connection (the next send reconnects)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
