"""Realistic, deterministic workloads for the ``filters`` micro-benchmarks.

Everything here is plain data built by bounded loops: session specs as the control plane
would push them, request heads as the codec would hand them to ``decide``, and the
targets each benchmark is judged against (``bench/micro/report.py`` prints the verdict).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

from filters import RequestHead

# A fixed "now" (unix seconds) so that expiry never depends on the wall clock.
NOW = 1_800_000_000.0

# The service every decide() benchmark asks about.
SERVICE = "users"

# Sessions in the largest snapshot: RuleLimits.max_sessions.
MAX_SESSIONS = 100_000
SESSION_COUNTS = (1, 100, 10_000, MAX_SESSIONS)

# Filter-only routes on one service for the "no key" benchmarks.
FILTER_ROUTES = 1_000
# The route the "hit" requests of the filter-only benchmarks aim at.
FILTER_HIT = 737

# Distinct request heads the keyed-hit benchmark cycles through, so consecutive decisions
# read different keys, dict slots and entries (as real traffic does) instead of one hot
# cache line. A power of two; the same count for every session count, so the (small)
# cycling cost is identical across the parametrization.
ROTATING_HEADS = 1_024

# Targets, in seconds, compared with the median.
TARGET_KEY_EXTRACT_S = 2e-6
TARGET_DECIDE_KEYED_S = 3e-6
TARGET_DECIDE_FILTERS_S = 20e-6
TARGET_COMPILE_100K_S = 2.0
# decide() for a keyed hit may not grow by more than this from 1 to 100,000 sessions.
FLAT_TOLERANCE = 0.20

# W3C baggage as an OpenTelemetry-instrumented caller sends it: five members, the routing
# key neither first nor last, one value percent-encoded.
BAGGAGE_KEY = "abc123"
BAGGAGE = "userId=alice,serverNode=DF%2028,isProduction=false,turnout-session=abc123,tenant=acme"
BAGGAGE_NO_KEY = "userId=alice,serverNode=DF%2028,isProduction=false,tenant=acme"


def baggage_with_key(key: str) -> str:
    """``BAGGAGE`` carrying ``key`` as its ``turnout-session`` member."""
    return BAGGAGE.replace("turnout-session=" + BAGGAGE_KEY, "turnout-session=" + key)


# The head of a browser/SPA call relayed by an instrumented gateway: 11 lines, with the
# spellings a client really sends (the head lower-cases them).
BASE_PAIRS: tuple[tuple[str, str], ...] = (
    ("Host", "users.shop.svc.cluster.local:8080"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/124.0.0.0 Safari/537.36"),
    ("Accept", "application/json, text/plain, */*"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Accept-Language", "en-US,en;q=0.9"),
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"),
    ("X-Request-Id", "7f3c9a1e-2b4d-4e8f-9a6b-1c2d3e4f5a6b"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
)

# The request every keyed route match in the scaling workload accepts (see _route_match).
KEYED_METHOD = "GET"
KEYED_TARGET = "/api/v2/users/42?expand=orders"
KEYED_EXTRA = (("X-User", "alice"), ("X-Tenant", "acme"))


def head(
    baggage: str | None = BAGGAGE,
    extra: tuple[tuple[str, str], ...] = KEYED_EXTRA,
    method: str = KEYED_METHOD,
    target: str = KEYED_TARGET,
) -> RequestHead:
    """A realistic request head: ``BASE_PAIRS`` plus ``extra`` lines and ``baggage``."""
    pairs = list(BASE_PAIRS)
    pairs.extend(extra)
    if baggage is not None:
        pairs.append(("baggage", baggage))
    return RequestHead.from_pairs(method, target, pairs)


# --------------------------------------------------------------------------- keyed sessions


def session_key(i: int) -> str:
    """Session ``i``'s routing key: 16 hex digits, as a CLI would mint it."""
    return hashlib.blake2b(i.to_bytes(4, "big"), digest_size=8).hexdigest()


_OTHER_SERVICES = tuple(f"svc-{n:02d}" for n in range(40))


def _route_match(i: int) -> dict[str, Any] | None:
    """One route in ten carries an extra match; all of them accept the keyed request."""
    kind = i % 30
    if kind == 7:
        return {"header": {"name": "x-user", "exact": "alice"}}
    if kind == 17:
        return {"path": {"prefix": "/api/v2/"}}
    if kind == 27:
        return {"all_of": [{"method": ["GET", "POST"]}, {"header": {"name": "x-tenant", "exact": "acme"}}]}
    return None


def keyed_session_spec(i: int) -> dict[str, Any]:
    """Session ``i`` of the scaling workload, in its pushed JSON form.

    Every session forks ``users`` (so its keyed table holds all of them, the worst case)
    and up to two other services; destinations alternate pod IPs and service DNS names;
    one route in twenty mirrors, one in five falls back to an error; every session is
    live at ``NOW``.
    """
    dest = (f"10.244.{(i >> 8) & 255}.{i & 255}:8080" if i % 2
            else f"users-{i}.sandboxes.svc.cluster.local:8080")
    route: dict[str, Any] = {"service": SERVICE, "destination": dest}
    if i % 20 == 3:
        route["mode"] = "mirror"
    if i % 5 == 1:
        route["fallback"] = "error"
    match = _route_match(i)
    if match is not None:
        route["match"] = match
    routes = [route]
    for j in range(i % 3):  # 0, 1 or 2 more services
        routes.append({
            "service": _OTHER_SERVICES[(i + 7 * j) % len(_OTHER_SERVICES)],
            "destination": f"10.245.{(i >> 8) & 255}.{i & 255}:{9000 + j}",
        })
    return {
        "id": f"fix-{i:06d}",
        "key": session_key(i),
        "owner": f"dev{i % 500}@example.com",
        "labels": {"team": ("payments", "search", "checkout", "growth")[i % 4], "ticket": f"PAY-{i}"},
        "created_at": NOW - 86_400 + i * 0.5,
        "expires_at": NOW + 3_600 + (i % 7_200),
        "routes": routes,
    }


def keyed_session_specs(n: int) -> list[dict[str, Any]]:
    """The first ``n`` sessions of the scaling workload."""
    return [keyed_session_spec(i) for i in range(n)]


def rotating_keyed_heads(n_sessions: int, count: int = ROTATING_HEADS, seed: int = 1) -> list[RequestHead]:
    """``count`` heads, each carrying the key of a random one of the first ``n_sessions``."""
    rng = random.Random(seed)
    return [head(baggage_with_key(session_key(rng.randrange(n_sessions)))) for _ in range(count)]


def cycler(items: list[RequestHead]) -> Callable[[], RequestHead]:
    """A cheap endless round-robin over ``items`` (length a power of two)."""
    mask = len(items) - 1
    assert len(items) & mask == 0
    state = [0]

    def next_item() -> RequestHead:
        i = state[0] = (state[0] + 1) & mask
        return items[i]

    return next_item


# --------------------------------------------------------------------------- filter-only sessions

FILTER_MIXES = ("header_exact", "all_of_tenant_path", "header_regex", "mirrord_header", "mixed")


def _filter_match(mix: str, n: int) -> dict[str, Any]:
    if mix == "header_exact":
        return {"header": {"name": "x-user", "exact": f"user-{n}"}}
    if mix == "all_of_tenant_path":
        return {"all_of": [{"header": {"name": "x-tenant", "exact": f"t-{n}"}},
                           {"path": {"prefix": f"/api/v{n}/"}}]}
    if mix == "header_regex":
        return {"header": {"name": "x-user", "regex": f"user-{n}-[a-z]+"}}
    if mix == "mirrord_header":
        return {"http_filter": {"header_filter": f"x-dev: dev{n}"}}
    assert mix == "mixed"  # a quarter of each kind
    return _filter_match(FILTER_MIXES[n * 4 // FILTER_ROUTES], n)


def filter_session_specs(mix: str, count: int = FILTER_ROUTES) -> list[dict[str, Any]]:
    """``count`` filter-only sessions (no key), one route each on ``SERVICE``."""
    return [
        {
            "id": f"filter-{mix}-{n:04d}",
            "owner": f"agent-{n % 50}",
            "created_at": NOW - 3_600 + n,
            "expires_at": NOW + 3_600,
            "routes": [{"service": SERVICE, "destination": f"10.246.{n >> 8}.{n & 255}:8080",
                        "match": _filter_match(mix, n)}],
        }
        for n in range(count)
    ]


def filter_head(mix: str, hit: bool) -> RequestHead:
    """A keyless request that matches route ``FILTER_HIT`` of ``mix`` (or, if not ``hit``, none).

    The miss still carries every header the routes read, with values no route accepts,
    so the index does all of its lookups and set matches.
    """
    n = FILTER_HIT
    # In the mixed set, route FILTER_HIT is in the header_regex quarter.
    mix_of_n = FILTER_MIXES[n * 4 // FILTER_ROUTES] if mix == "mixed" else mix
    user = tenant = dev = "nobody"
    target = "/api/v2/orders/9?page=2"
    if hit:
        if mix_of_n == "header_exact":
            user = f"user-{n}"
        elif mix_of_n == "all_of_tenant_path":
            tenant, target = f"t-{n}", f"/api/v{n}/orders/9?page=2"
        elif mix_of_n == "header_regex":
            user = f"user-{n}-alice"
        else:
            dev = f"dev{n}"
    extra = (("X-User", user), ("X-Tenant", tenant), ("X-Dev", dev))
    return head(BAGGAGE_NO_KEY, extra, "GET", target)
