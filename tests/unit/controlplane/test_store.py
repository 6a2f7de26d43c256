"""Unit tests for controlplane.store: revisions, persistence across restarts, conflicts, expiry, listeners."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import Conflict, NotFound, PolicyRefused, StartupError
from controlplane.store import Change, SessionStore
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
