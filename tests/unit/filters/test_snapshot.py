"""The snapshot compiler: decide(), explain(), tie-breaking and the filter-only index."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from filters import (
    BASELINE,
    KeyConfig,
    KeySource,
    RequestHead,
    RuleLimits,
    Session,
    ValidationError,
    compile_snapshot,
    parse_session,
    parse_sessions,
)

NOW = 1_000_000.0


def head(target: str = "/", method: str = "GET", **headers: str) -> RequestHead:
    return RequestHead.from_pairs(method, target, [(k.replace("_", "-"), v) for k, v in headers.items()])


def session(sid: str, service: str = "users", dest: str = "10.0.0.1:8080", **extra: Any) -> Session:
    route: dict[str, Any] = {"service": service, "destination": dest}
    for field in ("mode", "fallback", "match", "priority"):
        if field in extra:
            route[field] = extra.pop(field)
    return parse_session({"id": sid, "routes": [route], **extra}, now=extra.get("created_at", NOW))


# --------------------------------------------------------------------------- keyed


def test_keyed_steal_routes_to_the_sandbox() -> None:
    snap = compile_snapshot([session("fix-1", key="abc123", dest="10.0.0.9:9090")], "v1")
    d = snap.decide("users", head(baggage="userId=x,turnout-session=abc123"), NOW)
    assert (d.kind, d.session_id, str(d.destination), d.mode, d.fallback) == (
        "sandbox", "fix-1", "10.0.0.9:9090", "steal", "baseline")


def test_keyed_mirror_and_error_fallback_are_carried() -> None:
    snap = compile_snapshot([session("m", key="k1", mode="mirror", fallback="error")], "v1")
    d = snap.decide("users", head(baggage="turnout-session=k1"), NOW)
    assert (d.kind, d.mode, d.fallback) == ("mirror", "mirror", "error")


def test_the_route_upstream_protocol_is_carried_and_explained() -> None:
    spec = {"id": "p", "key": "k2", "routes": [{"service": "users", "destination": "10.0.0.9:80",
                                                "upstream_protocol": "http1"}]}
    snap = compile_snapshot([parse_session(spec, now=NOW)], "v1")
    d = snap.decide("users", head(baggage="turnout-session=k2"), NOW)
    assert d.upstream_protocol == "http1" and d.to_dict()["upstream_protocol"] == "http1"
    assert BASELINE.upstream_protocol == ""  # baseline: the listener's protocol applies
    plain = compile_snapshot([parse_session({**spec, "routes": [{"service": "users", "destination": "10.0.0.9:80"}]},
                                            now=NOW)], "v2")
    routed = plain.decide("users", head(baggage="turnout-session=k2"), NOW)
    assert routed.upstream_protocol == "" and routed.to_dict()["upstream_protocol"] is None  # the listener's


@pytest.mark.parametrize(
    ("service", "headers"),
    [
        ("users", {"baggage": "turnout-session=unknown"}),  # unknown key
        ("orders", {"baggage": "turnout-session=abc123"}),  # no route for this service
        ("users", {}),  # no key at all
        ("users", {"baggage": "turnout-session="}),  # empty key
    ],
)
def test_everything_else_goes_to_baseline(service: str, headers: dict[str, str]) -> None:
    snap = compile_snapshot([session("fix-1", key="abc123")], "v1")
    assert snap.decide(service, head(**headers), NOW) is BASELINE


def test_expiry_is_exact_with_the_clock_passed_in() -> None:
    snap = compile_snapshot([session("s", key="k", expires_at=NOW + 10)], "v1")
    h = head(baggage="turnout-session=k")
    assert snap.decide("users", h, NOW + 9.999).kind == "sandbox"
    assert snap.decide("users", h, NOW + 10) is BASELINE
    assert snap.decide("users", h, NOW + 11) is BASELINE


def test_keyed_route_extra_match_must_hold() -> None:
    snap = compile_snapshot([session("s", key="k", match={"method": ["POST", "PUT"]})], "v1")
    assert snap.decide("users", head(method="POST", baggage="turnout-session=k"), NOW).kind == "sandbox"
    assert snap.decide("users", head(method="GET", baggage="turnout-session=k"), NOW) is BASELINE


def test_same_key_for_different_services_in_two_sessions() -> None:
    a = session("a", service="users", key="k", dest="10.0.0.1:1")
    b = session("b", service="orders", key="k", dest="10.0.0.2:2")
    snap = compile_snapshot([a, b], "v1")
    h = head(baggage="turnout-session=k")
    assert snap.decide("users", h, NOW).session_id == "a"
    assert snap.decide("orders", h, NOW).session_id == "b"


def test_decide_records_the_key_it_found_on_the_head() -> None:
    config = KeyConfig(sources=(KeySource("baggage", ("turnout-session",)), KeySource("query", ("ts",))))
    snap = compile_snapshot([session("s", key="k")], "v1", config)
    h = head("/x?ts=k")
    assert snap.decide("users", h, NOW).session_id == "s"
    assert h.found_key is not None
    assert (h.found_key.value, h.found_key.where, h.found_key.source.propagate) == (
        "k", "query parameter ts", True)
    # Also on a service without routes: the data plane still propagates the key onward.
    h2 = head("/x?ts=other")
    assert snap.decide("payments", h2, NOW) is BASELINE
    assert h2.found_key is not None and h2.found_key.value == "other"


def test_conflicting_claims_are_refused_whole() -> None:
    with pytest.raises(ValidationError) as err:
        compile_snapshot([session("a", key="k"), session("b", key="k")], "v1")
    assert "already claimed by session 'a'" in str(err.value)


def test_session_count_limit() -> None:
    sessions = [session(f"s{i}", key=f"k{i}") for i in range(3)]
    with pytest.raises(ValidationError, match="exceed the limit of 2"):
        compile_snapshot(sessions, "v1", limits=RuleLimits(max_sessions=2))


# --------------------------------------------------------------------------- filter-only


def test_filter_only_routes_and_keyed_precedence() -> None:
    keyed = session("keyed", key="k", dest="10.0.0.1:1")
    alice = session("alice", match={"header": {"name": "x-user", "exact": "alice"}}, dest="10.0.0.2:2")
    snap = compile_snapshot([keyed, alice], "v1")
    assert snap.decide("users", head(x_user="alice"), NOW).session_id == "alice"
    # A request with a key for a keyed session goes there even if a filter also matches.
    assert snap.decide("users", head(x_user="alice", baggage="turnout-session=k"), NOW).session_id == "keyed"
    # An unknown key does not hide filter-only sessions.
    assert snap.decide("users", head(x_user="alice", baggage="turnout-session=zz"), NOW).session_id == "alice"
    assert snap.decide("users", head(x_user="bob"), NOW) is BASELINE


def test_ties_resolve_by_priority_then_age_then_id() -> None:
    match = {"path": {"prefix": "/api"}}
    old = session("zz-old", match=match, created_at=NOW - 100)
    new = session("aa-new", match=match, created_at=NOW)
    same_age = session("bb-same", match=match, created_at=NOW)
    high = session("high", match=match, created_at=NOW, priority=5)
    h = head("/api/x")
    assert compile_snapshot([new, old], "v").decide("users", h, NOW).session_id == "zz-old"
    assert compile_snapshot([same_age, new], "v").decide("users", h, NOW).session_id == "aa-new"
    assert compile_snapshot([old, new, high], "v").decide("users", h, NOW).session_id == "high"
    # The order sessions are given in never matters.
    assert compile_snapshot([high, new, old], "v").decide("users", h, NOW).session_id == "high"


def test_overlap_is_reported_by_explain_and_identical_filters_warned() -> None:
    match = {"header": {"name": "x-dev", "present": True}}
    snap = compile_snapshot([session("a", match=match), session("b", match=match)], "v1")
    assert any("identical filters" in w and "a wins" in w for w in snap.warnings)
    report = snap.explain("users", head(x_dev="1"), NOW)
    assert report["decision"]["session"] == "a"
    assert "also matched: b" in report["overlap"]


def test_expired_filter_only_session_never_matches() -> None:
    s = session("s", match={"method": "DELETE"}, expires_at=NOW)
    snap = compile_snapshot([s], "v1")
    assert snap.decide("users", head(method="DELETE"), NOW) is BASELINE
    assert snap.decide("users", head(method="DELETE"), NOW - 1).session_id == "s"


def test_uncoverable_trees_are_still_evaluated() -> None:
    # 'not' has no necessary positive leaf, so it sits on the always-evaluate list.
    s = session("not-health", match={"not": {"path": {"prefix": "/health"}}})
    snap = compile_snapshot([s], "v1")
    assert snap.decide("users", head("/api"), NOW).session_id == "not-health"
    assert snap.decide("users", head("/health/live"), NOW) is BASELINE


def test_every_indexed_leaf_kind() -> None:
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"header": {"name": "x-a", "exact": "Val"}}, {"x_a": "Val"}),
        ({"header": {"name": "x-a", "exact": "val", "ignore_case": True}}, {"x_a": "VAL"}),
        ({"header": {"name": "x-a", "one_of": ["p", "q"]}}, {"x_a": "q"}),
        ({"header": {"name": "x-c", "present": True}}, {"x_c": ""}),
        ({"header": {"name": "x-a", "prefix": "pre"}}, {"x_a": "prefix"}),
        ({"header": {"name": "x-a", "suffix": "fix"}}, {"x_a": "suffix"}),
        ({"header": {"name": "x-a", "contains": "a.b"}}, {"x_a": "xa.by"}),
        ({"header": {"name": "x-a", "regex": "v[0-9]+"}}, {"x_a": "v42"}),
        ({"header": {"name": "x-a", "regex": "V[0-9]+", "ignore_case": True}}, {"x_a": "v42"}),
        ({"baggage": {"key": "tenant", "exact": "acme"}}, {"baggage": "tenant=acme"}),
        ({"http_filter": {"header_filter": "^x-dev: Bo"}}, {"x_dev": "bob"}),
        ({"http_filter": {"path_filter": "orders"}}, {}),
        ({"method": ["PATCH"]}, {}),
    ]
    for match, headers in cases:
        snap = compile_snapshot([session("s", match=match)], "v1")
        hit = head("/v1/orders/7", method="PATCH", **headers)
        assert snap.decide("users", hit, NOW).session_id == "s", match
        miss = head("/v1/users/7", method="GET", x_a="zzz", x_dev="carol", baggage="tenant=other")
        assert snap.decide("users", miss, NOW) is BASELINE, match


def test_contains_with_regex_metacharacters_is_literal() -> None:
    snap = compile_snapshot([session("s", match={"path": {"contains": "a.b*"}})], "v1")
    assert snap.decide("users", head("/xa.b*y"), NOW).session_id == "s"
    assert snap.decide("users", head("/xaXbbby"), NOW) is BASELINE


# --------------------------------------------------------------------------- index == brute force

_VALUES = ["a", "b", "ab", "A", "ba"]
_HEADERS = ["x-a", "x-b"]


def _leaf_spec() -> st.SearchStrategy[dict[str, Any]]:
    string = st.one_of(
        st.builds(lambda v: {"exact": v}, st.sampled_from(_VALUES)),
        st.builds(lambda v: {"prefix": v}, st.sampled_from(_VALUES)),
        st.builds(lambda v: {"suffix": v}, st.sampled_from(_VALUES)),
        st.builds(lambda v: {"contains": v}, st.sampled_from(_VALUES)),
        st.builds(lambda v: {"regex": v}, st.sampled_from(["a+", "b.?", "[ab]", ".*"])),
        st.builds(lambda v: {"one_of": v}, st.lists(st.sampled_from(_VALUES), min_size=1, max_size=3)),
        st.builds(lambda v: {"present": v}, st.booleans()),
    )
    flags = st.fixed_dictionaries({}, optional={"invert": st.booleans(), "ignore_case": st.booleans()})

    def header(name: str, s: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        return {"header": {"name": name, **s, **f}}

    def path(s: dict[str, Any], f: dict[str, Any]) -> dict[str, Any]:
        s = {"prefix": "/"} if "present" in s else s
        return {"path": {**s, **f}}

    return st.one_of(
        st.builds(header, st.sampled_from(_HEADERS), string, flags),
        st.builds(path, string, flags),
        st.builds(lambda v: {"baggage": {"key": "t", "exact": v}}, st.sampled_from(_VALUES)),
        st.builds(lambda v: {"http_filter": {"header_filter": v}}, st.sampled_from(["x-a: a", "^x-b", "B$"])),
    )


_match_spec = st.recursive(
    _leaf_spec(),
    lambda inner: st.one_of(
        st.builds(lambda c: {"all_of": c}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda c: {"any_of": c}, st.lists(inner, min_size=1, max_size=3)),
        st.builds(lambda c: {"not": c}, inner),
    ),
    max_leaves=5,
)

_request = st.builds(
    lambda path, a, b, t: head(
        "/" + path, **{k: v for k, v in (("x_a", a), ("x_b", b), ("baggage", t)) if v is not None}
    ),
    st.sampled_from([*_VALUES, ""]),
    st.one_of(st.none(), st.sampled_from(_VALUES)),
    st.one_of(st.none(), st.sampled_from(_VALUES)),
    st.one_of(st.none(), st.sampled_from(["t=a", "t=b", "t=ab"])),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(_match_spec, st.integers(0, 2), st.integers(0, 2)), min_size=1, max_size=8),
    st.lists(_request, min_size=1, max_size=6),
)
def test_index_agrees_with_evaluating_every_route(
    routes: list[tuple[dict[str, Any], int, int]], requests: list[RequestHead]
) -> None:
    specs = [
        {"id": f"s{i}", "priority": prio, "created_at": NOW - age,
         "routes": [{"service": "users", "destination": "10.0.0.1:80", "match": match}]}
        for i, (match, prio, age) in enumerate(routes)
    ]
    sessions = parse_sessions(specs)
    snap = compile_snapshot(sessions, "v1")
    ranked = sorted(sessions, key=lambda s: (-s.routes[0].priority, s.created_at, s.id))
    for h in requests:
        expected = next((s.id for s in ranked if s.routes[0].match.matches(h)), None)  # type: ignore[union-attr]
        assert snap.decide("users", h, NOW).session_id == expected


# --------------------------------------------------------------------------- explain


def test_explain_names_the_key_source_and_the_failing_matcher() -> None:
    s = session("s", key="k", match={"header": {"name": "x-user", "exact": "alice"}})
    snap = compile_snapshot([s], "v7")
    report = snap.explain("users", head(baggage="a=1, turnout-session=k", x_user="bob"), NOW)
    assert report["snapshot_version"] == "v7"
    assert report["key"] == {"value": "k", "where": "baggage member turnout-session"}
    assert report["keyed"] == "session s: route match failed: header x-user: wanted exact 'alice', got 'bob'"
    assert report["decision"] == {"kind": "baseline"}
    assert [src["source"] for src in report["key_sources"]] == ["baggage", "tracestate", "ot-baggage", "uberctx"]


def test_explain_expired_and_unknown() -> None:
    snap = compile_snapshot([session("s", key="k", expires_at=NOW)], "v1")
    assert "expired" in snap.explain("users", head(baggage="turnout-session=k"), NOW)["keyed"]
    assert snap.explain("users", head(baggage="turnout-session=q"), NOW)["keyed"] == (
        "no session has key 'q' for this service")
    assert snap.explain("orders", head(), NOW)["keyed"] == "no session has a route for service 'orders'"


def test_to_dict_round_trips_through_validation() -> None:
    s = session("s", key="k", match={"any_of": [{"method": "GET"}, {"path": {"regex": "/a.*"}}]},
                expires_at=NOW + 5, labels={"team": "x"}, owner="alice")
    dumped = compile_snapshot([s], "v1").to_dict()
    again = parse_sessions(dumped["sessions"])
    assert [x.to_dict() for x in again] == dumped["sessions"]


# --------------------------------------------------------------------------- purity

_FORBIDDEN = {"asyncio", "socket", "selectors", "ssl", "subprocess", "threading", "io", "os", "http",
              "urllib.request", "logging", "time"}


def test_filters_imports_no_asyncio_and_no_io_modules() -> None:
    root = pathlib.Path(__file__).resolve().parents[3] / "filters"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name not in _FORBIDDEN and name.split(".")[0] not in {"asyncio", "socket"}, (path, name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"open", "print", "input"}, (path, node.func.id)
    out = subprocess.run(
        [sys.executable, "-c", "import sys, filters; print('asyncio' in sys.modules)"],
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
