"""The client connections of one worker: counted against the cap, drained at shutdown."""

from __future__ import annotations

import asyncio
from typing import Protocol


class ClientConnection(Protocol):
    """An open client connection, as the worker counts, drains and closes it."""

    def drain(self) -> None:
        """Finish what is in flight, take nothing new, then close."""

    def close(self) -> None:
        """Close now."""


class Connections:
    """Open client connections of every protocol, and whether the worker is draining."""

    def __init__(self) -> None:
        self.open: set[ClientConnection] = set()
        self.draining = False
        self._drained: asyncio.Event | None = None

    def add(self, conn: ClientConnection) -> None:
        """A connection was accepted (and counted)."""
        self.open.add(conn)

    def remove(self, conn: ClientConnection) -> None:
        """A connection closed."""
        self.open.discard(conn)
        if self._drained is not None and not self.open:
            self._drained.set()

    async def drain(self, timeout_s: float) -> None:
        """Ask every connection to finish, wait up to ``timeout_s``, then close the rest."""
        self.draining = True
        for conn in list(self.open):
            conn.drain()
        if not self.open:
            return
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        except TimeoutError:
            for conn in list(self.open):
                conn.close()
