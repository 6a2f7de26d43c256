"""``Deadline``: fires once at the current deadline, moves lazily, and lets its owner go."""

from __future__ import annotations

import asyncio
import gc
import weakref

from dataplane.deadline import Deadline


class _Owner:
    """Holds a deadline whose callback is one of its methods (a reference cycle)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fired = 0
        self.deadline = Deadline(loop, self.expired)

    def expired(self) -> None:
        self.fired += 1


def test_fires_once_at_the_latest_deadline_it_was_moved_to() -> None:
    async def main() -> tuple[int, int]:
        owner = _Owner(asyncio.get_running_loop())
        owner.deadline.move(0.05)
        owner.deadline.move(0.15)  # later: the armed timer re-arms itself when it fires early
        await asyncio.sleep(0.1)
        early = owner.fired
        await asyncio.sleep(0.15)
        return early, owner.fired

    early, fired = asyncio.run(main())
    assert early == 0
    assert fired == 1


def test_a_cleared_deadline_does_not_fire() -> None:
    async def main() -> int:
        owner = _Owner(asyncio.get_running_loop())
        owner.deadline.move(0.02)
        owner.deadline.clear()
        await asyncio.sleep(0.06)
        return owner.fired

    assert asyncio.run(main()) == 0


def test_cancel_frees_the_owner_without_the_cyclic_collector() -> None:
    # Each HTTP/2 stream owns a deadline calling back into it: before cancel() dropped the
    # callback, every finished stream (and all it held) waited for the cyclic collector.
    async def main() -> tuple[bool, bool]:
        loop = asyncio.get_running_loop()
        kept = _Owner(loop)  # never armed: only the owner <-> deadline cycle holds it
        kept_ref = weakref.ref(kept)
        gone = _Owner(loop)
        gone.deadline.move(10)
        gone_ref = weakref.ref(gone)
        gone.deadline.cancel()
        del kept, gone
        return kept_ref() is None, gone_ref() is None

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        kept_freed, gone_freed = asyncio.run(main())
    finally:
        if was_enabled:
            gc.enable()
    assert gone_freed
    assert not kept_freed  # without cancel() the cycle holds it (the check can fail)
