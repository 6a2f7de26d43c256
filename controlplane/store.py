"""The session store: sessions in SQLite, an in-memory read view, a persisted revision.

SQLite holds each session as its JSON spec (``Session.to_dict()``) so that a restart
reloads it through ``filters.parse_session``, the same validation every proxy runs. The
in-memory view (id → session, (key, service) → holder, owner → ids, service → filter-only
sessions, an expiry heap) serves every session read and every conflict check, so the
session table is only written, never queried, after start.

The **audit trail** lives in the same file: an entry that goes with a change is committed
in the change's transaction (there is never a change without its entry), refusals in their
own. Retention is bounded by age and count; entries are numbered by ``seq``.

Every change is one transaction that also bumps the persisted **revision**; the revision
never goes back, not even across restarts, so a proxy's version is always comparable.
Listeners are called synchronously after each commit, in the thread that made the change
(the control plane's event loop).

One control plane owns one database file: the connection holds an exclusive lock, so a
second process on the same file fails at start instead of serving a diverging view.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import heapq
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from controlplane.errors import Conflict, NotFound, PolicyRefused, StartupError
from controlplane.limits import Limits
from filters import RuleLimits, Session, ValidationError, parse_session

log = logging.getLogger("turnout.controlplane.store")

# 2: sessions.share_group and the audit table.
_SCHEMA_VERSION = 2
# Separate statements: executescript() would commit the transaction they run in.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL, "
    "share_group TEXT)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # AUTOINCREMENT: a pruned entry's number is never reused, so seq orders the whole history.
    "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, "
    "identity TEXT NOT NULL, source TEXT NOT NULL, action TEXT NOT NULL, outcome TEXT NOT NULL, session TEXT, "
    "owner TEXT, detail TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS audit_session ON audit (session, seq)",
    "CREATE INDEX IF NOT EXISTS audit_at ON audit (at)",
)
_MIGRATIONS = {1: ("ALTER TABLE sessions ADD COLUMN share_group TEXT",)}
# Retention is enforced every this many audit entries: pruning per entry would double the writes.
_PRUNE_EVERY = 100
# Waiting this long for another process's lock is plenty for a restart's old process to
# finish exiting; longer would only delay the clear error.
_LOCK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class StoredSession:
    """A validated session, the revision of the last change to it, and the group it is shared with.

    Members of ``group`` may change it as its owner may (an agent acting for a person).
    """

    session: Session
    revision: int
    group: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One audit record: who did what, from where, when, with what outcome and what changed.

    ``seq`` is assigned by the store (0 until then); ``owner`` is the owner of the session
    concerned, so an owner can read what others did to their sessions.
    """

    at: float
    identity: str
    source: str
    action: str
    outcome: str = "ok"
    session: str | None = None
    owner: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``GET /v1/audit`` and the audit log line)."""
        return {"seq": self.seq, "at": self.at, "identity": self.identity, "source": self.source,
                "action": self.action, "outcome": self.outcome, "session": self.session, "owner": self.owner,
                "detail": dict(self.detail)}


@dataclass(frozen=True)
class Change:
    """One committed change: the new revision, sessions added or changed, ids removed."""

    revision: int
    upserted: tuple[StoredSession, ...]
    removed: tuple[str, ...]


class SessionStore:
    """Sessions persisted in SQLite (WAL) with an in-memory view and change listeners.

    ``path`` is a file, or ``":memory:"`` for tests. ``limits`` validate sessions reloaded
    at start and cap the number of sessions (a proxy refuses a larger snapshot whole);
    ``retention`` bounds the audit trail (its ``audit_*`` limits).
    """

    def __init__(self, path: str, limits: RuleLimits | None = None, retention: Limits | None = None) -> None:
        self._limits = limits or RuleLimits()
        retention = retention or Limits()
        self._audit_retention_s = retention.audit_retention_s
        self._audit_max_entries = retention.audit_max_entries
        self._audit_since_prune = 0
        self._sessions: dict[str, StoredSession] = {}
        self._view = MappingProxyType(self._sessions)
        self._claims: dict[tuple[str, str], str] = {}
        self._by_owner: dict[str, set[str]] = {}
        # service -> ids of sessions without a key that route it (the overlap check reads these).
        self._filter_only: dict[str, set[str]] = {}
        self._audit_listeners: list[Callable[[AuditEntry], None]] = []
        # (expires_at, id); entries of sessions since deleted or extended are skipped lazily.
        self._expiry_heap: list[tuple[float, str]] = []
        self._listeners: list[Callable[[Change], None]] = []
        try:
            self._db = sqlite3.connect(path, timeout=_LOCK_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise StartupError(f"cannot open the session database {path!r}: {exc}") from None
        try:
            self._open()
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise StartupError(
                    f"the session database {path!r} is in use by another control plane; "
                    "give each control plane its own --db file") from None
            raise StartupError(f"cannot open the session database {path!r}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StartupError(f"{path!r} is not a usable session database: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        db = self._db
        # EXCLUSIVE before the first access: the lock is kept until close, and WAL then
        # needs no shared-memory file.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only a power loss can
        # lose the last few, never corrupt the file.
        db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction():
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise StartupError(f"the session database has schema version {version}; this turnout "
                                   f"understands up to {_SCHEMA_VERSION}: upgrade turnout")
            if version:
                for older in range(version, _SCHEMA_VERSION):
                    for statement in _MIGRATIONS[older]:
                        db.execute(statement)
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            row = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            self._revision = int(row[0]) if row else 0
            self._load()
            self._prune_audit()

    def _load(self) -> None:
        dropped = []
        for sid, spec_text, revision, group in self._db.execute(
                "SELECT id, spec, revision, share_group FROM sessions"):
            try:
                session = parse_session(json.loads(spec_text), f"stored session {sid!r}", self._limits)
            except (ValidationError, ValueError) as exc:
                # It could never be pushed: every proxy validates with the same code.
                log.warning("dropping stored session %r, it no longer validates: %s", sid, exc)
                dropped.append(sid)
                continue
            self._index(StoredSession(session, int(revision), group))
        if dropped:
            self._revision += 1
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(sid,) for sid in dropped])
            self._save_revision()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _save_revision(self) -> None:
        self._db.execute("INSERT INTO meta (name, value) VALUES ('revision', ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (self._revision,))

    # ------------------------------------------------------------------ reads

    @property
    def revision(self) -> int:
        """The revision of the last change (0 for a new, empty store)."""
        return self._revision

    def all(self) -> Mapping[str, StoredSession]:
        """The current sessions by id: a read-only live view, not a copy."""
        return self._view

    def get(self, session_id: str) -> StoredSession | None:
        """The session with this id, or None."""
        return self._sessions.get(session_id)

    def list(self, owner: str | None = None) -> list[StoredSession]:
        """Sessions, oldest first (then by id); only ``owner``'s when given."""
        if owner is None:
            found = list(self._sessions.values())
        else:
            found = [self._sessions[sid] for sid in self._by_owner.get(owner, ())]
        found.sort(key=lambda s: (s.session.created_at, s.session.id))
        return found

    def count(self, owner: str | None = None) -> int:
        """How many sessions there are (``owner``'s only when given), in O(1)."""
        if owner is None:
            return len(self._sessions)
        return len(self._by_owner.get(owner, ()))

    def filter_only(self, service: str) -> builtins.list[StoredSession]:
        """Sessions without a key that have a route for ``service``."""
        return [self._sessions[sid] for sid in self._filter_only.get(service, ())]

    def audit(self, since: float | None = None, session: str | None = None, party: str | None = None,
              limit: int = 100) -> builtins.list[AuditEntry]:
        """The newest ``limit`` audit entries (oldest first) at or after ``since``, about ``session``,
        and done by or to ``party`` (its identity or the owner of the session concerned)."""
        clauses: builtins.list[str] = []
        args: builtins.list[Any] = []
        if since is not None:
            clauses.append("at >= ?")
            args.append(since)
        if session is not None:
            clauses.append("session = ?")
            args.append(session)
        if party is not None:
            clauses.append("(identity = ? OR owner = ?)")
            args.extend((party, party))
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._db.execute("SELECT seq, at, identity, source, action, outcome, session, owner, detail FROM audit"
                                f"{where} ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [AuditEntry(at, identity, source, action, outcome, sid, owner, json.loads(detail), seq)
                for seq, at, identity, source, action, outcome, sid, owner, detail in reversed(rows)]

    def holder(self, key: str, service: str) -> str | None:
        """The id of the session claiming (key, service), or None."""
        return self._claims.get((key, service))

    def next_expiry(self) -> float | None:
        """The earliest ``expires_at`` of any session (unix seconds), or None."""
        heap = self._expiry_heap
        while heap:
            expires_at, sid = heap[0]
            stored = self._sessions.get(sid)
            if stored is not None and stored.session.expires_at == expires_at:
                return expires_at
            heapq.heappop(heap)
        return None

    # ------------------------------------------------------------------ changes

    def subscribe(self, listener: Callable[[Change], None]) -> None:
        """Call ``listener(change)`` synchronously after every commit."""
        self._listeners.append(listener)

    def subscribe_audit(self, listener: Callable[[AuditEntry], None]) -> None:
        """Call ``listener(entry)`` for every audit entry once it is committed."""
        self._audit_listeners.append(listener)

    def create(self, session: Session, group: str | None = None, audit: AuditEntry | None = None) -> StoredSession:
        """Add a validated session; raises ``Conflict`` naming the session already holding its id or a claim.

        ``audit`` is committed in the same transaction.
        """
        if session.id in self._sessions:
            raise Conflict(f"a session with id {session.id!r} already exists", session.id)
        self._check_claims(session)
        if len(self._sessions) >= self._limits.max_sessions:
            raise PolicyRefused("max_sessions", f"the store holds {len(self._sessions)} sessions, the most a proxy "
                                "accepts in one snapshot; delete sessions that are no longer needed")
        revision = self._revision + 1
        stored = StoredSession(session, revision, group)
        with self._transaction():
            self._db.execute("INSERT INTO sessions (id, spec, revision, share_group) VALUES (?, ?, ?, ?)",
                             (session.id, _spec_json(session), revision, group))
            self._revision = revision
            self._save_revision()
            committed = self._insert_audit(audit)
        self._index(stored)
        self._notify(Change(revision, (stored,), ()), committed)
        return stored

    def update(self, session: Session, group: str | None, audit: AuditEntry | None = None) -> StoredSession:
        """Replace the session with ``session.id``; raises ``NotFound`` or ``Conflict`` (a claim held by another)."""
        old = self._sessions.get(session.id)
        if old is None:
            raise NotFound(f"no session {session.id!r} (it may have expired or been deleted)")
        self._check_claims(session)
        revision = self._revision + 1
        stored = StoredSession(session, revision, group)
        with self._transaction():
            self._db.execute("UPDATE sessions SET spec = ?, revision = ?, share_group = ? WHERE id = ?",
                             (_spec_json(session), revision, group, session.id))
            self._revision = revision
            self._save_revision()
            committed = self._insert_audit(audit)
        self._unindex(old.session)
        self._index(stored)
        self._notify(Change(revision, (stored,), ()), committed)
        return stored

    def _check_claims(self, session: Session) -> None:
        if session.key is None:
            return
        for route in session.routes:
            holder = self._claims.get((session.key, route.service))
            if holder is not None and holder != session.id:
                raise Conflict(f"key {session.key!r} for service {route.service!r} is already claimed by "
                               f"session {holder!r}; use another key or delete that session", holder, session.id)

    def extend(self, session_id: str, expires_at: float | None, audit: AuditEntry | None = None) -> StoredSession:
        """Set a session's ``expires_at`` (None: never); raises ``NotFound``."""
        old = self._sessions.get(session_id)
        if old is None:
            raise NotFound(f"no session {session_id!r} (it may have expired or been deleted)")
        revision = self._revision + 1
        stored = StoredSession(dataclasses.replace(old.session, expires_at=expires_at), revision, old.group)
        with self._transaction():
            self._db.execute("UPDATE sessions SET spec = ?, revision = ? WHERE id = ?",
                             (_spec_json(stored.session), revision, session_id))
            self._revision = revision
            self._save_revision()
            committed = self._insert_audit(audit)
        self._sessions[session_id] = stored
        if expires_at is not None:
            self._push_expiry(expires_at, session_id)
        self._notify(Change(revision, (stored,), ()), committed)
        return stored

    def touch(self, session_id: str, audit: AuditEntry | None = None) -> StoredSession | None:
        """A new revision for a session whose spec did not change but whose pushed form did (a
        tunnel attached or detached): proxies are sent it again. None when there is no such session."""
        old = self._sessions.get(session_id)
        if old is None:
            return None
        revision = self._revision + 1
        stored = StoredSession(old.session, revision, old.group)
        with self._transaction():
            self._db.execute("UPDATE sessions SET revision = ? WHERE id = ?", (revision, session_id))
            self._revision = revision
            self._save_revision()
            committed = self._insert_audit(audit)
        self._sessions[session_id] = stored
        self._notify(Change(revision, (stored,), ()), committed)
        return stored

    def delete(self, session_id: str, audit: AuditEntry | None = None) -> bool:
        """Remove a session; False when there was none."""
        return bool(self._remove([session_id], lambda _stored: audit))

    def expire(self, now: float, audit: Callable[[StoredSession], AuditEntry] | None = None) -> builtins.list[str]:
        """Remove every session whose ``expires_at`` is at or before ``now``; returns their ids.

        ``audit`` makes the audit entry of each expired session (committed with the removal).
        """
        expired: builtins.list[str] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires_at, sid = heapq.heappop(heap)
            stored = self._sessions.get(sid)
            if stored is not None and stored.session.expires_at == expires_at:
                expired.append(sid)
        return self._remove(expired, audit)

    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        """Record audit entries that go with no change (refusals, proxy streams)."""
        with self._transaction():
            committed = [self._insert_audit(entry) for entry in entries]
        self._notify_audit(committed)

    def close(self) -> None:
        """Close the database (releases its lock); the store must not be used after."""
        self._db.close()

    # ------------------------------------------------------------------ internals

    def _remove(self, session_ids: builtins.list[str],
                audit: Callable[[StoredSession], AuditEntry | None] | None = None) -> builtins.list[str]:
        """Delete these sessions in one transaction and one revision; returns the ids that existed."""
        present = [sid for sid in dict.fromkeys(session_ids) if sid in self._sessions]
        if not present:
            return []
        revision = self._revision + 1
        with self._transaction():
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(sid,) for sid in present])
            self._revision = revision
            self._save_revision()
            committed = [self._insert_audit(audit(self._sessions[sid])) for sid in present] if audit else []
        for sid in present:
            self._unindex(self._sessions.pop(sid).session)
        self._notify(Change(revision, (), tuple(present)), *committed)
        return present

    def _insert_audit(self, entry: AuditEntry | None) -> AuditEntry | None:
        """Insert within the caller's transaction; the entry with its ``seq``."""
        if entry is None:
            return None
        cursor = self._db.execute(
            "INSERT INTO audit (at, identity, source, action, outcome, session, owner, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.at, entry.identity, entry.source, entry.action, entry.outcome, entry.session, entry.owner,
             json.dumps(entry.detail, separators=(",", ":"), sort_keys=True, default=str)))
        self._audit_since_prune += 1
        if self._audit_since_prune >= _PRUNE_EVERY:
            self._prune_audit()
        return dataclasses.replace(entry, seq=int(cursor.lastrowid or 0))

    def _prune_audit(self) -> None:
        """Drop entries past the retention time and beyond the most kept (within a transaction)."""
        self._audit_since_prune = 0
        self._db.execute("DELETE FROM audit WHERE at < ? OR seq <= (SELECT MAX(seq) FROM audit) - ?",
                         (time.time() - self._audit_retention_s, self._audit_max_entries))

    def _index(self, stored: StoredSession) -> None:
        session = stored.session
        self._sessions[session.id] = stored
        for route in session.routes:
            if session.key is not None:
                self._claims[(session.key, route.service)] = session.id
            else:
                self._filter_only.setdefault(route.service, set()).add(session.id)
        self._by_owner.setdefault(session.owner, set()).add(session.id)
        if session.expires_at is not None:
            self._push_expiry(session.expires_at, session.id)

    def _push_expiry(self, expires_at: float, session_id: str) -> None:
        heap = self._expiry_heap
        heapq.heappush(heap, (expires_at, session_id))
        # Extending leaves the old entry behind; rebuild before stale entries dominate.
        if len(heap) > 2 * len(self._sessions) + 64:
            heap[:] = [(s.session.expires_at, sid) for sid, s in self._sessions.items()
                       if s.session.expires_at is not None]
            heapq.heapify(heap)

    def _unindex(self, session: Session) -> None:
        for route in session.routes:
            if session.key is not None:
                self._claims.pop((session.key, route.service), None)
                continue
            ids = self._filter_only.get(route.service)
            if ids is not None:
                ids.discard(session.id)
                if not ids:
                    del self._filter_only[route.service]
        owned = self._by_owner.get(session.owner)
        if owned is not None:
            owned.discard(session.id)
            if not owned:
                del self._by_owner[session.owner]

    def _notify(self, change: Change, *audit: AuditEntry | None) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # the change is committed; one listener's bug must not hide it from the rest
                log.exception("session change listener %r failed on revision %d", listener, change.revision)
        self._notify_audit(audit)

    def _notify_audit(self, entries: Sequence[AuditEntry | None]) -> None:
        for entry in entries:
            if entry is None:
                continue
            for listener in self._audit_listeners:
                try:
                    listener(entry)
                except Exception:  # committed already; a logging failure must not fail the request
                    log.exception("audit listener %r failed on entry %d", listener, entry.seq)


def _spec_json(session: Session) -> str:
    return json.dumps(session.to_dict(), separators=(",", ":"), sort_keys=True)
