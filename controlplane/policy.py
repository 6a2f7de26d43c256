"""Guardrails from a YAML policy file, checked before a session is stored or changed.

Every field is optional::

    # the defaults: for callers in none of the groups below
    allowed_services: [users, "orders-*"]          # fnmatch patterns; absent: any service
    allowed_destinations:                          # a destination must match one; absent: any
      - 10.0.0.0/8                                 #   CIDR: for IP-literal destinations
      - "*.sandbox.svc.cluster.local"              #   host pattern: for host-name destinations
    modes: [steal, mirror, steal_without_key]      # steal_without_key: a filter-only steal route
    forbid_unfiltered_steal: true                  # refuse a steal route with no key and no real filter
    max_priority: 100                              # highest route priority (filter-only routes rank by it)
    max_ttl_s: 28800                               # caps create and extend
    max_sessions_per_owner: 5                      # the owner is the identity that created the session
    allow_lower_priority_overlap: false            # may overlap another owner's filter, below its priority
    groups:                                        # per group (of the caller's identity): the same rules,
      developers: {max_ttl_s: 7200}                #   unset ones inherited from the defaults above
      agents: {modes: [steal, mirror], max_sessions_per_owner: 20}
    # for everyone
    max_sessions: 1000                             # in total
    default_ttl_s: 7200                            # when a create gives neither ttl_s nor expires_at
    require_owner: false                           # kept for older files: the owner is always the identity now
    limits:                                        # tighten filters' RuleLimits / MatchLimits
      max_routes_per_session: 8
      max_labels: 16
      max_regex_chars: 200
      max_regex_program_size: 500
      max_literal_chars: 1024
      max_match_nodes: 16

A caller in several groups gets the most permissive of their rules, field by field. A
refusal is a ``PolicyRefused`` naming the rule that refused (and whose rule it was) and
saying what to do; an overlap with another owner's session is a ``Conflict`` naming both.
Host-name destinations are matched by name only: the control plane resolves nothing,
because the proxy resolves at connect time and a name's addresses can change in between.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from controlplane.durations import format_duration
from controlplane.errors import Conflict, PolicyRefused
from controlplane.identity import name_problem
from controlplane.overlap import disjoint, unfiltered
from filters import Address, MatchLimits, Problem, Route, RuleLimits, Session, ValidationError, finite_number
from filters.documents import load_yaml

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
MODES = ("steal", "mirror", "steal_without_key")
# Rules that the defaults and each group may set.
_RULE_FIELDS = ("allowed_services", "allowed_destinations", "modes", "forbid_unfiltered_steal", "max_priority",
                "max_ttl_s", "max_sessions_per_owner", "allow_lower_priority_overlap")
_FIELDS = (*_RULE_FIELDS, "max_sessions", "default_ttl_s", "require_owner", "limits", "groups")
# filters' route priority range.
_PRIORITY_LIMIT = 1_000_000
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
class Rules:
    """The guardrails for one set of callers: the policy's defaults, or one group's.

    ``groups`` names the policy groups the rules come from (empty: the defaults), so a
    refusal can say whose rule it was.
    """

    allowed_services: tuple[str, ...] | None = None
    allowed_destinations: Destinations | None = None
    modes: frozenset[str] | None = None
    forbid_unfiltered_steal: bool = True
    max_priority: int | None = None
    max_ttl_s: float | None = None
    max_sessions_per_owner: int | None = None
    allow_lower_priority_overlap: bool = False
    groups: tuple[str, ...] = ()

    @classmethod
    def merge(cls, rules: Sequence[Rules]) -> Rules:
        """The most permissive of several groups' rules, field by field (a member of two groups
        may do what either allows)."""
        if len(rules) == 1:
            return rules[0]

        def most(values: list[Any]) -> Any:
            return None if any(v is None for v in values) else max(values)

        services = [r.allowed_services for r in rules]
        destinations = [r.allowed_destinations for r in rules]
        modes = [r.modes for r in rules]
        return cls(
            allowed_services=None if any(s is None for s in services)
            else tuple(dict.fromkeys(p for s in services if s is not None for p in s)),
            allowed_destinations=None if any(d is None for d in destinations) else Destinations(
                tuple(dict.fromkeys(n for d in destinations if d is not None for n in d.networks)),
                tuple(dict.fromkeys(h for d in destinations if d is not None for h in d.host_patterns))),
            modes=None if any(m is None for m in modes) else frozenset().union(*(m for m in modes if m is not None)),
            forbid_unfiltered_steal=all(r.forbid_unfiltered_steal for r in rules),
            max_priority=most([r.max_priority for r in rules]),
            max_ttl_s=most([r.max_ttl_s for r in rules]),
            max_sessions_per_owner=most([r.max_sessions_per_owner for r in rules]),
            allow_lower_priority_overlap=any(r.allow_lower_priority_overlap for r in rules),
            groups=tuple(g for r in rules for g in r.groups),
        )

    def whose(self) -> str:
        """For messages: whose rules these are."""
        if not self.groups:
            return "the policy's defaults"
        return "the policy for group" + ("s " if len(self.groups) > 1 else " ") + ", ".join(self.groups)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``GET /v1/whoami``): null means no limit."""
        return {
            "groups": list(self.groups),
            "allowed_services": None if self.allowed_services is None else list(self.allowed_services),
            "allowed_destinations": None if self.allowed_destinations is None
            else self.allowed_destinations.describe().split(", "),
            "modes": None if self.modes is None else sorted(self.modes),
            "forbid_unfiltered_steal": self.forbid_unfiltered_steal,
            "max_priority": self.max_priority,
            "max_ttl_s": self.max_ttl_s,
            "max_sessions_per_owner": self.max_sessions_per_owner,
            "allow_lower_priority_overlap": self.allow_lower_priority_overlap,
        }


class Rival(Protocol):
    """A stored session as the overlap check reads it: the session and the group it is shared with."""

    @property
    def session(self) -> Session:
        """The validated session."""

    @property
    def group(self) -> str | None:
        """The group whose members may also change it."""


@dataclass(frozen=True)
class Policy:
    """The guardrails in force; ``Policy()`` is the default (no file).

    ``defaults`` apply to callers in none of the policy's ``groups``; a caller in one or more
    of them gets the most permissive of those groups' rules (each group inherits every field
    it does not set from the defaults).
    """

    defaults: Rules = field(default_factory=Rules)
    groups: Mapping[str, Rules] = field(default_factory=dict)
    max_sessions: int | None = None
    default_ttl_s: float = _DEFAULT_TTL_S
    require_owner: bool = False
    limits: RuleLimits = field(default_factory=RuleLimits)

    def rules_for(self, groups: Iterable[str]) -> Rules:
        """The rules for a caller in ``groups``."""
        matched = [self.groups[g] for g in sorted(set(groups)) if g in self.groups]
        return Rules.merge(matched) if matched else self.defaults

    def default_ttl_for(self, groups: Iterable[str]) -> float:
        """The lifetime of a session created without one: ``default_ttl_s``, cut to the caller's max_ttl_s."""
        max_ttl_s = self.rules_for(groups).max_ttl_s
        return self.default_ttl_s if max_ttl_s is None else min(self.default_ttl_s, max_ttl_s)

    def check_create(self, session: Session, now: float, total_sessions: int, owner_sessions: int,
                     groups: Iterable[str] = ()) -> None:
        """Raise ``PolicyRefused`` if a caller in ``groups`` may not create ``session``.

        ``total_sessions`` and ``owner_sessions`` are the counts before it is added.
        """
        rules = self.rules_for(groups)
        if self.require_owner and not session.owner:
            raise PolicyRefused("require_owner", "every session needs an owner")
        for route in session.routes:
            self._check_route(session, route, rules)
        _check_ttl(rules, session.expires_at, now)
        if self.max_sessions is not None and total_sessions >= self.max_sessions:
            raise PolicyRefused("max_sessions", f"there are {total_sessions} sessions, the most allowed; delete "
                                "sessions that are no longer needed")
        if rules.max_sessions_per_owner is not None and owner_sessions >= rules.max_sessions_per_owner:
            who = repr(session.owner) if session.owner else "(no owner)"
            raise PolicyRefused("max_sessions_per_owner", f"owner {who} already has {owner_sessions} sessions, the "
                                f"most {rules.whose()} allows per owner; delete one first")

    @staticmethod
    def _check_route(session: Session, route: Route, rules: Rules) -> None:
        service = route.service
        if rules.allowed_services is not None and not any(
                fnmatch.fnmatchcase(service, p) for p in rules.allowed_services):
            raise PolicyRefused("allowed_services", f"service {service!r} may not be forked under {rules.whose()}; "
                                f"allowed services: {', '.join(rules.allowed_services)}")
        # A tunnel route's sandbox is the owner's own machine, reached through a gateway: no
        # cluster address to check (only the owner can attach it, see controlplane/tunnels.py).
        if rules.allowed_destinations is not None and route.destination is not None \
                and not rules.allowed_destinations.allows(route.destination):
            raise PolicyRefused(
                "allowed_destinations",
                f"destination {route.destination} (service {service!r}) is outside the destinations "
                f"{rules.whose()} allows ({rules.allowed_destinations.describe()}); point the route at a sandbox there")
        mode = "steal_without_key" if route.mode == "steal" and session.key is None else route.mode
        if rules.modes is not None and mode not in rules.modes:
            raise PolicyRefused("modes", f"mode {mode} (service {service!r}) is not allowed under {rules.whose()}; "
                                f"allowed modes: {', '.join(sorted(rules.modes)) or 'none'}"
                                + ("; give the session a key" if mode == "steal_without_key" else ""))
        if rules.forbid_unfiltered_steal and mode == "steal_without_key" and unfiltered(route.match):
            what = "no match" if route.match is None else "a match that every ordinary request satisfies"
            raise PolicyRefused(
                "forbid_unfiltered_steal",
                f"the route for service {service!r} would steal every request to it (the session has no key and "
                f"the route {what}); give the session a key, give the route a match only your requests satisfy "
                "(e.g. a header you send), or use mode mirror")
        if rules.max_priority is not None and route.priority > rules.max_priority:
            raise PolicyRefused("max_priority", f"priority {route.priority} (service {service!r}) is above "
                                f"{rules.max_priority}, the most {rules.whose()} allows")

    def check_extend(self, expires_at: float | None, now: float, groups: Iterable[str] = ()) -> None:
        """Raise ``PolicyRefused`` if a caller in ``groups`` may not extend a session to ``expires_at``."""
        _check_ttl(self.rules_for(groups), expires_at, now)

    def check_overlap(self, session: Session, group: str | None, rivals: Iterable[Rival], now: float,
                      groups: Iterable[str] = ()) -> None:
        """Raise ``Conflict`` if a filter-only ``session`` could take requests another owner's
        filter-only session (one of ``rivals``) already matches.

        Allowed only when it ranks below that session (a lower priority: the proxy then picks
        the other one where both match) and the caller's rules allow such overlaps. Sessions
        of the same owner, or shared with the same group, never conflict.
        """
        if session.key is not None:
            return  # keyed routes only see requests carrying the key, which no one else may claim
        rules = self.rules_for(groups)
        for rival in rivals:
            other = rival.session
            if other.id == session.id or other.key is not None or other.owner == session.owner or (
                    group is not None and rival.group == group) or not other.live(now):
                continue
            for route in session.routes:
                for theirs in other.routes:
                    if theirs.service != route.service or disjoint(route.match, theirs.match):
                        continue
                    if rules.allow_lower_priority_overlap and route.priority < theirs.priority:
                        continue
                    fix = (f", or give it a priority below {theirs.priority}" if rules.allow_lower_priority_overlap
                           else f"; overlaps are not allowed under {rules.whose()} (allow_lower_priority_overlap)")
                    raise Conflict(
                        f"filter-only session {session.id!r} (service {route.service!r}, priority {route.priority}) "
                        f"could take requests that session {other.id!r} of {other.owner!r} already matches "
                        f"(priority {theirs.priority}); make the filters exclusive (e.g. another value of the same "
                        f"header){fix}", other.id, session.id)


def _check_ttl(rules: Rules, expires_at: float | None, now: float) -> None:
    if rules.max_ttl_s is None:
        return
    if expires_at is None:
        raise PolicyRefused("max_ttl_s", f"sessions must expire within {format_duration(rules.max_ttl_s)} under "
                            f"{rules.whose()}; give a ttl")
    if expires_at - now > rules.max_ttl_s:
        raise PolicyRefused("max_ttl_s", f"the session would live {format_duration(expires_at - now)} but "
                            f"{rules.whose()} allows at most {format_duration(rules.max_ttl_s)}; ask for a shorter "
                            "ttl and extend it later")


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises ``ValidationError`` naming every bad field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError([Problem(str(path), f"cannot read the policy file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ValidationError([Problem(str(path), f"cannot read the policy file: not UTF-8 ({exc})")]) from None
    try:
        data = load_yaml(text)  # ValidationError naming a number too long to convert
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
    if data.get("max_sessions") is not None:
        changes["max_sessions"] = _count(data["max_sessions"], f"{where}.max_sessions", _RULE_DEFAULTS.max_sessions,
                                         fail)
    if data.get("default_ttl_s") is not None:
        changes["default_ttl_s"] = _seconds(data["default_ttl_s"], f"{where}.default_ttl_s", fail)
    if "require_owner" in data:
        if isinstance(data["require_owner"], bool):
            changes["require_owner"] = data["require_owner"]
        else:
            fail(f"{where}.require_owner", "must be true or false")
    if data.get("limits") is not None:
        changes["limits"] = _limits(data["limits"], f"{where}.limits", fail)
    defaults = _rules(data, Rules(), where, fail)
    changes["defaults"] = defaults
    groups: dict[str, Rules] = {}
    raw_groups = data.get("groups")
    if raw_groups is not None:
        if not isinstance(raw_groups, Mapping):
            fail(f"{where}.groups", "must map group names to their rules, e.g. {developers: {max_ttl_s: 7200}}")
        else:
            for group, spec in raw_groups.items():
                at = f"{where}.groups.{group}"
                problem = name_problem(group, "a group")
                if problem is not None:
                    fail(f"{where}.groups", problem)
                    continue
                if not isinstance(spec, Mapping):
                    fail(at, "must be a mapping of rules: " + ", ".join(_RULE_FIELDS))
                    continue
                for name in spec:
                    if name not in _RULE_FIELDS:
                        fail(f"{at}.{name}", "unknown rule for a group; known rules: " + ", ".join(_RULE_FIELDS))
                groups[group] = dataclasses.replace(_rules(spec, defaults, at, fail), groups=(group,))
    changes["groups"] = groups
    default_ttl_s = changes.get("default_ttl_s", policy.default_ttl_s)
    # (A group's lower max_ttl_s is fine: its members' default is cut to it, see default_ttl_for.)
    if defaults.max_ttl_s is not None and default_ttl_s > defaults.max_ttl_s:
        fail(f"{where}.default_ttl_s", f"{format_duration(default_ttl_s)} is longer than max_ttl_s "
             f"({format_duration(defaults.max_ttl_s)}); every create without a ttl would be refused")
    if problems:
        raise ValidationError(problems)
    return dataclasses.replace(policy, **changes)


def _rules(data: Mapping[str, Any], base: Rules, where: str, fail: Callable[[str, str], None]) -> Rules:
    """The rule fields of ``data`` over ``base``."""
    changes: dict[str, Any] = {}
    if data.get("allowed_services") is not None:
        changes["allowed_services"] = _patterns(data["allowed_services"], f"{where}.allowed_services", fail)
    if data.get("allowed_destinations") is not None:
        changes["allowed_destinations"] = _destinations(data["allowed_destinations"],
                                                        f"{where}.allowed_destinations", fail)
    if data.get("modes") is not None:
        modes = data["modes"]
        if not isinstance(modes, list) or not all(mode in MODES for mode in modes):
            fail(f"{where}.modes", "must be a list of: " + ", ".join(MODES))
        else:
            changes["modes"] = frozenset(modes)
    if data.get("max_sessions_per_owner") is not None:
        changes["max_sessions_per_owner"] = _count(data["max_sessions_per_owner"], f"{where}.max_sessions_per_owner",
                                                   _RULE_DEFAULTS.max_sessions, fail)
    if data.get("max_ttl_s") is not None:
        changes["max_ttl_s"] = _seconds(data["max_ttl_s"], f"{where}.max_ttl_s", fail)
    if data.get("max_priority") is not None:
        value = data["max_priority"]
        if isinstance(value, bool) or not isinstance(value, int) or not -_PRIORITY_LIMIT <= value <= _PRIORITY_LIMIT:
            fail(f"{where}.max_priority", f"must be a whole number from {-_PRIORITY_LIMIT} to {_PRIORITY_LIMIT}")
        else:
            changes["max_priority"] = value
    for name in ("forbid_unfiltered_steal", "allow_lower_priority_overlap"):
        if name in data:
            if isinstance(data[name], bool):
                changes[name] = data[name]
            else:
                fail(f"{where}.{name}", "must be true or false")
    return dataclasses.replace(base, **changes)


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
    seconds = finite_number(value)
    if seconds is None or seconds <= 0:
        fail(where, "must be a positive number of seconds")
        return _DEFAULT_TTL_S
    return seconds


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
