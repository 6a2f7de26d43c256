"""The control plane's abuse limits (the ``limits`` section of the ``--auth`` file) and a rate limiter.

Every limit has a default that no legitimate caller reaches; each says below where its
number comes from. An unknown field or an out-of-range value is an error naming it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from filters import Problem, RuleLimits, finite_number

_DAY_S = 86400.0


@dataclass(frozen=True)
class Limits:
    """Bounds on what any one caller can make the control plane hold or do."""

    # The same head budget as the proxy's (Envoy's 60 KiB, rounded up): 431 beyond it.
    max_head_bytes: int = 64 * 1024
    # A session spec is a few KiB even with long match trees; 1 MiB refuses abuse, never a real session.
    max_body_bytes: int = 1 << 20
    # The deepest real body: a session (1) -> routes (2) -> route (3) -> match (4), then at most
    # filters' 64 match nodes of 2 levels each (a mapping and a list) = 132; 160 leaves a margin
    # and stays far below Python's recursion limit (1,000), where json.loads fails.
    max_json_depth: int = 160
    # Connections that have authenticated (a request with valid credentials); nginx's
    # worker_connections default is 512 per worker, and the CLI opens one per command.
    max_connections: int = 1024
    # Connections that have not authenticated yet: when full, the oldest is closed to make
    # room, so idle or trickling sockets can delay nobody for long.
    max_unauthenticated_connections: int = 256
    # The same, per source address: one host cannot fill the whole unauthenticated pool.
    max_unauthenticated_per_source: int = 32
    # A connection must present valid credentials (TLS handshake and request head included)
    # this soon after it is accepted: a real client sends its request at once.
    unauthenticated_timeout_s: float = 10.0
    # An authenticated keep-alive connection idle this long is closed (nginx keepalive_timeout is 75 s).
    idle_timeout_s: float = 30.0
    # Session changes (create, update, extend, delete) per identity: a person makes a few a
    # minute and a CI job a few per pipeline; 120 a minute with a burst of 30 leaves room for
    # a test suite that creates a session per test, and stops a runaway agent loop.
    changes_per_minute: float = 120.0
    change_burst: int = 30
    # initial_resource_versions on a new delta stream: a real proxy has at most what one
    # snapshot holds (filters.RuleLimits.max_sessions).
    max_initial_resource_versions: int = RuleLimits().max_sessions
    # A node id, cluster or build version: Kubernetes names are at most 253 characters.
    max_node_field_chars: int = 256
    # Services one proxy fronts: a node proxy fronts every service of its node, rarely over a hundred.
    max_node_services: int = 1000
    # Disconnected proxies kept for `turnout status`, and for how long: enough to see what
    # went away during an incident, bounded whatever node ids are made up.
    max_disconnected_proxies: int = 1000
    disconnected_proxy_retention_s: float = 3600.0
    # Audit entries: 30 days (a monthly review), at most this many (~30 MB of SQLite).
    audit_retention_s: float = 30 * _DAY_S
    audit_max_entries: int = 100_000
    # Refused credentials recorded per source and minute; more are counted, not stored, so a
    # flood of bad tokens cannot push real entries out of the bounded audit trail.
    audit_refusals_per_minute: int = 30


_INT_FIELDS = {f.name for f in dataclasses.fields(Limits) if f.type == "int"}


def parse_limits(data: Any, where: str, problems: list[Problem]) -> Limits:
    """Validate a ``limits`` mapping; each bad field is appended to ``problems``."""
    if data is None:
        return Limits()
    if not isinstance(data, Mapping):
        problems.append(Problem(where, "must be a mapping of limit to value"))
        return Limits()
    known = [f.name for f in dataclasses.fields(Limits)]
    changes: dict[str, Any] = {}
    for name, value in data.items():
        at = f"{where}.{name}"
        if name not in known:
            problems.append(Problem(at, "unknown limit; known limits: " + ", ".join(known)))
            continue
        if name in _INT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(Problem(at, "must be a whole number of at least 1"))
                continue
            changes[name] = value
        else:
            number = finite_number(value)
            if number is None or number <= 0:
                problems.append(Problem(at, "must be a positive number"))
                continue
            changes[name] = number
    limits = dataclasses.replace(Limits(), **changes)
    if limits.max_unauthenticated_per_source > limits.max_unauthenticated_connections:
        problems.append(Problem(f"{where}.max_unauthenticated_per_source",
                                "must not exceed max_unauthenticated_connections"))
    return limits


class RateLimiter:
    """Token buckets by key (an identity): ``rate_per_s`` refill, ``burst`` capacity.

    Memory is bounded: a bucket that has refilled completely holds nothing a new bucket
    would not, so full buckets are dropped when the table grows past ``max_keys``.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._drop_full(now)
        return 0.0

    def _drop_full(self, now: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (now - at) * self._rate >= self._burst]
        for key in full:
            del self._buckets[key]
