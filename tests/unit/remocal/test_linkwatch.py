"""LinkWatch on a real event loop with a recording transport: PINGs, the dead-peer timeout, late ticks."""

from __future__ import annotations

import asyncio
from typing import Any

from remocal.tunnel import LinkWatch


class Engine:
    def __init__(self) -> None:
        self.pings = 0

    def ping(self, data: bytes) -> None:
        assert len(data) == 8
        self.pings += 1


class Inner:
    """What LinkWatch drives: records the calls."""

    def __init__(self) -> None:
        self.h2: Any = Engine()
        self.received: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def flush(self) -> None: ...


class Transport:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.protocol: Any = None
        self.closing = False

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def is_reading(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)


def _watch(ping_s: float = 0.02, dead_s: float = 0.06) -> tuple[asyncio.AbstractEventLoop, LinkWatch, Inner,
                                                                  Transport]:
    loop = asyncio.new_event_loop()
    inner = Inner()
    transport = Transport(loop)
    watch = LinkWatch(inner, loop, ping_s, dead_s)
    watch.start(transport, b"early")  # type: ignore[arg-type]
    return loop, watch, inner, transport


def test_a_silent_peer_is_given_up_after_dead_after() -> None:
    loop, watch, inner, transport = _watch(ping_s=0.05, dead_s=0.15)
    try:
        assert inner.received == [b"early"] and watch.bytes_in == 5
        # Generous: a tick that runs late (a loaded machine) skips the check once.
        reason = loop.run_until_complete(asyncio.wait_for(watch.lost, 10))
        assert reason.startswith("no frame from the peer for") and "dead after 150 ms" in reason
        assert transport.closing and inner.lost and inner.h2.pings >= 2
    finally:
        loop.close()


def test_frames_keep_the_link_up_and_pings_go_out() -> None:
    # Frames every 10 ms for at least 0.8 s, over two and a half dead_after periods.
    loop, watch, inner, transport = _watch(ping_s=0.02, dead_s=0.3)

    async def chatter() -> None:
        for _ in range(80):
            watch.data_received(b"x")
            await asyncio.sleep(0.01)

    try:
        loop.run_until_complete(chatter())
        assert not transport.closing and not watch.lost.done()
        assert inner.h2.pings >= 5
        watch.close("done")
        assert loop.run_until_complete(asyncio.wait_for(watch.lost, 2)) == "done"
    finally:
        loop.close()


def test_a_tick_that_runs_late_does_not_count_the_silence() -> None:
    loop, watch, _inner, transport = _watch(ping_s=10.0, dead_s=30.0)
    try:
        now = loop.time()
        watch.last_rx = now - 100  # silent for long...
        watch._due = now - 50  # ...but this process itself did not run for 50 s
        watch._tick()
        assert not transport.closing, "what the peer sent may be waiting unread"
        watch._due = loop.time()  # a tick on time, and still nothing arrived
        watch._tick()
        assert transport.closing
    finally:
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
