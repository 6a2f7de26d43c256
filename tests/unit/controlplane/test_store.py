"""Unit tests for controlplane.store: revisions, persistence across restarts, conflicts, expiry, listeners,
updates and shared groups, the filter-only index, and the audit trail (atomic with changes, bounded)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import Conflict, NotFound, PolicyRefused, StartupError
from controlplane.limits import Limits
from controlplane.store import AuditEntry, Change, SessionStore
from filters import RuleLimits, Session, parse_session

NOW = 1_800_000_000.0


def make(sid: str, key: str | None = "k1", services: tuple[str, ...] = ("users",), owner: str = "alice",
         expires_at: float | None = NOW + 60, **extra: Any) -> Session:
    spec: dict[str, Any] = {
        "id": sid, "owner": owner, "created_at": NOW,
        "routes": [{"service": s, "destination": "10.0.0.5:8080", **extra} for s in services],
    }
    if key is not None:
        spec["key"] = key
    if expires_at is not None:
        spec["expires_at"] = expires_at
    return parse_session(spec)


@pytest.fixture
def store() -> Any:
    s = SessionStore(":memory:")
    yield s
    s.close()


def test_revision_bumps_on_every_change(store: SessionStore) -> None:
    assert store.revision == 0
    assert store.create(make("a")).revision == 1
    assert store.extend("a", NOW + 120).revision == 2
    assert store.delete("a")
    assert store.revision == 3
    assert not store.delete("a")
    assert store.revision == 3, "a delete that removed nothing is no change"


def test_reads(store: SessionStore) -> None:
    store.create(make("b", key="kb", owner="bob"))
    store.create(make("a", key="ka", owner="alice"))
    store.create(make("c", key=None, owner="alice", match={"header": {"name": "x-user", "exact": "c"}}))
    assert set(store.all()) == {"a", "b", "c"}
    assert [s.session.id for s in store.list()] == ["a", "b", "c"], "same created_at: ordered by id"
    assert [s.session.id for s in store.list("alice")] == ["a", "c"]
    assert store.list("nobody") == []
    assert store.count() == 3 and store.count("alice") == 2 and store.count("nobody") == 0
    stored = store.get("a")
    assert stored is not None and stored.session.key == "ka" and stored.revision == 2
    assert store.get("zzz") is None
    with pytest.raises(TypeError):
        store.all()["x"] = stored  # type: ignore[index]


def test_duplicate_id_is_a_conflict(store: SessionStore) -> None:
    store.create(make("a", key="k1"))
    with pytest.raises(Conflict) as info:
        store.create(make("a", key="k2"))
    assert info.value.holder == "a"
    assert store.revision == 1


def test_claimed_key_and_service_is_a_conflict_naming_the_holder(store: SessionStore) -> None:
    store.create(make("first", key="k1", services=("users", "orders")))
    with pytest.raises(Conflict) as info:
        store.create(make("second", key="k1", services=("billing", "orders")))
    assert info.value.holder == "first"
    assert "'orders'" in info.value.message and "'first'" in info.value.message
    assert store.get("second") is None and store.revision == 1
    # Same key for another service, or another key for the same service: no conflict.
    store.create(make("third", key="k1", services=("billing",)))
    store.create(make("fourth", key="k2", services=("users",)))
    assert store.holder("k1", "billing") == "third"


def test_filter_only_sessions_claim_nothing(store: SessionStore) -> None:
    match = {"header": {"name": "x-user", "exact": "a"}}
    store.create(make("f1", key=None, match=match))
    store.create(make("f2", key=None, match=match))
    assert store.count() == 2


def test_delete_and_expiry_free_the_claim(store: SessionStore) -> None:
    store.create(make("a", key="k1", expires_at=NOW + 10))
    store.delete("a")
    store.create(make("b", key="k1", expires_at=NOW + 10))
    assert store.expire(NOW + 10) == ["b"]
    store.create(make("c", key="k1"))
    assert store.holder("k1", "users") == "c"


def test_store_caps_sessions_at_what_a_proxy_accepts() -> None:
    store = SessionStore(":memory:", RuleLimits(max_sessions=2))
    try:
        store.create(make("a", key="k1"))
        store.create(make("b", key="k2"))
        with pytest.raises(PolicyRefused) as info:
            store.create(make("c", key="k3"))
        assert info.value.policy == "max_sessions"
    finally:
        store.close()


def test_expire_and_next_expiry(store: SessionStore) -> None:
    assert store.next_expiry() is None
    store.create(make("late", key="k1", expires_at=NOW + 30))
    store.create(make("soon", key="k2", expires_at=NOW + 10))
    store.create(make("never", key="k3", expires_at=None))
    assert store.next_expiry() == NOW + 10
    assert store.expire(NOW + 9.999) == []
    revision = store.revision
    assert store.expire(NOW + 10) == ["soon"], "expires_at itself is expired (Session.live is now < expires_at)"
    assert store.revision == revision + 1
    assert store.next_expiry() == NOW + 30
    store.extend("late", NOW + 5)
    assert store.next_expiry() == NOW + 5, "an extend can bring the expiry closer"
    store.extend("late", NOW + 100)
    assert store.next_expiry() == NOW + 100, "the stale heap entry is skipped"
    assert store.expire(NOW + 50) == []
    store.extend("late", None)
    assert store.next_expiry() is None
    assert sorted(store.all()) == ["late", "never"]


def test_many_extends_keep_the_expiry_heap_bounded(store: SessionStore) -> None:
    store.create(make("a"))
    for i in range(1000):
        store.extend("a", NOW + 100 + i)
    assert len(store._expiry_heap) <= 2 * store.count() + 65
    assert store.next_expiry() == NOW + 1099


def test_expiring_several_is_one_change(store: SessionStore) -> None:
    changes: list[Change] = []
    for i in range(3):
        store.create(make(f"s{i}", key=f"k{i}", expires_at=NOW + i))
    store.subscribe(changes.append)
    assert sorted(store.expire(NOW + 5)) == ["s0", "s1", "s2"]
    assert len(changes) == 1 and sorted(changes[0].removed) == ["s0", "s1", "s2"]
    assert changes[0].upserted == () and changes[0].revision == store.revision


def test_listeners_see_each_commit(store: SessionStore) -> None:
    changes: list[Change] = []
    seen_revisions: list[int] = []
    store.subscribe(changes.append)
    store.subscribe(lambda change: seen_revisions.append(store.revision))
    created = store.create(make("a"))
    extended = store.extend("a", NOW + 500)
    store.delete("a")
    assert changes == [Change(1, (created,), ()), Change(2, (extended,), ()), Change(3, (), ("a",))]
    assert seen_revisions == [1, 2, 3], "listeners run after the commit"
    assert changes[1].upserted[0].session.expires_at == NOW + 500


def test_a_failing_listener_does_not_hide_the_change_from_others(store: SessionStore,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    changes: list[Change] = []

    def broken(change: Change) -> None:
        raise RuntimeError("listener bug")

    store.subscribe(broken)
    store.subscribe(changes.append)
    store.create(make("a"))
    assert len(changes) == 1 and store.get("a") is not None
    assert "listener bug" in caplog.text


def test_refused_changes_notify_nobody(store: SessionStore) -> None:
    changes: list[Change] = []
    store.create(make("a", key="k1"))
    store.subscribe(changes.append)
    with pytest.raises(Conflict):
        store.create(make("b", key="k1"))
    with pytest.raises(NotFound):
        store.extend("zzz", NOW)
    assert changes == []


def test_restart_keeps_sessions_and_revision(tmp_path: Path) -> None:
    path = str(tmp_path / "sessions.db")
    store = SessionStore(path)
    store.create(make("a", key="k1", services=("users", "orders")))
    store.create(make("b", key=None, match={"path": {"prefix": "/api"}}, mode="mirror", fallback="error"))
    store.create(make("c", key="k3"))
    store.extend("a", NOW + 999)
    store.delete("c")
    before = {sid: (s.session.to_dict(), s.revision) for sid, s in store.all().items()}
    revision = store.revision
    store.close()

    reopened = SessionStore(path)
    try:
        assert reopened.revision == revision == 5
        assert {sid: (s.session.to_dict(), s.revision) for sid, s in reopened.all().items()} == before
        assert reopened.holder("k1", "orders") == "a" and reopened.holder("k3", "users") is None
        assert reopened.next_expiry() == NOW + 60
        with pytest.raises(Conflict):
            reopened.create(make("x", key="k1", services=("orders",)))
        assert reopened.create(make("d", key="k4")).revision == 6, "the revision never goes back"
    finally:
        reopened.close()


def test_the_database_is_wal_with_sessions_as_json_specs(tmp_path: Path) -> None:
    path = tmp_path / "sessions.db"
    store = SessionStore(str(path))
    store.create(make("a"))
    store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        spec = json.loads(db.execute("SELECT spec FROM sessions WHERE id = 'a'").fetchone()[0])
        assert spec == make("a").to_dict()
    finally:
        db.close()


def test_a_second_store_on_the_same_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controlplane.store._LOCK_TIMEOUT_S", 0.05)
    path = str(tmp_path / "sessions.db")
    store = SessionStore(path)
    try:
        with pytest.raises(StartupError, match="in use by another control plane"):
            SessionStore(path)
    finally:
        store.close()
    SessionStore(path).close()


def test_a_stored_session_that_no_longer_validates_is_dropped(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "sessions.db")
    store = SessionStore(path)
    store.create(make("good", key="k1"))
    store.create(make("bad", key="k2"))
    store.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE sessions SET spec = ? WHERE id = 'bad'", (json.dumps({"id": "bad", "routes": []}),))
    db.commit()
    db.close()
    reopened = SessionStore(path)
    try:
        assert list(reopened.all()) == ["good"]
        assert reopened.revision == 3, "dropping is a change"
        assert "dropping stored session 'bad'" in caplog.text
    finally:
        reopened.close()
    again = SessionStore(path)
    try:
        assert list(again.all()) == ["good"] and again.revision == 3
    finally:
        again.close()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StartupError, match="not a usable session database"):
        SessionStore(str(path))


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SessionStore(str(path)).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(StartupError, match="upgrade turnout"):
        SessionStore(str(path))
    SessionStore(":memory:").close()


def entry(action: str, session: str | None = None, identity: str = "alice", at: float = NOW) -> AuditEntry:
    return AuditEntry(at, identity, "127.0.0.1:5000", action, session=session, owner="alice", detail={"n": 1})


def test_update_replaces_the_session_and_its_claims(store: SessionStore) -> None:
    store.create(make("a", key="k1", services=("users", "orders")), group="team")
    changes: list[Change] = []
    store.subscribe(changes.append)
    updated = store.update(make("a", key="k2", services=("users",)), "team", entry("update", "a"))
    assert updated.revision == 2 and updated.group == "team" and store.get("a") == updated
    assert store.holder("k1", "users") is None and store.holder("k1", "orders") is None
    assert store.holder("k2", "users") == "a"
    assert changes == [Change(2, (updated,), ())]
    store.create(make("b", key="k3"))
    with pytest.raises(Conflict) as info:
        store.update(make("a", key="k3"), None)
    assert info.value.holder == "b" and info.value.session == "a"
    with pytest.raises(NotFound):
        store.update(make("zzz"), None)
    assert [e.action for e in store.audit()] == ["update"], "only the update carried an audit entry"


def test_filter_only_index_follows_changes(store: SessionStore) -> None:
    match = {"header": {"name": "x-user", "exact": "a"}}
    store.create(make("f1", key=None, services=("users", "orders"), match=match))
    store.create(make("f2", key=None, services=("users",), match=match))
    store.create(make("keyed", key="k"))
    assert sorted(s.session.id for s in store.filter_only("users")) == ["f1", "f2"]
    assert [s.session.id for s in store.filter_only("orders")] == ["f1"]
    store.update(make("f1", key="now-keyed", services=("users", "orders")), None)
    assert [s.session.id for s in store.filter_only("users")] == ["f2"] and store.filter_only("orders") == []
    store.delete("f2")
    assert store.filter_only("users") == []


def test_audit_entries_are_committed_with_their_change_and_logged_after(store: SessionStore) -> None:
    logged: list[AuditEntry] = []
    store.subscribe_audit(logged.append)
    store.create(make("a"), audit=entry("create", "a"))
    store.extend("a", NOW + 120, entry("extend", "a"))
    store.delete("a", entry("delete", "a"))
    store.append_audit([entry("refuse", identity="mallory")])
    store.create(make("b", expires_at=NOW + 1))
    store.expire(NOW + 2, lambda stored: entry("expire", stored.session.id, identity="turnout:expiry"))
    entries = store.audit()
    assert [e.action for e in entries] == ["create", "extend", "delete", "refuse", "expire"]
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert logged == entries, "listeners see each committed entry, numbered"
    assert [e.action for e in store.audit(session="a")] == ["create", "extend", "delete"]
    assert [e.action for e in store.audit(party="mallory")] == ["refuse"], "what mallory did"
    assert len(store.audit(party="alice")) == 5, "what alice did and what was done to her sessions"
    assert [e.action for e in store.audit(since=NOW + 1)] == [], "all stamped NOW"
    assert [e.action for e in store.audit(limit=2)] == ["refuse", "expire"], "the newest, oldest first"
    store.create(make("c", key="k1"))
    with pytest.raises(Conflict):
        store.create(make("c2", key="k1"), audit=entry("create", "c2"))
    assert len(store.audit()) == 5, "a refused change commits no entry"


def test_audit_is_pruned_by_age_and_count() -> None:
    store = SessionStore(":memory:", retention=Limits(audit_max_entries=150, audit_retention_s=3600))
    try:
        now = time.time()
        store.append_audit([entry("refuse", at=now - 7200) for _ in range(10)])
        store.append_audit([entry("refuse", at=now) for _ in range(300)])
        kept = store.audit(limit=1000)
        assert len(kept) <= 150 + 100, "pruned every 100 entries to at most the limit"
        assert all(e.at == now for e in kept), "entries past the retention time are gone"
        assert kept[-1].seq == 310, "numbers are never reused"
    finally:
        store.close()


def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL)")
    db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
    db.execute("INSERT INTO sessions VALUES ('old', ?, 7)", (json.dumps(make("old").to_dict()),))
    db.execute("INSERT INTO meta VALUES ('revision', 7)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = SessionStore(str(path))
    try:
        old = store.get("old")
        assert old is not None and old.revision == 7 and old.group is None and store.revision == 7
        store.create(make("new", key="k2"), group="team", audit=entry("create", "new"))
        assert [e.session for e in store.audit()] == ["new"]
    finally:
        store.close()
    reopened = SessionStore(str(path))
    try:
        new = reopened.get("new")
        assert new is not None and new.group == "team", "the group survives a restart"
    finally:
        reopened.close()
