"""The supervisor's link to a worker process: one kept-open Unix connection.

The supervisor sends a worker the configuration it validated (at start and on every
reload) and every change of the pushed sessions through it; workers never read the
configuration file themselves. Pushes are frequent and every worker of every proxy applies
each one, so they do not go through the HTTP admin socket (a connection and an HTTP parse
per push): a frame is a 4-byte big-endian length and a JSON message (``{"kind": "config",
...}`` or ``{"kind": "sessions", ...}``); the answer is a frame holding a 3-digit status and
the worker's message. One message is in flight per link at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dataplane.admin import Response
from dataplane.process.statefile import PushedState
from filters import RuleLimits, Session, parse_session

_LENGTH = struct.Struct(">I")


def push_socket_path(admin_socket: str) -> str:
    """Where a worker takes pushed sessions, next to its admin socket."""
    return admin_socket + ".push"


class PushReceiver(asyncio.Protocol):
    """Worker side: reads message frames, answers each with ``handler``'s response, in order."""

    def __init__(self, handler: Callable[[bytes], Awaitable[Response]], max_frame_bytes: int) -> None:
        self._handler = handler
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._frames: asyncio.Queue[bytes] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._task = asyncio.get_running_loop().create_task(self._answer())

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
            self._frames.put_nowait(bytes(self._buf[4 : 4 + length]))
            del self._buf[: 4 + length]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _answer(self) -> None:
        while True:
            frame = await self._frames.get()
            status, _, payload = await self._handler(frame)
            answer = b"%03d" % status + payload
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(_LENGTH.pack(len(answer)) + answer)


class PushLink:
    """Supervisor side: sends a change to one worker and waits for its answer."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self, timeout_s: float) -> None:
        """Wait for a new worker to listen: its socket file appears at bind, before it accepts
        connections, so refusals are retried until ``timeout_s`` (then ``send`` reports)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.02)

    async def send(self, message: bytes, timeout_s: float) -> Response:
        """The worker's (status, content type, message); 503 when it cannot be reached."""
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    if self._writer is None or self._writer.is_closing():
                        self._reader, self._writer = await asyncio.open_unix_connection(self.path)
                    assert self._reader is not None
                    self._writer.write(_LENGTH.pack(len(message)) + message)
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


def config_message(source: Mapping[str, Any]) -> bytes:
    """A bootstrap configuration the supervisor validated (the parsed file, as JSON)."""
    return json.dumps({"kind": "config", "config": source}, separators=(",", ":")).encode()


def sessions_message(state: PushedState, from_version: str | None, upserted: tuple[Session, ...],
                     removed: tuple[str, ...]) -> bytes:
    """A change of the pushed sessions from ``from_version`` (None: the whole set)."""
    return json.dumps({
        "kind": "sessions",
        "version": state.version,
        "from_version": from_version,
        "control_plane_id": state.control_plane_id,
        "upsert": [s.to_dict() for s in upserted],
        "versions": {s.id: state.sessions[s.id][1] for s in upserted},
        "remove": list(removed),
    }, separators=(",", ":")).encode()


class SessionChange:
    """A decoded ``sessions`` message, its sessions validated again as every proxy does."""

    def __init__(self, message: Mapping[str, Any], limits: RuleLimits) -> None:
        self.version = str(message["version"])
        base = message.get("from_version")
        self.from_version = None if base is None else str(base)
        self.control_plane_id = str(message.get("control_plane_id", ""))
        self.upserted = [parse_session(spec, "upsert", limits) for spec in message.get("upsert", [])]
        self.versions = {str(k): str(v) for k, v in (message.get("versions") or {}).items()}
        self.removed = [str(sid) for sid in message.get("remove", [])]
