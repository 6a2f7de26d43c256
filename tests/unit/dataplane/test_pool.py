"""Pool decisions without I/O (``dataplane/pool.py``) and outlier detection (``outlier.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from dataplane.outlier import OutlierDetector
from dataplane.pool import H1Pool, H2Pool

A = ("10.0.0.1", 80)
B = ("10.0.0.2", 80)


@dataclass(eq=False)
class Conn1:
    """What H1Pool reads of a connection."""

    key: tuple[str, int]
    name: str = ""
    idle_since: float = 0.0
    reused: bool = False
    alive: bool = True

    @property
    def open(self) -> bool:
        return self.alive


@dataclass(eq=False)
class Conn2:
    """What H2Pool reads of a connection."""

    key: tuple[str, int]
    max_streams: int = 2
    streams: int = 0
    reserved: int = 0
    idle_since: float = 0.0
    going_away: bool = False

    def has_capacity(self) -> bool:
        return not self.going_away and self.streams + self.reserved < self.max_streams

    @property
    def busy(self) -> bool:
        return self.streams > 0 or self.reserved > 0


def test_h1_most_recently_used_first_and_marked_reused() -> None:
    pool: H1Pool[Conn1] = H1Pool(max_idle_per_destination=4)
    first, second = Conn1(A, "first"), Conn1(A, "second")
    for conn in (first, second):
        pool.add(conn)
    assert pool.acquire(A) is None  # nothing idle yet: both are busy
    assert pool.release(first, 1.0) and pool.release(second, 2.0)
    got = pool.acquire(A)
    assert got is second and got.reused  # warm connection first; it may have been closed by the peer
    assert pool.acquire(A) is first
    assert pool.acquire(A) is None


def test_h1_never_hands_a_connection_to_another_destination() -> None:
    pool: H1Pool[Conn1] = H1Pool(4)
    conn = Conn1(A)
    pool.add(conn)
    pool.release(conn, 0.0)
    assert pool.acquire(B) is None
    assert pool.acquire(A) is conn


def test_h1_skips_connections_closed_while_idle() -> None:
    pool: H1Pool[Conn1] = H1Pool(4)
    dead, live = Conn1(A, "dead"), Conn1(A, "live")
    for conn in (live, dead):
        pool.add(conn)
        pool.release(conn, 0.0)
    dead.alive = False
    assert pool.acquire(A) is live


def test_h1_over_the_idle_cap_the_caller_closes() -> None:
    pool: H1Pool[Conn1] = H1Pool(max_idle_per_destination=2)
    conns = [Conn1(A, str(i)) for i in range(3)]
    kept = [pool.release(c, 0.0) for c in conns]
    assert kept == [True, True, False]
    assert pool.stats()["idle"] == 2


def test_h1_expired_returns_what_to_close_and_forgets_it() -> None:
    pool: H1Pool[Conn1] = H1Pool(8)
    old, new = Conn1(A, "old"), Conn1(A, "new")
    other = Conn1(B, "other")
    for conn, at in ((old, 10.0), (new, 50.0), (other, 5.0)):
        pool.add(conn)
        pool.release(conn, at)
    assert {c.name for c in pool.expired(now=70.0, idle_timeout_s=30.0)} == {"old", "other"}
    assert pool.acquire(A) is new
    assert pool.acquire(B) is None
    assert pool.expired(now=1000.0, idle_timeout_s=30.0) == []  # acquired: no longer idle


def test_h1_forget_removes_from_every_list() -> None:
    pool: H1Pool[Conn1] = H1Pool(8)
    conn = Conn1(A)
    pool.add(conn)
    pool.release(conn, 0.0)
    pool.forget(conn)
    assert pool.acquire(A) is None and pool.connections() == [] and pool.stats() == {"open": 0, "idle": 0}


def test_h2_reserves_room_and_opens_another_only_when_full() -> None:
    pool: H2Pool[Conn2] = H2Pool()
    assert pool.acquire(A) is None
    conn = Conn2(A, max_streams=2)
    pool.add(conn)
    assert pool.acquire(A) is conn and pool.acquire(A) is conn
    assert conn.reserved == 2
    assert pool.acquire(A) is None  # full: the caller connects a second one
    second = Conn2(A, max_streams=2)
    pool.add(second)
    assert pool.acquire(A) is second


def test_h2_a_connection_going_away_is_not_handed_out() -> None:
    pool: H2Pool[Conn2] = H2Pool()
    conn = Conn2(A, max_streams=100)
    pool.add(conn)
    conn.going_away = True
    assert pool.acquire(A) is None
    pool.forget(conn)
    assert not pool and pool.connections() == []


def test_h2_sweep_splits_idle_from_live() -> None:
    pool: H2Pool[Conn2] = H2Pool()
    idle = Conn2(A, idle_since=0.0)
    busy = Conn2(A, streams=1, idle_since=0.0)
    fresh = Conn2(B, idle_since=95.0)
    for conn in (idle, busy, fresh):
        pool.add(conn)
    to_close, to_check = pool.sweep(now=100.0, idle_timeout_s=60.0)
    assert to_close == [idle]
    assert set(map(id, to_check)) == {id(busy), id(fresh)}
    assert pool.stats() == {"open": 3, "busy": 1}


# ------------------------------------------------------------------ outlier detection


def test_consecutive_failures_eject_and_one_success_forgets() -> None:
    od = OutlierDetector(consecutive_failures=3, base_ejection_s=10.0, max_ejection_s=300.0)
    assert not od.failure(A, 0.0, "connect_failed", timeout=False)
    assert not od.failure(A, 0.1, "connect_failed", timeout=False)
    od.success(A)
    assert not od.failure(A, 0.2, "connect_failed", timeout=False)  # the count started again
    assert not od.failure(A, 0.3, "connect_failed", timeout=False)
    assert od.failure(A, 0.4, "connect_failed", timeout=False)
    assert od.ejected(A, 5.0) and not od.ejected(A, 10.5) and not od.ejected(B, 5.0)
    assert od.ejections_total == 1


def test_a_timeout_ejects_at_once_and_ejections_double_up_to_the_cap() -> None:
    od = OutlierDetector(consecutive_failures=3, base_ejection_s=10.0, max_ejection_s=25.0)
    assert od.failure(A, 0.0, "upstream_timeout", timeout=True)
    assert od.ejected(A, 9.9) and not od.ejected(A, 10.0)
    assert not od.failure(A, 5.0, "upstream_timeout", timeout=True)  # already ejected: no new ejection
    assert od.failure(A, 10.0, "upstream_timeout", timeout=True)
    assert od.ejected(A, 29.9) and not od.ejected(A, 30.0)  # 20 s the second time
    assert od.failure(A, 30.0, "upstream_timeout", timeout=True)
    assert od.ejected(A, 54.9) and not od.ejected(A, 55.0)  # 40 s would pass the 25 s cap
    (report,) = od.report(31.0)
    assert report == {"destination": "10.0.0.1:80", "consecutive_failures": 0, "ejections": 3,
                      "ejected_for_s": 24.0, "last_cause": "upstream_timeout"}


@pytest.mark.parametrize("host", ["::1", "10.0.0.1"])
def test_report_names_the_destination_as_an_address(host: str) -> None:
    od = OutlierDetector(1, 1.0, 1.0)
    od.failure((host, 8080), 0.0, "connect_failed", timeout=False)
    assert od.report(0.0)[0]["destination"] == ("[::1]:8080" if ":" in host else "10.0.0.1:8080")


def test_memory_is_bounded_by_max_hosts() -> None:
    od = OutlierDetector(consecutive_failures=5, base_ejection_s=1.0, max_ejection_s=1.0, max_hosts=100)
    for port in range(10_000):
        od.failure(("10.9.9.9", port), 0.0, "connect_failed", timeout=False)
    assert len(od.report(0.0)) == 100
