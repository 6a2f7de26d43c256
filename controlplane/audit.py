"""The audit trail: every change, expiry, refusal and proxy stream, with who, when, from where and what.

Entries are kept in the session store (bounded by ``audit_retention_s`` and
``audit_max_entries``) and each is also logged as one JSON line on the
``turnout.controlplane.audit`` logger, for a log pipeline. Actions::

    create, update, extend, delete   a session changed (detail: what changed)
    expire                           its TTL ran out (identity "turnout:expiry")
    refuse                           a request refused: credentials (401), ownership or policy (403),
                                     conflict (409), rate limit (429), invalid (400)
    proxy_connect, proxy_disconnect  a push stream opened or ended (detail: node, cluster, services)
    proxy_refuse                     a push stream refused (credentials, node id bound to another)

Refusals of unauthenticated callers are recorded at most ``audit_refusals_per_minute`` per
source; the rest are counted, and the next entry recorded for that source says how many
were left out, so a flood of bad tokens cannot push real entries out of the trail.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from controlplane.limits import Limits, RateLimiter
from controlplane.store import AuditEntry, SessionStore

audit_log = logging.getLogger("turnout.controlplane.audit")

# The identity named in entries of things no caller did.
EXPIRY = "turnout:expiry"
UNAUTHENTICATED = "-"
# Sources whose left-out refusals are being counted; beyond this the oldest counts are dropped.
_MAX_SUPPRESSED_SOURCES = 10_000


class AuditLog:
    """Records audit entries in the store and logs each committed one as a JSON line."""

    def __init__(self, store: SessionStore, limits: Limits, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        per_minute = limits.audit_refusals_per_minute
        self._refusals = RateLimiter(per_minute / 60.0, per_minute)
        self._suppressed: dict[str, int] = {}
        self.suppressed_total = 0
        store.subscribe_audit(self._log_line)

    def entry(self, identity: str, source: str, action: str, outcome: str = "ok", session: str | None = None,
              owner: str | None = None, detail: Mapping[str, Any] | None = None) -> AuditEntry:
        """A new entry stamped now (``record`` it, or pass it to the store with its change)."""
        return AuditEntry(self._clock(), identity, source, action, outcome, session, owner, dict(detail or {}))

    def record(self, entry: AuditEntry) -> None:
        """Store an entry that goes with no change."""
        self._store.append_audit([entry])

    def record_limited(self, entry: AuditEntry, key: str) -> None:
        """Store an entry unless ``key`` (a source address) has had its share this minute."""
        if self._refusals.take(key) > 0:
            self.suppressed_total += 1
            self._suppressed[key] = self._suppressed.pop(key, 0) + 1
            if len(self._suppressed) > _MAX_SUPPRESSED_SOURCES:
                del self._suppressed[next(iter(self._suppressed))]
            return
        left_out = self._suppressed.pop(key, 0)
        if left_out:
            entry = AuditEntry(entry.at, entry.identity, entry.source, entry.action, entry.outcome, entry.session,
                               entry.owner, {**entry.detail, "left_out_before": left_out})
        self.record(entry)

    def entries(self, since: float | None, session: str | None, party: str | None, limit: int) -> list[AuditEntry]:
        """Stored entries, oldest first (see ``SessionStore.audit``)."""
        return self._store.audit(since, session, party, limit)

    @staticmethod
    def _log_line(entry: AuditEntry) -> None:
        audit_log.info(json.dumps({"audit": entry.to_dict()}, separators=(",", ":"), sort_keys=True, default=str))
