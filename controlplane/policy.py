"""Guardrails from a YAML policy file, checked before a session is stored.

Every field is optional::

    allowed_services: [users, "orders-*"]          # fnmatch patterns; absent: any service
    allowed_destinations:                          # a destination must match one; absent: any
      - 10.0.0.0/8                                 #   CIDR: for IP-literal destinations
      - "*.sandbox.svc.cluster.local"              #   host pattern: for host-name destinations
    max_sessions: 1000                             # in total
    max_sessions_per_owner: 5
    max_ttl_s: 28800                               # also caps extend
    default_ttl_s: 7200                            # when a create gives neither ttl_s nor expires_at
    require_owner: false
    forbid_unfiltered_steal: true                  # a steal route with neither key nor match takes everyone's traffic
    limits:                                        # tighten filters' RuleLimits / MatchLimits
      max_routes_per_session: 8
      max_labels: 16
      max_regex_chars: 200
      max_regex_program_size: 500
      max_literal_chars: 1024
      max_match_nodes: 16

A refusal is a ``PolicyRefused`` naming the field that refused and saying what to do.
Host-name destinations are matched by name only: the control plane resolves nothing,
because the proxy resolves at connect time and a name's addresses can change in between.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from controlplane.durations import format_duration
from controlplane.errors import PolicyRefused
from filters import Address, MatchLimits, Problem, RuleLimits, Session, ValidationError

_DEFAULT_TTL_S = 7200.0  # two hours: a working session; extend for longer
_RULE_DEFAULTS = RuleLimits()
_MATCH_DEFAULTS = MatchLimits()

# Policy name -> (which limits object, its field); the policy names say what they count.
_LIMIT_FIELDS: dict[str, tuple[str, str]] = {
    "max_routes_per_session": ("rule", "max_routes_per_session"),
    "max_labels": ("rule", "max_labels"),
    "max_regex_chars": ("match", "max_regex_chars"),
    "max_regex_program_size": ("match", "max_regex_program_size"),
    "max_literal_chars": ("match", "max_literal_chars"),
    "max_match_nodes": ("match", "max_nodes"),
}
_FIELDS = ("allowed_services", "allowed_destinations", "max_sessions", "max_sessions_per_owner", "max_ttl_s",
           "default_ttl_s", "require_owner", "forbid_unfiltered_steal", "limits")
_HOST_PATTERN_RE = re.compile(r"[A-Za-z0-9*?.\-\[\]!]+")
_IP_PATTERN_RE = re.compile(r"[0-9.*?]+")
_NUMERIC_HOST_RE = re.compile(r"[0-9.]+|0x[0-9a-f.x]+")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Destinations:
    """Allowed destinations: CIDR networks for IP literals, fnmatch patterns for host names."""

    networks: tuple[Network, ...] = ()
    host_patterns: tuple[str, ...] = ()

    def allows(self, address: Address) -> bool:
        """Whether a route may send requests to ``address``."""
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            host = address.host.lower().rstrip(".")
            # '010.0.0.1' or '167772161' are no IP literals to Python but some resolvers read
            # them as addresses: fail closed rather than match them as names.
            if _NUMERIC_HOST_RE.fullmatch(host):
                return False
            return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.host_patterns)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)

    def describe(self) -> str:
        """The entries as written, for messages."""
        return ", ".join([*map(str, self.networks), *self.host_patterns])


@dataclass(frozen=True)
class Policy:
    """The guardrails in force; ``Policy()`` is the default (no file)."""

    allowed_services: tuple[str, ...] | None = None
    allowed_destinations: Destinations | None = None
    max_sessions: int | None = None
    max_sessions_per_owner: int | None = None
    max_ttl_s: float | None = None
    default_ttl_s: float = _DEFAULT_TTL_S
    require_owner: bool = False
    forbid_unfiltered_steal: bool = True
    limits: RuleLimits = field(default_factory=RuleLimits)

    def check_create(self, session: Session, now: float, total_sessions: int, owner_sessions: int) -> None:
        """Raise ``PolicyRefused`` if the session may not be created.

        ``total_sessions`` and ``owner_sessions`` are the counts before it is added.
        """
        if self.require_owner and not session.owner:
            raise PolicyRefused("require_owner", "every session needs an owner: give one (--owner, or 'owner' "
                                "in the session spec)")
        for route in session.routes:
            if self.allowed_services is not None and not any(
                    fnmatch.fnmatchcase(route.service, p) for p in self.allowed_services):
                raise PolicyRefused("allowed_services", f"service {route.service!r} may not be forked here; "
                                    f"allowed services: {', '.join(self.allowed_services)}")
            if self.allowed_destinations is not None and not self.allowed_destinations.allows(route.destination):
                raise PolicyRefused(
                    "allowed_destinations",
                    f"destination {route.destination} (service {route.service!r}) is outside the allowed "
                    f"destinations ({self.allowed_destinations.describe()}); point the route at a sandbox there")
            if (self.forbid_unfiltered_steal and route.mode == "steal" and session.key is None
                    and route.match is None):
                raise PolicyRefused(
                    "forbid_unfiltered_steal",
                    f"the route for service {route.service!r} would steal every request to it (the session has "
                    "no key and the route no match); give the session a key, give the route a match, or use "
                    "mode mirror")
        self._check_ttl(session.expires_at, now)
        if self.max_sessions is not None and total_sessions >= self.max_sessions:
            raise PolicyRefused("max_sessions", f"there are {total_sessions} sessions, the most allowed; delete "
                                "sessions that are no longer needed")
        if self.max_sessions_per_owner is not None and owner_sessions >= self.max_sessions_per_owner:
            who = repr(session.owner) if session.owner else "(no owner)"
            raise PolicyRefused("max_sessions_per_owner", f"owner {who} already has {owner_sessions} sessions, the "
                                "most allowed per owner; delete one first")

    def check_extend(self, expires_at: float | None, now: float) -> None:
        """Raise ``PolicyRefused`` if a session may not be extended to ``expires_at``."""
        self._check_ttl(expires_at, now)

    def _check_ttl(self, expires_at: float | None, now: float) -> None:
        if self.max_ttl_s is None:
            return
        if expires_at is None:
            raise PolicyRefused("max_ttl_s", f"sessions must expire within {format_duration(self.max_ttl_s)}; "
                                "give a ttl")
        if expires_at - now > self.max_ttl_s:
            raise PolicyRefused("max_ttl_s", f"the session would live {format_duration(expires_at - now)} but at "
                                f"most {format_duration(self.max_ttl_s)} is allowed; ask for a shorter ttl and "
                                "extend it later")


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises ``ValidationError`` naming every bad field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError([Problem(str(path), f"cannot read the policy file: {exc.strerror}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValidationError([Problem(str(path), f"invalid YAML: {exc}")]) from None
    return parse_policy({} if data is None else data)


def parse_policy(data: Any, where: str = "policy") -> Policy:
    """Validate a policy mapping; raises ``ValidationError`` listing every problem."""
    problems: list[Problem] = []

    def fail(at: str, reason: str) -> None:
        problems.append(Problem(at, reason))

    if not isinstance(data, Mapping):
        raise ValidationError([Problem(where, "must be a mapping of policy fields")])
    for name in data:
        if name not in _FIELDS:
            fail(f"{where}.{name}", "unknown policy field; known fields: " + ", ".join(_FIELDS))
    policy = Policy()
    changes: dict[str, Any] = {}
    if data.get("allowed_services") is not None:
        changes["allowed_services"] = _patterns(data["allowed_services"], f"{where}.allowed_services", fail)
    if data.get("allowed_destinations") is not None:
        changes["allowed_destinations"] = _destinations(data["allowed_destinations"],
                                                        f"{where}.allowed_destinations", fail)
    for name in ("max_sessions", "max_sessions_per_owner"):
        if data.get(name) is not None:
            changes[name] = _count(data[name], f"{where}.{name}", _RULE_DEFAULTS.max_sessions, fail)
    for name in ("max_ttl_s", "default_ttl_s"):
        if data.get(name) is not None:
            changes[name] = _seconds(data[name], f"{where}.{name}", fail)
    for name in ("require_owner", "forbid_unfiltered_steal"):
        if name in data:
            if isinstance(data[name], bool):
                changes[name] = data[name]
            else:
                fail(f"{where}.{name}", "must be true or false")
    if data.get("limits") is not None:
        changes["limits"] = _limits(data["limits"], f"{where}.limits", fail)
    max_ttl_s = changes.get("max_ttl_s")
    default_ttl_s = changes.get("default_ttl_s", policy.default_ttl_s)
    if max_ttl_s is not None and default_ttl_s > max_ttl_s:
        fail(f"{where}.default_ttl_s", f"{format_duration(default_ttl_s)} is longer than max_ttl_s "
             f"({format_duration(max_ttl_s)}); every create without a ttl would be refused")
    if problems:
        raise ValidationError(problems)
    return dataclasses.replace(policy, **changes)


def _patterns(value: Any, where: str, fail: Callable[[str, str], None]) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        fail(where, "must be a list of non-empty fnmatch patterns, e.g. [users, 'orders-*']")
        return ()
    return tuple(value)


def _destinations(value: Any, where: str, fail: Callable[[str, str], None]) -> Destinations:
    if not isinstance(value, list):
        fail(where, "must be a list of CIDRs (10.0.0.0/8) and host patterns (*.sandbox.svc.cluster.local)")
        return Destinations()
    networks: list[Network] = []
    patterns: list[str] = []
    for i, entry in enumerate(value):
        if not isinstance(entry, str) or not entry:
            fail(f"{where}[{i}]", "must be a CIDR or a host pattern")
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
            continue
        except ValueError as exc:
            if any(c in entry for c in ":/") or entry.replace(".", "").isdigit():
                fail(f"{where}[{i}]", f"is not a valid CIDR: {exc}")
                continue
        if _IP_PATTERN_RE.fullmatch(entry):
            fail(f"{where}[{i}]", "IP destinations are matched by network: write a CIDR, e.g. 10.0.0.0/8")
            continue
        if not _HOST_PATTERN_RE.fullmatch(entry):
            fail(f"{where}[{i}]", "is neither a CIDR nor a host pattern (letters, digits, '.', '-', '*', '?')")
            continue
        patterns.append(entry.lower().rstrip("."))
    return Destinations(tuple(networks), tuple(patterns))


def _count(value: Any, where: str, most: int, fail: Callable[[str, str], None]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= most:
        fail(where, f"must be a whole number from 1 to {most}")
        return most
    return value


def _seconds(value: Any, where: str, fail: Callable[[str, str], None]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        fail(where, "must be a positive number of seconds")
        return _DEFAULT_TTL_S
    return float(value)


def _limits(value: Any, where: str, fail: Callable[[str, str], None]) -> RuleLimits:
    if not isinstance(value, Mapping):
        fail(where, "must be a mapping of limit to value")
        return _RULE_DEFAULTS
    rule: dict[str, int] = {}
    match: dict[str, int] = {}
    for name, limit in value.items():
        target = _LIMIT_FIELDS.get(name)
        if target is None:
            fail(f"{where}.{name}", "unknown limit; known limits: " + ", ".join(_LIMIT_FIELDS))
            continue
        kind, attr = target
        # Only tightening: every proxy validates with filters' defaults and would refuse more.
        most = getattr(_RULE_DEFAULTS if kind == "rule" else _MATCH_DEFAULTS, attr)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= most:
            fail(f"{where}.{name}", f"must be a whole number from 1 to {most} (proxies refuse more than {most})")
            continue
        (rule if kind == "rule" else match)[attr] = limit
    return dataclasses.replace(_RULE_DEFAULTS, match=dataclasses.replace(_MATCH_DEFAULTS, **match), **rule)
