"""Flow credit for body bytes written to a transport, shared by both HTTP/1.1 sides.

The sender of a body (the client's request upstream, the upstream's response to the client)
may send more once the bytes it handed over are on their way. While the transport's buffer
is full (between asyncio's ``pause_writing`` and ``resume_writing``) written bytes are not
on their way yet: their credit is held and passed on when the buffer drains.
"""

from __future__ import annotations


class WriteCredit:
    """Credit for bytes written to one transport: passed on at once, or held while it is full."""

    def __init__(self) -> None:
        self.paused = False  # the transport's buffer is over its high watermark
        self.held = 0  # credit for bytes written while paused, not passed on yet

    def written(self, flow_len: int) -> bool:
        """``flow_len`` bytes were written: True when their credit is to be passed on now."""
        if self.paused:
            self.held += flow_len
            return False
        return True

    def drained(self) -> int:
        """The buffer drained: the held credit, to pass on now."""
        self.paused = False
        held = self.held
        self.held = 0
        return held
