"""Unit tests for filters.model: sessions, routes, addresses, limits and conflicts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from filters.errors import Problem, ValidationError
from filters.head import RequestHead
from filters.matchers import MatchLimits
from filters.model import (
    Address,
    RuleLimits,
    Session,
    find_conflicts,
    parse_address,
    parse_session,
    parse_sessions,
)

NOW = 1_800_000_000.0
T2030 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def route(service: str = "users", destination: str = "10.0.0.5:8080", **extra: Any) -> dict[str, Any]:
    return {"service": service, "destination": destination, **extra}


def session(sid: str = "s1", routes: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "routes": [route()] if routes is None else routes, **extra}


def refused(spec: Any, **kwargs: Any) -> list[Problem]:
    with pytest.raises(ValidationError) as info:
        parse_session(spec, **kwargs)
    assert info.value.problems, "a ValidationError must carry its problems"
    return info.value.problems


def refused_all(specs: Any, **kwargs: Any) -> list[Problem]:
    with pytest.raises(ValidationError) as info:
        parse_sessions(specs, **kwargs)
    assert info.value.problems
    return info.value.problems


def fields(problems: list[Problem]) -> list[str]:
    return [p.field for p in problems]


# --------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    s = parse_session(session(key="k1"))
    assert s.id == "s1"
    assert s.key == "k1"
    assert s.owner == ""
    assert dict(s.labels) == {}
    assert s.created_at == 0.0
    assert s.expires_at is None
    assert len(s.routes) == 1
    r = s.routes[0]
    assert r.service == "users"
    assert r.destination == Address("10.0.0.5", 8080)
    assert r.mode == "steal"
    assert r.fallback == "baseline"
    assert r.priority == 0
    assert r.match is None


def test_key_is_optional() -> None:
    assert parse_session(session()).key is None


def test_now_is_the_default_created_at() -> None:
    assert parse_session(session(), now=NOW).created_at == NOW
    assert parse_session(session(created_at=NOW - 5), now=NOW).created_at == NOW - 5


def test_explicit_fields() -> None:
    s = parse_session(
        session(
            key="abc.123~x:y@z+w-v_u",
            owner="alice@example.com",
            labels={"team": "payments", "example.com/agent": "claude"},
            routes=[
                route(
                    "users:8080",
                    "users-sandbox.dev.svc.cluster.local:9000",
                    mode="mirror",
                    fallback="error",
                    priority=7,
                    match={"header": {"name": "x-user", "exact": "alice"}},
                )
            ],
        )
    )
    assert s.owner == "alice@example.com"
    assert dict(s.labels) == {"team": "payments", "example.com/agent": "claude"}
    r = s.routes[0]
    assert r.service == "users:8080"
    assert r.destination == Address("users-sandbox.dev.svc.cluster.local", 9000)
    assert (r.mode, r.fallback, r.priority) == ("mirror", "error", 7)
    assert r.match is not None
    assert r.match.matches(RequestHead("GET", "/", {"x-user": "alice"}))
    assert not r.match.matches(RequestHead("GET", "/", {"x-user": "bob"}))


def test_session_priority_is_the_routes_default() -> None:
    routes = [route("users"), route("orders", priority=-1), route("cart", priority=0)]
    s = parse_session(session(priority=5, routes=routes))
    assert [r.priority for r in s.routes] == [5, -1, 0]


def test_priority_bounds() -> None:
    assert parse_session(session(priority=1_000_000)).routes[0].priority == 1_000_000
    assert parse_session(session(priority=-1_000_000)).routes[0].priority == -1_000_000
    assert fields(refused(session(priority=1_000_001))) == ["session.priority"]
    assert fields(refused(session(routes=[route(priority=-1_000_001)]))) == ["session.routes[0].priority"]


# --------------------------------------------------------------------------- expiry


def test_ttl_with_now() -> None:
    s = parse_session(session(ttl_s=7200), now=NOW)
    assert s.expires_at == NOW + 7200
    assert s.live(NOW)
    assert s.live(NOW + 7199.999)
    assert not s.live(NOW + 7200)
    assert not s.live(NOW + 10_000)


def test_fractional_ttl() -> None:
    assert parse_session(session(ttl_s=0.5), now=NOW).expires_at == NOW + 0.5


def test_ttl_without_now_is_refused() -> None:
    problems = refused(session(ttl_s=60))
    assert fields(problems) == ["session.ttl_s"]
    assert "expires_at" in problems[0].reason


@pytest.mark.parametrize("ttl", [0, -5, True, "60", float("inf"), float("nan"), None, 1e300, 10**99, 10**400],
                         ids=["zero", "negative", "bool", "string", "inf", "nan", "none", "1e300", "100-digits",
                              "401-digits"])
def test_bad_ttl(ttl: Any) -> None:
    # 10**400 converts to no float: adding it to the clock once raised OverflowError.
    assert fields(refused(session(ttl_s=ttl), now=NOW)) == ["session.ttl_s"]


@pytest.mark.parametrize("when", [10**400, 10**99, 1e300, 253_402_300_800],
                         ids=["401-digits", "100-digits", "1e300", "year-10000"])
def test_times_past_the_year_9999_are_refused(when: Any) -> None:
    # Past what an RFC 3339 time can name; 10**400 once raised OverflowError in float().
    assert fields(refused(session(expires_at=when))) == ["session.expires_at"]
    assert parse_session(session(expires_at=253_402_300_799)).expires_at == 253_402_300_799.0


def test_expires_at_unix_seconds() -> None:
    s = parse_session(session(expires_at=1_900_000_000))
    assert s.expires_at == 1_900_000_000.0
    assert isinstance(s.expires_at, float)
    assert s.live(1_899_999_999)
    assert not s.live(1_900_000_000)


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-01T00:00:00Z",
        "2030-01-01T00:00:00z",
        "2030-01-01t00:00:00Z",
        "2030-01-01T00:00:00+00:00",
        "2030-01-01T02:00:00+02:00",
        "2029-12-31T19:00:00-05:00",
        "2030-01-01T00:00:00.000Z",
        "2030-01-01 00:00:00Z",
    ],
)
def test_expires_at_rfc3339(text: str) -> None:
    assert parse_session(session(expires_at=text)).expires_at == T2030


def test_expires_at_rfc3339_keeps_fractions() -> None:
    assert parse_session(session(expires_at="2030-01-01T00:00:00.250Z")).expires_at == T2030 + 0.25


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2030-01-01T00:00:00", "zone offset"),
        ("2030-01-01", "zone offset"),
        ("tomorrow", "RFC 3339"),
        ("2030-13-01T00:00:00Z", "RFC 3339"),
        ("", "RFC 3339"),
        (-1, "unix seconds"),
        (True, "unix seconds"),
        (float("inf"), "unix seconds"),
        (None, "unix seconds"),
        ([2030], "unix seconds"),
    ],
)
def test_bad_expires_at(value: Any, reason: str) -> None:
    problems = refused(session(expires_at=value))
    assert fields(problems) == ["session.expires_at"]
    assert reason in problems[0].reason


def test_bad_created_at() -> None:
    assert fields(refused(session(created_at="2030-01-01T00:00:00"))) == ["session.created_at"]


def test_expires_at_and_ttl_together_are_refused() -> None:
    problems = refused(session(expires_at=T2030, ttl_s=60), now=NOW)
    assert fields(problems) == ["session"]
    assert "not both" in problems[0].reason


def test_live_without_expiry() -> None:
    s = parse_session(session())
    assert s.live(0)
    assert s.live(1e12)


# --------------------------------------------------------------------------- refusals


def test_not_a_mapping() -> None:
    assert fields(refused(["s1"])) == ["session"]
    assert fields(refused(session(routes=["users"]))) == ["session.routes[0]"]


def test_unknown_session_field() -> None:
    problems = refused(session(colour="red", ttl=5))
    assert fields(problems) == ["session"]
    assert problems[0].reason == "unknown field(s): colour, ttl"


def test_unknown_route_field() -> None:
    problems = refused(session(routes=[route(), route("orders", weight=5)]))
    assert fields(problems) == ["session.routes[1]"]
    assert problems[0].reason == "unknown field(s): weight"


@pytest.mark.parametrize("sid", ["", "-x", ".x", "a b", "a/b", "x" * 129, 5, None, "é"])
def test_bad_id(sid: Any) -> None:
    spec = session(sid)
    if sid is None:
        del spec["id"]
    assert fields(refused(spec)) == ["session.id"]


@pytest.mark.parametrize("sid", ["a", "A-1", "fix_123.v2", "x" * 128, "0"])
def test_good_id(sid: str) -> None:
    assert parse_session(session(sid)).id == sid


@pytest.mark.parametrize("key", ["", "-k", "a b", "k,1", "k;1", "k=1", "k%20", "x" * 129, 5, "k\n"])
def test_bad_key(key: Any) -> None:
    assert fields(refused(session(key=key))) == ["session.key"]


@pytest.mark.parametrize("service", ["", "-users", "users-", "users!", "a:port", "a:123456", "a b", 5])
def test_bad_service(service: Any) -> None:
    assert fields(refused(session(routes=[route(service)]))) == ["session.routes[0].service"]


def test_missing_service() -> None:
    spec = session(routes=[{"destination": "10.0.0.5:80"}])
    assert fields(refused(spec)) == ["session.routes[0].service"]


@pytest.mark.parametrize(
    "destination",
    [
        "10.0.0.5",  # missing port
        "10.0.0.5:",
        ":8080",
        "host:0",
        "host:70000",
        "host:65536",
        "host:-1",
        "host:http",
        "host:٨٠",  # non-ASCII digits
        "bad_host:80",
        "-host:80",
        "host..x:80",
        "::1:80",  # IPv6 without brackets
        "fe80::1:8080",
        "[::1]",
        "[::1]80",
        "[not-v6]:80",
        "[10.0.0.5]:80",
        "",
        5,
        None,
    ],
)
def test_bad_destination(destination: Any) -> None:
    spec = session(routes=[route(destination=destination)])
    if destination is None:
        del spec["routes"][0]["destination"]
    assert fields(refused(spec)) == ["session.routes[0].destination"]


def test_ipv6_destination_hint() -> None:
    problems = refused(session(routes=[route(destination="::1:80")]))
    assert "[addr]:port" in problems[0].reason


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("[::1]:80", "::1", 80),
        ("[2001:db8::5]:8443", "2001:db8::5", 8443),
        ("10.0.0.5:8080", "10.0.0.5", 8080),
        ("users.dev.svc.cluster.local:1", "users.dev.svc.cluster.local", 1),
        ("localhost:65535", "localhost", 65535),
        ("example.com.:443", "example.com.", 443),
    ],
)
def test_good_address(text: str, host: str, port: int) -> None:
    address = parse_address(text)
    assert address == Address(host, port)
    assert str(address) == text
    assert parse_session(session(routes=[route(destination=text)])).routes[0].destination == address


def test_a_port_too_long_to_convert_is_refused_with_a_short_reason() -> None:
    # 5,000 digits: int() would refuse them with a message about sys.set_int_max_str_digits.
    with pytest.raises(ValueError, match=r"^port '1{20}\.\.\.' is not a number from 1 to 65535$"):
        parse_address("10.0.0.1:" + "1" * 5000)
    assert fields(refused(session(routes=[route(destination="10.0.0.1:" + "1" * 5000)]))) == [
        "session.routes[0].destination"]


def test_parse_address_raises_value_error_with_reason() -> None:
    with pytest.raises(ValueError, match="1 to 65535"):
        parse_address("host:0")
    with pytest.raises(ValueError, match="not an IPv6 address"):
        parse_address("[zz]:80")


@pytest.mark.parametrize(("name", "value"), [("mode", "copy"), ("mode", None), ("fallback", "retry"), ("fallback", 1),
                                             ("upstream_protocol", "h2c"), ("upstream_protocol", ["http1"])])
def test_bad_mode_and_fallback(name: str, value: Any) -> None:
    problems = refused(session(routes=[route(**{name: value})]))
    assert fields(problems) == [f"session.routes[0].{name}"]


@pytest.mark.parametrize("protocol", ["auto", "http1", "http2"])
def test_upstream_protocol_is_kept_and_reaches_the_decision(protocol: str) -> None:
    parsed = parse_session(session(routes=[route(upstream_protocol=protocol)]))
    assert parsed.routes[0].upstream_protocol == protocol
    assert parsed.routes[0].to_dict()["upstream_protocol"] == protocol
    assert parse_session(parsed.to_dict()).routes[0] == parsed.routes[0]


def test_a_route_without_upstream_protocol_follows_its_listener() -> None:
    parsed = parse_session(session(routes=[route()]))
    assert parsed.routes[0].upstream_protocol == ""  # the listener's
    assert "upstream_protocol" not in parsed.routes[0].to_dict()  # the default stays implicit


@pytest.mark.parametrize("routes", [[], None, "users", {"service": "users"}])
def test_bad_routes(routes: Any) -> None:
    spec = session()
    spec["routes"] = routes
    if routes is None:
        del spec["routes"]
    problems = refused(spec)
    assert fields(problems) == ["session.routes"]
    assert "non-empty list" in problems[0].reason


def test_duplicate_service_in_one_session() -> None:
    problems = refused(session(routes=[route("users"), route("orders"), route("users", "10.0.0.6:80")]))
    assert fields(problems) == ["session.routes[2].service"]
    assert "more than one route" in problems[0].reason


def test_bool_priority_is_refused() -> None:
    assert fields(refused(session(priority=True))) == ["session.priority"]
    assert fields(refused(session(routes=[route(priority=False)]))) == ["session.routes[0].priority"]
    assert fields(refused(session(routes=[route(priority=1.0)]))) == ["session.routes[0].priority"]
    assert fields(refused(session(routes=[route(priority="1")]))) == ["session.routes[0].priority"]


def test_bad_owner() -> None:
    assert fields(refused(session(owner=5))) == ["session.owner"]
    assert fields(refused(session(owner="a\nb"))) == ["session.owner"]
    assert fields(refused(session(owner="x" * 11), limits=RuleLimits(max_owner_chars=10))) == ["session.owner"]
    assert parse_session(session(owner="x" * 10), limits=RuleLimits(max_owner_chars=10)).owner == "x" * 10


def test_bad_match_names_the_nested_field() -> None:
    spec = session(routes=[route(match={"all_of": [{"method": "GET"}, {"header": {"name": "x", "regex": "a("}}]})])
    problems = refused(spec)
    assert fields(problems) == ["session.routes[0].match.all_of[1].header.regex"]
    assert "invalid RE2 regex" in problems[0].reason


def test_match_limits_come_from_rule_limits() -> None:
    spec = session(routes=[route(match={"all_of": [{"method": "GET"}, {"path": "/a"}]})])
    parse_session(spec)
    problems = refused(spec, limits=RuleLimits(match=MatchLimits(max_nodes=2)))
    assert fields(problems) == ["session.routes[0].match.all_of[1]"]
    assert "more than 2 nodes" in problems[0].reason


def test_baggage_limits_reach_baggage_matchers() -> None:
    spec = session(routes=[route(match={"baggage": {"key": "tenant", "exact": "acme"}})])
    unlimited = parse_session(spec).routes[0].match
    limited = parse_session(spec, limits=RuleLimits(baggage_max_members=2)).routes[0].match
    assert unlimited is not None
    assert limited is not None
    # A fresh head for each: RequestHead caches its parsed baggage.
    assert unlimited.matches(RequestHead("GET", "/", {"baggage": "a=1,b=2,tenant=acme"}))
    assert not limited.matches(RequestHead("GET", "/", {"baggage": "a=1,b=2,tenant=acme"}))  # past the limit
    assert limited.matches(RequestHead("GET", "/", {"baggage": "a=1,tenant=acme"}))


def test_field_path_prefix_is_used() -> None:
    problems = refused(session(sid="-"), field_path="spec.session")
    assert fields(problems) == ["spec.session.id"]


# --------------------------------------------------------------------------- labels


def test_too_many_labels() -> None:
    limits = RuleLimits(max_labels=2)
    assert len(parse_session(session(labels={"a": "1", "b": "2"}), limits=limits).labels) == 2
    problems = refused(session(labels={"a": "1", "b": "2", "c": "3"}), limits=limits)
    assert fields(problems) == ["session.labels"]
    assert "3 labels exceed the limit of 2" in problems[0].reason


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"bad key": "v"}, "session.labels.bad key"),
        ({"-a": "v"}, "session.labels.-a"),
        ({"a" * 64: "v"}, "session.labels." + "a" * 64),
        ({"": "v"}, "session.labels."),
        ({"team": 5}, "session.labels.team"),
        ({"team": "a\tb"}, "session.labels.team"),
        ({"team": "x" * 257}, "session.labels.team"),
        (["team"], "session.labels"),
        ("team=a", "session.labels"),
    ],
)
def test_bad_labels(labels: Any, field: str) -> None:
    assert fields(refused(session(labels=labels))) == [field]


def test_label_value_limit_is_configurable() -> None:
    limits = RuleLimits(max_label_chars=3)
    parse_session(session(labels={"a": "xyz"}), limits=limits)
    assert fields(refused(session(labels={"a": "wxyz"}), limits=limits)) == ["session.labels.a"]


def test_every_bad_label_is_reported() -> None:
    problems = refused(session(labels={"ok": "1", "bad key": "v", "team": 5}))
    assert sorted(fields(problems)) == ["session.labels.bad key", "session.labels.team"]


# --------------------------------------------------------------------------- limits


def test_too_many_routes() -> None:
    limits = RuleLimits(max_routes_per_session=2)
    parse_session(session(routes=[route("a"), route("b")]), limits=limits)
    problems = refused(session(routes=[route("a"), route("b"), route("c")]), limits=limits)
    assert fields(problems) == ["session.routes"]
    assert "3 routes exceed the limit of 2" in problems[0].reason


def test_too_many_sessions() -> None:
    limits = RuleLimits(max_sessions=2)
    assert len(parse_sessions([session("a"), session("b")], limits=limits)) == 2
    problems = refused_all([session("a"), session("b"), session("c")], limits=limits)
    assert fields(problems) == ["sessions"]
    assert "3 sessions exceed the limit of 2" in problems[0].reason


# --------------------------------------------------------------------------- many problems


def test_every_problem_in_a_session_is_reported() -> None:
    spec = {
        "id": "-bad",
        "key": "bad key",
        "owner": 5,
        "colour": "red",
        "priority": True,
        "routes": [
            {"service": "users", "destination": "host:0", "mode": "copy"},
            {"service": "orders!", "destination": "10.0.0.5:80", "fallback": "maybe", "match": {"nope": 1}},
        ],
    }
    problems = refused(spec)
    assert sorted(fields(problems)) == sorted(
        [
            "session",
            "session.id",
            "session.key",
            "session.owner",
            "session.priority",
            "session.routes[0].destination",
            "session.routes[0].mode",
            "session.routes[1].service",
            "session.routes[1].fallback",
            "session.routes[1].match",
        ]
    )
    message = str(ValidationError(problems))
    assert "session.routes[1].match" in message
    assert "session.key" in message


def test_parse_sessions_reports_problems_of_every_session() -> None:
    specs = [session("-a"), session("b"), session("c", routes=[route(mode="copy")])]
    problems = refused_all(specs)
    assert fields(problems) == ["sessions[0].id", "sessions[2].routes[0].mode"]


def test_parse_sessions_needs_a_list() -> None:
    assert fields(refused_all({"id": "a"})) == ["sessions"]
    assert fields(refused_all(session(), field_path="rules")) == ["rules"]


def test_parse_sessions_passes_now() -> None:
    sessions = parse_sessions([session("a", ttl_s=10), session("b")], now=NOW)
    assert [s.expires_at for s in sessions] == [NOW + 10, None]
    assert [s.created_at for s in sessions] == [NOW, NOW]


# --------------------------------------------------------------------------- conflicts


def test_two_sessions_claiming_one_key_and_service() -> None:
    specs = [
        session("a", key="k1", routes=[route("users")]),
        session("b", key="k1", routes=[route("orders"), route("users", "10.0.0.9:80")]),
    ]
    problems = refused_all(specs)
    assert fields(problems) == ["sessions[1].routes[1]"]
    assert problems[0].reason == "key 'k1' for service 'users' is already claimed by session 'a'"


def test_same_key_for_different_services_is_allowed() -> None:
    sessions = parse_sessions(
        [session("a", key="k1", routes=[route("users")]), session("b", key="k1", routes=[route("orders")])]
    )
    assert [s.id for s in sessions] == ["a", "b"]


def test_same_service_under_different_keys_or_no_key_is_allowed() -> None:
    sessions = parse_sessions(
        [
            session("a", key="k1"),
            session("b", key="k2"),
            session("c", routes=[route(match={"method": "GET"})]),
            session("d", routes=[route(match={"method": "GET"})]),
        ]
    )
    assert len(sessions) == 4


def test_duplicate_session_ids() -> None:
    problems = refused_all([session("a", key="k1"), session("b"), session("a", key="k2")])
    assert fields(problems) == ["sessions[2].id"]
    assert "duplicate session id 'a'" in problems[0].reason


def test_conflicts_and_parse_problems_are_reported_together() -> None:
    specs = [
        session("a", key="k1"),
        session("b", key="k1"),
        session("c", routes=[route(fallback="x")]),
    ]
    problems = refused_all(specs)
    assert sorted(fields(problems)) == ["sessions[1].routes[0]", "sessions[2].routes[0].fallback"]


def test_find_conflicts_directly() -> None:
    a = parse_session(session("a", key="k1", routes=[route("users"), route("orders")]))
    b = parse_session(session("b", key="k1", routes=[route("orders")]))
    c = parse_session(session("c", key="k2", routes=[route("orders")]))
    assert find_conflicts([a, c]) == []
    problems = find_conflicts([a, b, c], "snapshot")
    assert fields(problems) == ["snapshot[1].routes[0]"]
    assert "'orders'" in problems[0].reason
    assert "session 'a'" in problems[0].reason
    assert fields(find_conflicts([a, a])) == ["sessions[1].id"]


# --------------------------------------------------------------------------- to_dict


def test_to_dict_round_trips() -> None:
    spec = {
        "id": "fix-123",
        "key": "abc123",
        "owner": "alice@example.com",
        "labels": {"team": "payments"},
        "expires_at": "2030-01-01T00:00:00Z",
        "priority": 3,
        "routes": [
            {"service": "users", "destination": "[::1]:8080", "mode": "mirror", "fallback": "error"},
            {
                "service": "orders",
                "destination": "orders-sbx:9000",
                "priority": -2,
                "match": {
                    "all_of": [
                        {"header": {"name": "X-User", "one_of": ["bob", "alice"], "ignore_case": True}},
                        {"not": {"path": {"prefix": "/health"}}},
                        {"http_filter": {"header_filter": "x-tenant: acme"}},
                    ]
                },
            },
        ],
    }
    first = parse_session(spec, now=NOW)
    dumped = first.to_dict()
    assert dumped["expires_at"] == T2030
    assert dumped["created_at"] == NOW
    assert [r["priority"] for r in dumped["routes"]] == [3, -2]
    second = parse_session(dumped)
    assert second.to_dict() == dumped
    assert (second.id, second.key, second.owner, dict(second.labels)) == ("fix-123", "abc123", "alice@example.com",
                                                                          {"team": "payments"})
    assert (second.created_at, second.expires_at) == (NOW, T2030)
    assert [(r.service, str(r.destination), r.mode, r.fallback, r.priority) for r in second.routes] == [
        ("users", "[::1]:8080", "mirror", "error", 3),
        ("orders", "orders-sbx:9000", "steal", "baseline", -2),
    ]
    m1, m2 = first.routes[1].match, second.routes[1].match
    assert m1 is not None
    assert m2 is not None
    for h in (
        RequestHead("GET", "/api", {"x-user": "ALICE", "x-tenant": "acme"}),
        RequestHead("GET", "/health", {"x-user": "alice", "x-tenant": "acme"}),
        RequestHead("GET", "/api", {"x-user": "carol", "x-tenant": "acme"}),
        RequestHead("GET", "/api", {"x-user": "bob"}),
    ):
        assert m1.matches(h) is m2.matches(h)
    assert m2.matches(RequestHead("GET", "/api", {"x-user": "ALICE", "x-tenant": "acme"}))


def test_to_dict_of_minimal_session() -> None:
    dumped = parse_session(session()).to_dict()
    assert dumped == {
        "id": "s1",
        "created_at": 0.0,
        "routes": [
            {"service": "users", "destination": "10.0.0.5:8080", "mode": "steal", "fallback": "baseline", "priority": 0}
        ],
    }
    assert parse_session(dumped).to_dict() == dumped


def test_sessions_compare_by_identity() -> None:
    a = parse_session(session())
    b = parse_session(session())
    assert isinstance(a, Session)
    assert a != b
    assert a == a  # noqa: PLR0124


@pytest.mark.parametrize("name", ["expires_at", "created_at", "ttl_s"])
def test_numbers_too_large_for_a_float_are_refused_by_field(name: str) -> None:
    # float(10**400) raises OverflowError: JSON and YAML give such integers.
    spec = session()
    spec[name] = 10**400
    assert fields(refused(spec, now=NOW)) == ["session." + name]


def test_a_tunnel_destination_parses_and_round_trips() -> None:
    session = parse_session({"id": "t", "key": "k", "routes": [{"service": "users", "destination": "tunnel"}]})
    route = session.routes[0]
    assert route.destination is None and route.is_tunnel and route.tunnel == ""
    assert route.to_dict()["destination"] == "tunnel" and "tunnel" not in route.to_dict()
    resolved = parse_session({"id": "t", "key": "k", "routes": [
        {"service": "users", "destination": "10.0.0.7:4000", "tunnel": "t-1 on gateway gw"}]})
    assert resolved.routes[0].is_tunnel and str(resolved.routes[0].destination) == "10.0.0.7:4000"
    assert parse_session(resolved.to_dict()).routes[0].tunnel == "t-1 on gateway gw"
    assert not parse_session({"id": "p", "key": "k", "routes": [
        {"service": "users", "destination": "10.0.0.7:4000"}]}).routes[0].is_tunnel


def test_a_bad_destination_mentions_tunnel() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_session({"id": "t", "key": "k", "routes": [{"service": "users", "destination": "tunel"}]})
    assert "'tunnel'" in caught.value.problems[0].reason
