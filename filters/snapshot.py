"""The compiled routing table: sessions in, ``decide(service, head, now)`` out.

A snapshot is built whole, off to the side, and never changed afterwards; the data plane
swaps one reference to publish a new one, and a request keeps the snapshot it started
with. The decision, per request:

1. The routing key is extracted (configured sources, first found wins).
2. Keyed routes: a dict lookup ``service -> key -> route``. The route applies when its
   session has not expired and its own extra ``match`` (if any) holds.
3. Otherwise the service's filter-only routes (sessions without a key). They are not
   tried one by one: every route's match tree contributes a *cover*, a set of leaf tests
   at least one of which must hold for the tree to hold. Leaves are indexed by what they
   read (a header, the path, the method, a baggage member): exact values in dicts, every
   other string test in one RE2 set per subject. A request reads each indexed subject
   once, gets the candidate routes, and only candidates are evaluated in full. Routes
   whose trees have no cover (e.g. a bare ``not``) are always candidates.
4. Among matching filter-only routes the winner is the highest ``priority``, then the
   oldest session (``created_at``), then the smallest session id: deterministic, and
   ``explain`` reports every other route that also matched.
5. Nothing applies: baseline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import re2

from filters.errors import Problem, ValidationError
from filters.head import RequestHead
from filters.keys import KeyConfig, KeyExtractor
from filters.matchers import AllOf, AnyOf, HeaderLines, Leaf, Matcher, Not, line_pattern, re2_options
from filters.model import Address, Route, RuleLimits, Session, find_conflicts
from filters.sources import FoundKey


class Decision:
    """Where one request goes. Built once per route at compile time, shared by requests.

    ``kind`` is ``baseline``, ``sandbox`` (steal) or ``mirror`` (baseline answers, a copy
    goes to ``destination``); ``upstream_protocol`` is the route's (empty: the listener's
    applies, as it always does for baseline). A sandbox or mirror decision whose
    ``destination`` is None is a tunnel route with no local process attached: its fallback
    applies at once. ``tunnel`` names the tunnel of a tunnel route (empty otherwise).
    """

    __slots__ = ("kind", "session_id", "destination", "mode", "fallback", "service", "upstream_protocol", "tunnel")

    def __init__(self, kind: str, session_id: str | None = None, destination: Address | None = None,
                 mode: str | None = None, fallback: str | None = None, service: str | None = None,
                 upstream_protocol: str = "", tunnel: str = "") -> None:
        self.kind = kind
        self.session_id = session_id
        self.destination = destination
        self.mode = mode
        self.fallback = fallback
        self.service = service
        self.upstream_protocol = upstream_protocol
        self.tunnel = tunnel

    def __repr__(self) -> str:
        if self.kind == "baseline":
            return "Decision(baseline)"
        return f"Decision({self.kind}, session={self.session_id}, destination={self.destination})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``/explain`` and logs."""
        if self.kind == "baseline":
            return {"kind": "baseline"}
        out: dict[str, Any] = {
            "kind": self.kind,
            "session": self.session_id,
            "destination": "tunnel (local process disconnected)" if self.destination is None
            else str(self.destination),
            "mode": self.mode,
            "fallback": self.fallback,
            "upstream_protocol": self.upstream_protocol or None,  # None: the listener's
        }
        if self.destination is None or self.tunnel:
            out["tunnel"] = self.tunnel or None
            out["tunnel_connected"] = self.destination is not None
        return out


BASELINE = Decision("baseline")


class _Entry:
    """One compiled route: its decision plus what is needed to check it per request."""

    __slots__ = ("session", "route", "decision", "match", "expires_at", "rank", "exact")

    def __init__(self, session: Session, route: Route) -> None:
        self.session = session
        self.route = route
        kind = "mirror" if route.mode == "mirror" else "sandbox"
        self.decision = Decision(kind, session.id, route.destination, route.mode, route.fallback, route.service,
                                 route.upstream_protocol, route.tunnel)
        self.match = route.match
        self.expires_at = math.inf if session.expires_at is None else session.expires_at
        self.rank = (-route.priority, session.created_at, session.id)
        # The whole match is one test the filter index evaluates with identical meaning:
        # an index hit then needs no second evaluation.
        self.exact = _index_is_exact(route.match)


# --------------------------------------------------------------------------- index

# Cost of a leaf kind as an index entry: exact lookups are cheapest and most selective.
_LEAF_COST = {"exact": 1, "one_of": 1, "present": 8}
_DEFAULT_LEAF_COST = 2


def _cover(node: Matcher) -> list[Leaf | HeaderLines] | None:
    """Leaves at least one of which must hold for ``node`` to hold, or None if none exist."""
    if isinstance(node, Leaf):
        if node.invert or (node.test.kind == "present" and not node.test.value):
            return None
        return [node]
    if isinstance(node, HeaderLines):
        return [node]
    if isinstance(node, AllOf):
        best: list[Leaf | HeaderLines] | None = None
        for child in node.children:
            cover = _cover(child)
            if cover is not None and (best is None or _cost(cover) < _cost(best)):
                best = cover
        return best
    if isinstance(node, AnyOf):
        union: list[Leaf | HeaderLines] = []
        for child in node.children:
            cover = _cover(child)
            if cover is None:
                return None
            union.extend(cover)
        return union
    assert isinstance(node, Not)
    return None


def _index_is_exact(match: Matcher | None) -> bool:
    if isinstance(match, HeaderLines):
        return True
    if not isinstance(match, Leaf) or match.invert:
        return False
    test = match.test
    # Case-folded tests are re-checked: RE2's case folding and str.lower() differ on a few
    # non-ASCII characters.
    return not test.ignore_case and (test.kind != "present" or bool(test.value))


def _cost(cover: list[Leaf | HeaderLines]) -> int:
    return sum(_LEAF_COST.get(leaf.test.kind, _DEFAULT_LEAF_COST) if isinstance(leaf, Leaf)
               else _DEFAULT_LEAF_COST for leaf in cover)


def _escape(literal: str) -> str:
    return str(re2.escape(literal))


def _set_pattern(leaf: Leaf) -> str:
    """The leaf's string test as one full-match RE2 pattern."""
    test = leaf.test
    kind, value = test.kind, str(test.value)
    if kind == "regex":
        body = "(?:" + value + ")"
    elif kind == "prefix":
        body = _escape(value) + "(?s:.*)"
    elif kind == "suffix":
        body = "(?s:.*)" + _escape(value)
    elif kind == "contains":
        body = "(?s:.*)" + _escape(value) + "(?s:.*)"
    else:
        raise AssertionError(kind)
    return "(?i:" + body + ")" if test.ignore_case else body


def _new_set(anchor: str) -> Any:
    # Full sets: leaves over one subject. Search sets: mirrord header filters,
    # case-insensitive, line by line over the header block.
    options = re2_options() if anchor == "full" else re2_options(case_sensitive=False, never_nl=True)
    # RE2 sets share one DFA; give it room for a few thousand patterns.
    options.max_mem = 64 << 20
    return re2.Set.FullMatchSet(options) if anchor == "full" else re2.Set.SearchSet(options)


class _SubjectIndex:
    """The index of every cover leaf that reads one subject (say, header ``x-user``)."""

    __slots__ = ("subject", "exact", "folded", "present", "patterns", "pattern_routes", "regex_set")

    def __init__(self, subject: Callable[[RequestHead], str | None]) -> None:
        self.subject = subject
        self.exact: dict[str, list[int]] = {}
        self.folded: dict[str, list[int]] = {}
        self.present: list[int] = []
        self.patterns: dict[str, int] = {}
        self.pattern_routes: list[list[int]] = []
        self.regex_set: Any = None

    def add(self, leaf: Leaf, route_index: int) -> None:
        test = leaf.test
        if test.kind in ("exact", "one_of"):
            table = self.folded if test.ignore_case else self.exact
            values = test.value if test.kind == "one_of" else (test.value,)
            for value in values:
                table.setdefault(value.lower() if test.ignore_case else value, []).append(route_index)
        elif test.kind == "present":
            self.present.append(route_index)
        else:
            self.add_pattern(_set_pattern(leaf), route_index)

    def add_pattern(self, pattern: str, route_index: int) -> None:
        slot = self.patterns.setdefault(pattern, len(self.pattern_routes))
        if slot == len(self.pattern_routes):
            self.pattern_routes.append([])
        self.pattern_routes[slot].append(route_index)

    def build(self, anchor: str) -> list[int]:
        """Compile the RE2 set; returns the routes to evaluate always if that fails."""
        if not self.patterns:
            return []
        regex_set = _new_set(anchor)
        try:
            for pattern in self.patterns:
                regex_set.Add(pattern)
            regex_set.Compile()
        except re2.error:
            return [i for routes in self.pattern_routes for i in routes]
        self.regex_set = regex_set
        return []

    def collect(self, text: str, out: set[int]) -> None:
        """Add the routes whose cover leaves hold for ``text``."""
        hit = self.exact.get(text)
        if hit:
            out.update(hit)
        if self.folded:
            hit = self.folded.get(text.lower())
            if hit:
                out.update(hit)
        if self.present:
            out.update(self.present)
        if self.regex_set is not None:
            matched = self.regex_set.Match(text)
            if matched:
                routes = self.pattern_routes
                for slot in matched:
                    out.update(routes[slot])


class FilterIndex:
    """All filter-only routes of one service, indexed so that cost does not grow per route."""

    __slots__ = ("entries", "_subjects", "_lines", "_always")

    def __init__(self, entries: list[_Entry]) -> None:
        # Sorted by rank: the first matching candidate in index order is the winner.
        self.entries = sorted(entries, key=lambda e: e.rank)
        subjects: dict[tuple[str, str], _SubjectIndex] = {}
        lines = _SubjectIndex(RequestHead.header_block)  # mirrord header filters
        always: set[int] = set()
        for index, entry in enumerate(self.entries):
            cover = None if entry.match is None else _cover(entry.match)
            if cover is None:
                always.add(index)
                continue
            for leaf in cover:
                if isinstance(leaf, HeaderLines):
                    lines.add_pattern(line_pattern(leaf.pattern), index)
                    continue
                sub = subjects.get(leaf.subject_id)
                if sub is None:
                    sub = subjects[leaf.subject_id] = _SubjectIndex(leaf.subject)
                sub.add(leaf, index)
        for sub in subjects.values():
            always.update(sub.build("full"))
        always.update(lines.build("search"))
        for index in always:
            self.entries[index].exact = False  # not found through the index: evaluate in full
        self._subjects = tuple(subjects.values())
        self._lines = lines if lines.regex_set is not None else None
        self._always = frozenset(always)

    def candidates(self, head: RequestHead) -> set[int]:
        """Indexes of routes that may match: a superset of those that do."""
        out = set(self._always)
        for sub in self._subjects:
            text = sub.subject(head)
            if text is not None:
                sub.collect(text, out)
        lines = self._lines
        if lines is not None:
            lines.collect(head.header_block(), out)
        return out

    def select(self, head: RequestHead, now: float) -> _Entry | None:
        """The winning live route whose match holds, or None."""
        entries = self.entries
        for index in sorted(self.candidates(head)):
            entry = entries[index]
            if now < entry.expires_at and (entry.exact or entry.match is None or entry.match.matches(head)):
                return entry
        return None


class _ServiceTable:
    __slots__ = ("keyed", "filters")

    def __init__(self) -> None:
        self.keyed: dict[str, _Entry] = {}
        self.filters: FilterIndex | None = None


# --------------------------------------------------------------------------- snapshot


class Snapshot:
    """An immutable routing table for one version of the session set."""

    __slots__ = ("version", "sessions", "key_config", "warnings", "_extractor", "_services", "_all_live_until",
                 "_by_id", "_warnings_by_service")

    def __init__(self, version: str, sessions: tuple[Session, ...], key_config: KeyConfig,
                 services: dict[str, _ServiceTable], warnings_by_service: dict[str, tuple[str, ...]],
                 extractor: KeyExtractor | None = None, all_live_until: float | None = None) -> None:
        self.version = version
        self.sessions = sessions
        self.key_config = key_config
        self._warnings_by_service = warnings_by_service
        self.warnings = tuple(w for service in sorted(warnings_by_service) for w in warnings_by_service[service])
        self._extractor = extractor or KeyExtractor(key_config)
        self._services = services
        self._by_id = {s.id: s for s in sessions}
        # Until the earliest expiry, no route can have expired: decide() then skips reading
        # each route's expiry, one memory access less per request on a large snapshot.
        self._all_live_until = all_live_until if all_live_until is not None else min(
            (s.expires_at for s in sessions if s.expires_at is not None), default=math.inf)

    @property
    def services(self) -> tuple[str, ...]:
        """Services that have at least one route."""
        return tuple(sorted(self._services))

    def decide(self, service: str, head: RequestHead, now: float) -> Decision:
        """Route one request. Also sets ``head.found_key`` (the data plane propagates it)."""
        found = self._extractor.extract(head)
        head.found_key = found
        table = self._services.get(service)
        if table is None:
            return BASELINE
        if found is not None:
            entry = table.keyed.get(found.value)
            if entry is not None and (now < self._all_live_until or now < entry.expires_at) and (
                entry.match is None or entry.match.matches(head)
            ):
                return entry.decision
        filters = table.filters
        if filters is not None:
            entry = filters.select(head, now)
            if entry is not None:
                return entry.decision
        return BASELINE

    def explain(self, service: str, head: RequestHead, now: float) -> dict[str, Any]:
        """Why ``decide`` routes this request where it does, step by step."""
        decision = self.decide(service, head, now)
        found: FoundKey | None = head.found_key
        report: dict[str, Any] = {
            "service": service,
            "snapshot_version": self.version,
            "key_sources": self._extractor.explain(head),
            "key": None if found is None else {"value": found.value, "where": found.where},
        }
        table = self._services.get(service)
        if table is None:
            report["keyed"] = f"no session has a route for service {service!r}"
            report["filters"] = []
        else:
            report["keyed"] = self._explain_keyed(table, found, head, now)
            report["filters"] = self._explain_filters(table, head, now)
        matched = [f["session"] for f in report["filters"] if f["result"] == "matched"]
        if len(matched) > 1:
            report["overlap"] = (
                f"{len(matched)} filter-only sessions match; {matched[0]} wins "
                "(priority, then oldest, then smallest id); also matched: " + ", ".join(matched[1:])
            )
        report["decision"] = decision.to_dict()
        return report

    @staticmethod
    def _explain_keyed(table: _ServiceTable, found: FoundKey | None, head: RequestHead,
                       now: float) -> str:
        if found is None:
            return "no routing key in the request"
        entry = table.keyed.get(found.value)
        if entry is None:
            return f"no session has key {found.value!r} for this service"
        if now >= entry.expires_at:
            return f"session {entry.session.id} expired at {entry.expires_at}"
        if entry.match is not None:
            reason = entry.match.why_not(head)
            if reason is not None:
                return f"session {entry.session.id}: route match failed: {reason}"
        return f"session {entry.session.id} matched"

    @staticmethod
    def _explain_filters(table: _ServiceTable, head: RequestHead, now: float) -> list[dict[str, Any]]:
        if table.filters is None:
            return []
        out = []
        for entry in table.filters.entries:
            reason = None if entry.match is None else entry.match.why_not(head)
            if now >= entry.expires_at:
                result = "expired"
            elif reason is None:
                result = "matched"
            else:
                result = "no match: " + reason
            out.append({"session": entry.session.id, "priority": entry.route.priority, "result": result})
        return out

    def with_changes(self, upserted: Iterable[Session], removed: Iterable[str], version: str,
                     limits: RuleLimits | None = None) -> Snapshot:
        """A new snapshot with sessions added, replaced (same id) or removed.

        Costs O(changed), not O(all sessions): tables of services no change touches are
        shared with this snapshot, and conflicts are checked against the keyed tables, which
        are the (key, service) claims. Raises ``ValidationError`` (and builds nothing) when a
        session claims a (key, service) that another one holds, or the limit is exceeded.
        This snapshot is not modified.
        """
        limits = limits or RuleLimits()
        upserted = list(upserted)
        by_id = dict(self._by_id)
        changed = {s.id for s in upserted}
        changed.update(removed)
        services: dict[str, _ServiceTable] = dict(self._services)
        copied: set[str] = set()
        filter_services: set[str] = set()

        def table_for(service: str) -> _ServiceTable:
            if service not in copied:
                old = services.get(service)
                table = _ServiceTable()
                if old is not None:
                    table.keyed = dict(old.keyed)
                    table.filters = old.filters
                services[service] = table
                copied.add(service)
            return services[service]

        live_until = self._all_live_until
        for sid in changed:
            old_session = by_id.pop(sid, None)
            if old_session is None:
                continue
            if old_session.expires_at is not None and old_session.expires_at <= live_until:
                live_until = -math.inf  # the earliest expiry may be gone: recompute below
            for route in old_session.routes:
                table = table_for(route.service)
                if old_session.key is None:
                    filter_services.add(route.service)
                elif (entry := table.keyed.get(old_session.key)) is not None and entry.session.id == sid:
                    del table.keyed[old_session.key]
        problems: list[Problem] = []
        for session in upserted:
            by_id[session.id] = session
            if session.expires_at is not None and live_until != -math.inf:
                live_until = min(live_until, session.expires_at)
            for j, route in enumerate(session.routes):
                table = table_for(route.service)
                if session.key is None:
                    filter_services.add(route.service)
                    continue
                holder = table.keyed.get(session.key)
                if holder is not None and holder.session.id != session.id:
                    problems.append(Problem(f"session {session.id}.routes[{j}]",
                                            f"key {session.key!r} for service {route.service!r} is already claimed "
                                            f"by session {holder.session.id!r}"))
                    continue
                table.keyed[session.key] = _Entry(session, route)
        if len(by_id) > limits.max_sessions:
            problems.append(Problem("sessions", f"{len(by_id)} sessions exceed the limit of {limits.max_sessions}"))
        if problems:
            raise ValidationError(problems)
        warnings = dict(self._warnings_by_service)
        for service in filter_services:
            entries = self._filter_entries(service, changed, upserted)
            table = services[service]
            table.filters = FilterIndex(entries) if entries else None
            warnings[service] = tuple(_identical_filters(service, table.filters.entries)) if table.filters else ()
        for service in copied:
            if not services[service].keyed and services[service].filters is None:
                del services[service]
                warnings.pop(service, None)
        sessions = tuple(by_id.values())
        if live_until == -math.inf:
            live_until = min((s.expires_at for s in sessions if s.expires_at is not None), default=math.inf)
        return Snapshot(version, sessions, self.key_config, services, {k: v for k, v in warnings.items() if v},
                        self._extractor, live_until)

    def _filter_entries(self, service: str, changed: set[str], upserted: list[Session]) -> list[_Entry]:
        # The service's filter-only routes after a change: the unchanged ones from the old
        # index (fresh entries: an index marks its own), plus the upserted ones.
        old = self._services.get(service)
        entries = []
        if old is not None and old.filters is not None:
            entries = [_Entry(e.session, e.route) for e in old.filters.entries if e.session.id not in changed]
        entries.extend(_Entry(s, r) for s in upserted if s.key is None for r in s.routes if r.service == service)
        return entries

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``/config_dump``."""
        return {
            "version": self.version,
            "routing": self.key_config.to_dict(),
            "sessions": [s.to_dict() for s in self.sessions],
            "warnings": list(self.warnings),
        }


def compile_snapshot(
    sessions: Iterable[Session],
    version: str,
    key_config: KeyConfig | None = None,
    limits: RuleLimits | None = None,
) -> Snapshot:
    """Build a snapshot; raises ``ValidationError`` (and builds nothing) on any conflict."""
    limits = limits or RuleLimits()
    ordered = tuple(sessions)
    if len(ordered) > limits.max_sessions:
        raise ValidationError(
            [Problem("sessions", f"{len(ordered)} sessions exceed the limit of {limits.max_sessions}")]
        )
    problems = find_conflicts(ordered)
    if problems:
        raise ValidationError(problems)
    services: dict[str, _ServiceTable] = {}
    filter_entries: dict[str, list[_Entry]] = {}
    for session in ordered:
        for route in session.routes:
            table = services.get(route.service)
            if table is None:
                table = services[route.service] = _ServiceTable()
            entry = _Entry(session, route)
            if session.key is not None:
                table.keyed[session.key] = entry
            else:
                filter_entries.setdefault(route.service, []).append(entry)
    warnings: dict[str, tuple[str, ...]] = {}
    for service, entries in filter_entries.items():
        index = services[service].filters = FilterIndex(entries)
        found = _identical_filters(service, index.entries)
        if found:
            warnings[service] = tuple(found)
    return Snapshot(version, ordered, key_config or KeyConfig(), services, warnings)


def _identical_filters(service: str, entries: list[_Entry]) -> list[str]:
    """Warn about filter-only routes whose match is identical: only one can ever win."""
    seen: dict[str, _Entry] = {}
    warnings = []
    for entry in entries:
        spec = json.dumps(None if entry.match is None else entry.match.to_spec(), sort_keys=True)
        first = seen.setdefault(spec, entry)
        if first is not entry:
            warnings.append(
                f"service {service!r}: sessions {first.session.id} and {entry.session.id} have "
                f"identical filters; {first.session.id} wins while it is live"
            )
    return warnings
