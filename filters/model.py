"""Sessions and routes: the rule model, and its validation with field-named messages.

A session is one isolated test context. Its JSON/YAML form::

    id: fix-123                  # [A-Za-z0-9][A-Za-z0-9._-]{0,127}
    key: abc123                  # optional routing key; absent = filter-only session
    owner: alice@example.com     # optional, free text
    labels: {team: payments}     # optional
    expires_at: 1790000000       # optional: unix seconds or RFC 3339; or ttl_s: 7200
    priority: 0                  # optional default for its routes
    routes:
      - service: users
        destination: 10.0.0.5:8080   # or "tunnel": the local process of whoever holds the
                                     # session's tunnel (``turnout connect``; docs/remocal.md)
        mode: steal              # steal | mirror
        fallback: baseline       # baseline | error
        upstream_protocol: http2 # http1 | http2 | auto; absent: the listener's
        priority: 0              # higher wins among overlapping filter-only routes
        match: {header: {name: x-user, exact: alice}}

Validation collects every problem, each naming its field, and refuses the whole input
when there is any: a rule set is applied entirely or not at all.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from filters.baggage import DEFAULT_MAX_BYTES, DEFAULT_MAX_MEMBERS
from filters.errors import Problem, ValidationError
from filters.matchers import Matcher, MatchLimits, parse_match

MODES = ("steal", "mirror")
FALLBACKS = ("baseline", "error")
# How requests reach an upstream: ``http1`` (a listener's default, as nginx and Envoy do),
# ``http2`` every request over HTTP/2 (cleartext, prior knowledge), ``auto`` in the client's
# own protocol. A route without one follows its listener. gRPC always goes HTTP/2.
UPSTREAM_PROTOCOLS = ("auto", "http1", "http2")

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Keys travel in baggage values, tracestate, headers, query strings and cookies; this
# alphabet is valid unencoded in all of them.
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:@+-]{0,127}")
# Service names are Kubernetes-style names, or host[:port] authorities in outbound mode.
_SERVICE_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")

SESSION_FIELDS = frozenset({"id", "key", "owner", "labels", "expires_at", "ttl_s", "created_at", "priority", "routes"})
ROUTE_FIELDS = frozenset({"service", "destination", "mode", "fallback", "match", "priority", "upstream_protocol",
                          "tunnel"})
# ``destination: tunnel``: the route's sandbox is a local process behind a tunnel. The control
# plane pushes it with the address of the gateway holding the tunnel (and ``tunnel`` naming
# it), or, while no tunnel is attached, as ``tunnel`` itself: the route's fallback applies.
TUNNEL = "tunnel"
_PRIORITY_RANGE = (-1_000_000, 1_000_000)
# The last second an RFC 3339 time can name (9999-12-31T23:59:59Z): later times, and
# lifetimes reaching past it, are refused rather than overflowing a float or a date.
MAX_UNIX_S = 253_402_300_799


@dataclass(frozen=True)
class RuleLimits:
    """Size limits on rules, so no single push can make a proxy slow or large."""

    # Sessions in one snapshot: the decide() benchmark is flat to this size and a full
    # compile of it takes well under a second.
    max_sessions: int = 100_000
    # Routes (forked services) in one session: a session forks a handful of services.
    max_routes_per_session: int = 64
    max_labels: int = 32
    max_label_chars: int = 256
    max_owner_chars: int = 256
    match: MatchLimits = field(default_factory=MatchLimits)
    baggage_max_members: int = DEFAULT_MAX_MEMBERS
    baggage_max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True, slots=True)
class Address:
    """An upstream ``host:port``; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: Any) -> Address:
    """Parse ``host:port`` (``[v6]:port`` for IPv6); raises ``ValueError`` with the reason."""
    if not isinstance(text, str) or not text:
        raise ValueError("must be a 'host:port' string")
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r} is not '[ipv6]:port'")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not 'host:port'")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses as '[addr]:port'")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"{host!r} is not a valid host name or IPv4 address")
    # At most 5 digits before int(): it refuses more than 4,300 with a message of its own.
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5) or not 0 < int(port_text) < 65536:
        shown = port_text if len(port_text) <= 20 else port_text[:20] + "..."
        raise ValueError(f"port {shown!r} is not a number from 1 to 65535")
    return Address(host, int(port_text))


@dataclass(frozen=True, slots=True)
class Route:
    """Where one session sends one service's requests.

    ``destination`` None: a tunnel route with no tunnel attached (``destination: tunnel``);
    ``tunnel`` names the tunnel a resolved tunnel route goes through (its gateway), for
    ``explain`` and status.
    """

    service: str
    destination: Address | None
    mode: str = "steal"
    fallback: str = "baseline"
    match: Matcher | None = None
    priority: int = 0
    upstream_protocol: str = ""  # "": the listener's; else one of UPSTREAM_PROTOCOLS
    tunnel: str = ""

    @property
    def is_tunnel(self) -> bool:
        """Whether the sandbox is a local process behind a tunnel (attached or not)."""
        return self.destination is None or bool(self.tunnel)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as accepted by ``parse_session``."""
        out: dict[str, Any] = {
            "service": self.service,
            "destination": TUNNEL if self.destination is None else str(self.destination),
            "mode": self.mode,
            "fallback": self.fallback,
            "priority": self.priority,
        }
        if self.upstream_protocol:
            out["upstream_protocol"] = self.upstream_protocol
        if self.tunnel:
            out["tunnel"] = self.tunnel
        if self.match is not None:
            out["match"] = self.match.to_spec()
        return out


@dataclass(frozen=True, slots=True, eq=False)
class Session:
    """One isolated test context and the routes it forks."""

    id: str
    routes: tuple[Route, ...]
    key: str | None = None
    owner: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: float | None = None

    def live(self, now: float) -> bool:
        """Whether the session has not expired at ``now`` (unix seconds)."""
        return self.expires_at is None or now < self.expires_at

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as accepted by ``parse_session``."""
        out: dict[str, Any] = {"id": self.id}
        if self.key is not None:
            out["key"] = self.key
        if self.owner:
            out["owner"] = self.owner
        if self.labels:
            out["labels"] = dict(self.labels)
        out["created_at"] = self.created_at
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        out["routes"] = [r.to_dict() for r in self.routes]
        return out


def parse_session(
    spec: Any,
    field_path: str = "session",
    limits: RuleLimits | None = None,
    now: float | None = None,
) -> Session:
    """Validate one session spec; raises ``ValidationError`` listing every problem.

    ``now`` (unix seconds) resolves ``ttl_s`` and is the default ``created_at``.
    """
    problems: list[Problem] = []
    session = _parse_session(spec, field_path, limits or RuleLimits(), now, problems)
    if problems or session is None:
        raise ValidationError(problems)
    return session


def parse_sessions(
    specs: Any,
    field_path: str = "sessions",
    limits: RuleLimits | None = None,
    now: float | None = None,
) -> list[Session]:
    """Validate a list of session specs together, including conflicts between them."""
    limits = limits or RuleLimits()
    problems: list[Problem] = []
    if not isinstance(specs, list):
        raise ValidationError([Problem(field_path, "must be a list of sessions")])
    if len(specs) > limits.max_sessions:
        raise ValidationError(
            [Problem(field_path, f"{len(specs)} sessions exceed the limit of {limits.max_sessions}")]
        )
    sessions = []
    positions = []
    for i, spec in enumerate(specs):
        session = _parse_session(spec, f"{field_path}[{i}]", limits, now, problems)
        if session is not None:
            sessions.append(session)
            positions.append(i)
    problems.extend(find_conflicts(sessions, field_path, positions))
    if problems:
        raise ValidationError(problems)
    return sessions


def find_conflicts(
    sessions: Sequence[Session], field_path: str = "sessions", positions: Sequence[int] | None = None
) -> list[Problem]:
    """Problems for duplicate session ids and for two sessions claiming one (key, service).

    ``positions`` gives each session's index in the original input, for the field paths.
    """
    problems = []
    ids: set[str] = set()
    claims: dict[tuple[str, str], str] = {}
    for i, session in enumerate(sessions):
        where = f"{field_path}[{i if positions is None else positions[i]}]"
        if session.id in ids:
            problems.append(Problem(where + ".id", f"duplicate session id {session.id!r}"))
        ids.add(session.id)
        if session.key is None:
            continue
        for j, route in enumerate(session.routes):
            claim = (session.key, route.service)
            owner = claims.setdefault(claim, session.id)
            if owner != session.id:
                problems.append(
                    Problem(
                        f"{where}.routes[{j}]",
                        f"key {session.key!r} for service {route.service!r} is already claimed by session {owner!r}",
                    )
                )
    return problems


def _parse_session(
    spec: Any, where: str, limits: RuleLimits, now: float | None, problems: list[Problem]
) -> Session | None:
    before = len(problems)

    def fail(at: str, reason: str) -> None:
        problems.append(Problem(at, reason))

    if not isinstance(spec, Mapping):
        fail(where, "must be a mapping")
        return None
    unknown = set(spec) - SESSION_FIELDS
    if unknown:
        fail(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown))))
    sid = spec.get("id")
    if not isinstance(sid, str) or not _ID_RE.fullmatch(sid):
        fail(where + ".id", "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    key = spec.get("key")
    if key is not None and (not isinstance(key, str) or not _KEY_RE.fullmatch(key)):
        fail(where + ".key", "must be 1-128 characters of letters, digits and ._~:@+- starting with a letter or digit")
    owner = spec.get("owner", "")
    if not isinstance(owner, str) or len(owner) > limits.max_owner_chars or not owner.isprintable():
        fail(where + ".owner", f"must be printable text of at most {limits.max_owner_chars} characters")
    labels = spec.get("labels", {})
    _check_labels(labels, where + ".labels", limits, fail)
    created_at = _parse_time(spec.get("created_at", now if now is not None else 0.0), where + ".created_at", fail)
    expires_at = None
    if "expires_at" in spec and "ttl_s" in spec:
        fail(where, "give expires_at or ttl_s, not both")
    elif "expires_at" in spec:
        expires_at = _parse_time(spec["expires_at"], where + ".expires_at", fail)
    elif "ttl_s" in spec:
        ttl = spec["ttl_s"]
        if now is None:
            fail(where + ".ttl_s", "cannot be resolved here; give expires_at")
        elif isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_UNIX_S - now:
            fail(where + ".ttl_s", "must be a positive number of seconds, ending before the year 10000")
        else:
            expires_at = now + ttl
    default_priority = _parse_priority(spec.get("priority", 0), where + ".priority", fail)
    routes_spec = spec.get("routes")
    routes: list[Route] = []
    if not isinstance(routes_spec, list) or not routes_spec:
        fail(where + ".routes", "must be a non-empty list of routes")
    elif len(routes_spec) > limits.max_routes_per_session:
        fail(where + ".routes", f"{len(routes_spec)} routes exceed the limit of {limits.max_routes_per_session}")
    else:
        services: set[str] = set()
        for i, route_spec in enumerate(routes_spec):
            route = _parse_route(route_spec, f"{where}.routes[{i}]", limits, default_priority, problems)
            if route is None:
                continue
            if route.service in services:
                fail(f"{where}.routes[{i}].service",
                     f"service {route.service!r} has more than one route in this session")
            services.add(route.service)
            routes.append(route)
    if len(problems) != before:
        return None
    assert isinstance(sid, str)
    return Session(
        id=sid,
        routes=tuple(routes),
        key=key,
        owner=owner,
        labels=dict(labels),
        created_at=created_at or 0.0,
        expires_at=expires_at,
    )


def _parse_route(
    spec: Any, where: str, limits: RuleLimits, default_priority: int, problems: list[Problem]
) -> Route | None:
    before = len(problems)

    def fail(at: str, reason: str) -> None:
        problems.append(Problem(at, reason))

    if not isinstance(spec, Mapping):
        fail(where, "must be a mapping")
        return None
    unknown = set(spec) - ROUTE_FIELDS
    if unknown:
        fail(where, "unknown field(s): " + ", ".join(sorted(map(str, unknown))))
    service = spec.get("service")
    if not isinstance(service, str) or not _SERVICE_RE.fullmatch(service):
        fail(where + ".service", "must be a service name (letters, digits, '.', '_', '-', optional :port)")
    destination = None
    tunnel_route = spec.get("destination") == TUNNEL
    if not tunnel_route:
        try:
            destination = parse_address(spec.get("destination"))
        except ValueError as exc:
            fail(where + ".destination", f"{exc} (or 'tunnel': a local process, see turnout connect)")
    tunnel = spec.get("tunnel", "")
    if not isinstance(tunnel, str) or len(tunnel) > 256 or not tunnel.isprintable():
        fail(where + ".tunnel", "must be printable text of at most 256 characters")
        tunnel = ""
    mode = spec.get("mode", "steal")
    if mode not in MODES:
        fail(where + ".mode", "must be one of: " + ", ".join(MODES))
    fallback = spec.get("fallback", "baseline")
    if fallback not in FALLBACKS:
        fail(where + ".fallback", "must be one of: " + ", ".join(FALLBACKS))
    upstream_protocol = spec.get("upstream_protocol", "")
    if upstream_protocol != "" and upstream_protocol not in UPSTREAM_PROTOCOLS:
        fail(where + ".upstream_protocol", "must be one of: " + ", ".join(UPSTREAM_PROTOCOLS))
    priority = _parse_priority(spec.get("priority", default_priority), where + ".priority", fail)
    match = None
    if "match" in spec:
        match = parse_match(
            spec["match"], where + ".match", problems, limits.match,
            (limits.baggage_max_members, limits.baggage_max_bytes),
        )
    if len(problems) != before or (destination is None and not tunnel_route):
        return None
    assert isinstance(service, str)
    return Route(service, destination, mode, fallback, match, priority, upstream_protocol, tunnel)


def finite_number(value: Any) -> float | None:
    """The finite float a JSON or YAML number stands for; None for a bool, anything not a
    number, NaN, an infinity, or an integer too large for a float (``float()`` of one
    raises ``OverflowError``), so the caller can name the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _parse_priority(value: Any, where: str, fail: Any) -> int:
    lo, hi = _PRIORITY_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        fail(where, f"must be an integer from {lo} to {hi}")
        return 0
    return value


def _parse_time(value: Any, where: str, fail: Any) -> float | None:
    if isinstance(value, str):
        try:
            # RFC 3339 section 5.6 allows a lower-case "z" as well as "Z".
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            fail(where, "must be unix seconds or an RFC 3339 time")
            return None
        if parsed.tzinfo is None:
            fail(where, "an RFC 3339 time needs a zone offset, e.g. 'Z'")
            return None
        return parsed.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_UNIX_S:
        fail(where, "must be unix seconds or an RFC 3339 time, before the year 10000")
        return None
    return float(value)


def _check_labels(labels: Any, where: str, limits: RuleLimits, fail: Any) -> None:
    if not isinstance(labels, Mapping):
        fail(where, "must be a mapping of label to value")
        return
    if len(labels) > limits.max_labels:
        fail(where, f"{len(labels)} labels exceed the limit of {limits.max_labels}")
        return
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
            fail(f"{where}.{k}", "label names are 1-63 letters, digits, '.', '_', '/', '-'")
        elif not isinstance(v, str) or len(v) > limits.max_label_chars or not v.isprintable():
            fail(f"{where}.{k}", f"label values are printable text of at most {limits.max_label_chars} characters")
