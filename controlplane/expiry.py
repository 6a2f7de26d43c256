"""TTL expiry: removes each session when its time is up; proxies learn of it from the store's listeners."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from controlplane.audit import EXPIRY, AuditLog
from controlplane.metrics import ControlPlaneMetrics
from controlplane.store import AuditEntry, Change, SessionStore, StoredSession

log = logging.getLogger("turnout.controlplane.expiry")

# expires_at is wall-clock time but asyncio sleeps on the monotonic clock: waking at least
# this often bounds how late a session expires after the wall clock is stepped forward.
_MAX_SLEEP_S = 30.0


class Expirer:
    """Sleeps until the store's next expiry (woken early by any change) and expires what is due."""

    def __init__(self, store: SessionStore, metrics: ControlPlaneMetrics, audit: AuditLog,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._metrics = metrics
        self._audit = audit
        self._clock = clock
        self._wake = asyncio.Event()
        store.subscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        # A create or extend may bring the next expiry closer than the current sleep.
        self._wake.set()

    def _entry(self, stored: StoredSession) -> AuditEntry:
        session = stored.session
        return self._audit.entry(EXPIRY, "-", "expire", session=session.id, owner=session.owner,
                                 detail={"expires_at": session.expires_at})

    async def run(self) -> None:
        """Expire sessions until cancelled."""
        while True:
            expired = self._store.expire(self._clock(), self._entry)
            if expired:
                self._metrics.sessions_expired.inc(len(expired))
                log.info("expired %d session(s): %s", len(expired), ", ".join(expired))
            # Our own removal just set the event; nothing can change between here and the wait.
            self._wake.clear()
            next_expiry = self._store.next_expiry()
            timeout_s = _MAX_SLEEP_S if next_expiry is None else min(_MAX_SLEEP_S, next_expiry - self._clock())
            if timeout_s <= 0:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout_s)
