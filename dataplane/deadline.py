"""``Deadline``: one timer per connection or stream, moved lazily.

Requests move their owner's deadline several times each (head read, upstream response,
body idle, keep-alive idle). Cancelling and re-creating a timer every time costs more than
the rest of a small request; here, moving a deadline later is an attribute write, and the
timer, when it fires early, re-arms itself for the deadline now current. Only a deadline
earlier than the armed timer re-arms at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """A deadline that calls ``expired`` once the loop's clock reaches it."""

    __slots__ = ("_loop", "_expired", "at", "_handle", "_handle_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self._loop = loop
        self._expired = expired
        self.at = 0.0  # loop time of the deadline; 0: none
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = 0.0

    def move(self, seconds: float) -> None:
        """The deadline is now ``seconds`` from now (earlier or later than before)."""
        at = self._loop.time() + seconds
        self.at = at
        handle = self._handle
        if handle is None or at < self._handle_at:
            if handle is not None:
                handle.cancel()
            self._handle_at = at
            self._handle = self._loop.call_at(at, self._fire)

    def clear(self) -> None:
        """No deadline for now (the armed timer, if any, fires and does nothing)."""
        self.at = 0.0

    def cancel(self) -> None:
        """No deadline, and no timer: the owner is gone. The callback (usually a method of
        the owner, which holds this deadline) is dropped too, so the owner is freed at once
        by reference counting instead of waiting, with all it holds, for the cyclic garbage
        collector."""
        self.at = 0.0
        self._expired = _gone
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        at = self.at
        if not at:
            return
        if self._loop.time() < at:
            self._handle_at = at
            self._handle = self._loop.call_at(at, self._fire)
            return
        self.at = 0.0
        self._expired()


def _gone() -> None:
    """A cancelled deadline's callback: never called (no timer is left to call it)."""
