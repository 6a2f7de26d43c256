"""The session store: sessions in SQLite, an in-memory read view, a persisted revision.

SQLite holds each session as its JSON spec (``Session.to_dict()``) so that a restart
reloads it through ``filters.parse_session``, the same validation every proxy runs. The
in-memory view (id → session, (key, service) → holder, owner → ids, an expiry heap) serves
every read and every conflict check in O(1), so the database is only written, never
queried, after start.

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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from controlplane.errors import Conflict, NotFound, PolicyRefused, StartupError
from filters import RuleLimits, Session, ValidationError, parse_session

log = logging.getLogger("turnout.controlplane.store")

_SCHEMA_VERSION = 1
# Separate statements: executescript() would commit the transaction they run in.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)
# Waiting this long for another process's lock is plenty for a restart's old process to
# finish exiting; longer would only delay the clear error.
_LOCK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class StoredSession:
    """A validated session and the revision of the last change to it."""

    session: Session
    revision: int


@dataclass(frozen=True)
class Change:
    """One committed change: the new revision, sessions added or changed, ids removed."""

    revision: int
    upserted: tuple[StoredSession, ...]
    removed: tuple[str, ...]


class SessionStore:
    """Sessions persisted in SQLite (WAL) with an in-memory view and change listeners.

    ``path`` is a file, or ``":memory:"`` for tests. ``limits`` validate sessions reloaded
    at start and cap the number of sessions (a proxy refuses a larger snapshot whole).
    """

    def __init__(self, path: str, limits: RuleLimits | None = None) -> None:
        self._limits = limits or RuleLimits()
        self._sessions: dict[str, StoredSession] = {}
        self._view = MappingProxyType(self._sessions)
        self._claims: dict[tuple[str, str], str] = {}
        self._by_owner: dict[str, set[str]] = {}
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
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            row = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
            self._revision = int(row[0]) if row else 0
            self._load()

    def _load(self) -> None:
        dropped = []
        for sid, spec_text, revision in self._db.execute("SELECT id, spec, revision FROM sessions"):
            try:
                session = parse_session(json.loads(spec_text), f"stored session {sid!r}", self._limits)
            except (ValidationError, ValueError) as exc:
                # It could never be pushed: every proxy validates with the same code.
                log.warning("dropping stored session %r, it no longer validates: %s", sid, exc)
                dropped.append(sid)
                continue
            self._index(StoredSession(session, int(revision)))
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

    def create(self, session: Session) -> StoredSession:
        """Add a validated session; raises ``Conflict`` naming the session already holding its id or a claim."""
        if session.id in self._sessions:
            raise Conflict(f"a session with id {session.id!r} already exists", session.id)
        if session.key is not None:
            for route in session.routes:
                holder = self._claims.get((session.key, route.service))
                if holder is not None:
                    raise Conflict(f"key {session.key!r} for service {route.service!r} is already claimed by "
                                   f"session {holder!r}; use another key or delete that session", holder)
        if len(self._sessions) >= self._limits.max_sessions:
            raise PolicyRefused("max_sessions", f"the store holds {len(self._sessions)} sessions, the most a proxy "
                                "accepts in one snapshot; delete sessions that are no longer needed")
        revision = self._revision + 1
        stored = StoredSession(session, revision)
        with self._transaction():
            self._db.execute("INSERT INTO sessions (id, spec, revision) VALUES (?, ?, ?)",
                             (session.id, _spec_json(session), revision))
            self._revision = revision
            self._save_revision()
        self._index(stored)
        self._notify(Change(revision, (stored,), ()))
        return stored

    def extend(self, session_id: str, expires_at: float | None) -> StoredSession:
        """Set a session's ``expires_at`` (None: never); raises ``NotFound``."""
        old = self._sessions.get(session_id)
        if old is None:
            raise NotFound(f"no session {session_id!r} (it may have expired or been deleted)")
        revision = self._revision + 1
        stored = StoredSession(dataclasses.replace(old.session, expires_at=expires_at), revision)
        with self._transaction():
            self._db.execute("UPDATE sessions SET spec = ?, revision = ? WHERE id = ?",
                             (_spec_json(stored.session), revision, session_id))
            self._revision = revision
            self._save_revision()
        self._sessions[session_id] = stored
        if expires_at is not None:
            self._push_expiry(expires_at, session_id)
        self._notify(Change(revision, (stored,), ()))
        return stored

    def delete(self, session_id: str) -> bool:
        """Remove a session; False when there was none."""
        return bool(self._remove([session_id]))

    def expire(self, now: float) -> builtins.list[str]:
        """Remove every session whose ``expires_at`` is at or before ``now``; returns their ids."""
        expired: builtins.list[str] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires_at, sid = heapq.heappop(heap)
            stored = self._sessions.get(sid)
            if stored is not None and stored.session.expires_at == expires_at:
                expired.append(sid)
        return self._remove(expired)

    def close(self) -> None:
        """Close the database (releases its lock); the store must not be used after."""
        self._db.close()

    # ------------------------------------------------------------------ internals

    def _remove(self, session_ids: builtins.list[str]) -> builtins.list[str]:
        """Delete these sessions in one transaction and one revision; returns the ids that existed."""
        present = [sid for sid in dict.fromkeys(session_ids) if sid in self._sessions]
        if not present:
            return []
        revision = self._revision + 1
        with self._transaction():
            self._db.executemany("DELETE FROM sessions WHERE id = ?", [(sid,) for sid in present])
            self._revision = revision
            self._save_revision()
        for sid in present:
            self._unindex(self._sessions.pop(sid).session)
        self._notify(Change(revision, (), tuple(present)))
        return present

    def _index(self, stored: StoredSession) -> None:
        session = stored.session
        self._sessions[session.id] = stored
        if session.key is not None:
            for route in session.routes:
                self._claims[(session.key, route.service)] = session.id
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
        if session.key is not None:
            for route in session.routes:
                self._claims.pop((session.key, route.service), None)
        owned = self._by_owner.get(session.owner)
        if owned is not None:
            owned.discard(session.id)
            if not owned:
                del self._by_owner[session.owner]

    def _notify(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:  # the change is committed; one listener's bug must not hide it from the rest
                log.exception("session change listener %r failed on revision %d", listener, change.revision)


def _spec_json(session: Session) -> str:
    return json.dumps(session.to_dict(), separators=(",", ":"), sort_keys=True)
