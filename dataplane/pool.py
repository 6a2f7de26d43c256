"""Pool decisions, without I/O: which connection a request gets, which ones to close.

``H1Pool`` keeps idle HTTP/1.1 connections per destination (most recently used first,
capped per destination); ``H2Pool`` keeps multiplexed HTTP/2 connections per destination
and hands out room for one stream at a time. Both return what to close rather than closing
it, so they are tested with plain objects; ``upstreams.py`` does the connecting and closing.
Destinations are ``(host, port)`` keys: a connection is never handed to another address.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

Key = tuple[str, int]


class PooledH1(Protocol):
    """What the pool reads of an HTTP/1.1 connection."""

    key: Key
    idle_since: float
    reused: bool

    @property
    def open(self) -> bool:
        """Whether it can still carry a request."""


class PooledH2(Protocol):
    """What the pool reads of an HTTP/2 connection."""

    key: Key
    idle_since: float
    reserved: int

    def has_capacity(self) -> bool:
        """Whether another stream may be opened on it now."""

    @property
    def busy(self) -> bool:
        """Whether it carries streams or reservations."""


C1 = TypeVar("C1", bound=PooledH1)
C2 = TypeVar("C2", bound=PooledH2)


class H1Pool(Generic[C1]):
    """Idle keep-alive connections per destination."""

    def __init__(self, max_idle_per_destination: int) -> None:
        self.max_idle_per_destination = max_idle_per_destination
        self._idle: dict[Key, list[C1]] = {}
        self._all: set[C1] = set()

    def add(self, conn: C1) -> None:
        """A new connection, about to carry its first request."""
        self._all.add(conn)

    def acquire(self, key: Key) -> C1 | None:
        """The most recently used idle open connection to ``key`` (it may have been closed by
        the peer meanwhile: marked reused, so a failure before any byte may be retried), or None."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.open:
                conn.reused = True
                return conn
        return None

    def release(self, conn: C1, now: float) -> bool:
        """Keep a connection that finished a request; False when the destination already has
        its cap of idle connections (then the caller closes it)."""
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if len(idle) >= self.max_idle_per_destination:
            return False
        conn.idle_since = now
        idle.append(conn)
        return True

    def forget(self, conn: C1) -> None:
        """A closed connection leaves the books."""
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            if not idle:
                del self._idle[conn.key]

    def expired(self, now: float, idle_timeout_s: float) -> list[C1]:
        """Idle connections unused for longer than ``idle_timeout_s``, taken off the idle lists
        (the caller closes them)."""
        limit = now - idle_timeout_s
        stale: list[C1] = []
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.idle_since >= limit]
            if len(keep) != len(idle):
                stale.extend(c for c in idle if c.idle_since < limit)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
        return stale

    def connections(self) -> list[C1]:
        """Every connection, busy or idle."""
        return list(self._all)

    def stats(self) -> dict[str, int]:
        """Counts for /config_dump."""
        return {"open": len(self._all), "idle": sum(len(v) for v in self._idle.values())}


class H2Pool(Generic[C2]):
    """Multiplexed connections per destination; a new one only when all are full."""

    def __init__(self) -> None:
        self._conns: dict[Key, list[C2]] = {}

    def add(self, conn: C2) -> None:
        """A new connection (its peer's SETTINGS arrived)."""
        self._conns.setdefault(conn.key, []).append(conn)

    def acquire(self, key: Key) -> C2 | None:
        """A connection to ``key`` with room for one more stream, that room reserved; or None."""
        conns = self._conns.get(key)
        if conns:
            for conn in conns:
                if conn.has_capacity():
                    conn.reserved += 1
                    return conn
        return None

    def forget(self, conn: C2) -> None:
        """A closed connection leaves the books."""
        conns = self._conns.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]

    def sweep(self, now: float, idle_timeout_s: float) -> tuple[list[C2], list[C2]]:
        """(connections idle for longer than ``idle_timeout_s``, to close; the others, whose
        liveness the caller checks)."""
        limit = now - idle_timeout_s
        idle: list[C2] = []
        live: list[C2] = []
        for conns in self._conns.values():
            for conn in conns:
                (idle if not conn.busy and conn.idle_since < limit else live).append(conn)
        return idle, live

    def connections(self) -> list[C2]:
        """Every connection."""
        return [conn for conns in self._conns.values() for conn in conns]

    def __bool__(self) -> bool:
        return bool(self._conns)

    def stats(self) -> dict[str, int]:
        """Counts for /config_dump."""
        conns = self.connections()
        return {"open": len(conns), "busy": sum(1 for c in conns if c.busy)}
