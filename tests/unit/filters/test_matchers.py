"""Unit tests for filters.matchers: parsing, matching, explanations and validation."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters.errors import Problem
from filters.head import RequestHead
from filters.matchers import Matcher, MatchLimits, parse_match

WHERE = "route.match"


def head(*pairs: tuple[str, str], target: str = "/", method: str = "GET") -> RequestHead:
    return RequestHead.from_pairs(method, target, pairs)


def parse(spec: Any, limits: MatchLimits | None = None) -> Matcher:
    problems: list[Problem] = []
    matcher = parse_match(spec, WHERE, problems, limits)
    assert problems == []
    assert matcher is not None
    return matcher


def refuse(spec: Any, limits: MatchLimits | None = None) -> list[Problem]:
    problems: list[Problem] = []
    matcher = parse_match(spec, WHERE, problems, limits)
    assert matcher is None
    assert problems, "a refused spec must report at least one problem"
    return problems


def fields(problems: list[Problem]) -> list[str]:
    return [p.field for p in problems]


def user(value: str) -> RequestHead:
    return head(("x-user", value))


# --------------------------------------------------------------------------- string kinds


@pytest.mark.parametrize(
    ("test", "value", "expected"),
    [
        ({"exact": "alice"}, "alice", True),
        ({"exact": "alice"}, "alice2", False),
        ({"exact": "alice"}, "Alice", False),
        ({"prefix": "al"}, "alice", True),
        ({"prefix": "al"}, "xalice", False),
        ({"suffix": "ice"}, "alice", True),
        ({"suffix": "ice"}, "alicex", False),
        ({"contains": "lic"}, "alice", True),
        ({"contains": "lic"}, "bob", False),
        ({"one_of": ["bob", "alice"]}, "alice", True),
        ({"one_of": ["bob", "alice"]}, "carol", False),
        ({"regex": "a[a-z]+e"}, "alice", True),
        ({"regex": "abc"}, "abc", True),
        ({"regex": "abc"}, "xabcx", False),  # full match, not search
        ({"regex": "abc"}, "abcx", False),
        ({"regex": "abc"}, "xabc", False),
        ({"regex": "a|b"}, "ab", False),  # alternation is anchored as a whole
        ({"present": True}, "", True),
        ({"present": True}, "anything", True),
        ({"present": False}, "anything", False),
    ],
)
def test_header_string_kinds(test: dict[str, Any], value: str, expected: bool) -> None:
    matcher = parse({"header": {"name": "x-user", **test}})
    assert matcher.matches(user(value)) is expected


@pytest.mark.parametrize(
    ("test", "expected"),
    [
        ({"exact": "alice"}, False),
        ({"prefix": ""}, False),
        ({"regex": ".*"}, False),
        ({"one_of": ["alice"]}, False),
        ({"present": True}, False),
        ({"present": False}, True),
    ],
)
def test_absent_header(test: dict[str, Any], expected: bool) -> None:
    matcher = parse({"header": {"name": "x-user", **test}})
    assert matcher.matches(head(("x-other", "alice"))) is expected


@pytest.mark.parametrize(
    ("test", "value", "expected"),
    [
        ({"exact": "ALICE"}, "alice", True),
        ({"exact": "alice"}, "AlIcE", True),
        ({"prefix": "AL"}, "alice", True),
        ({"suffix": "ICE"}, "aLiCe", True),
        ({"contains": "LI"}, "alice", True),
        ({"one_of": ["BOB", "Alice"]}, "aLICE", True),
        ({"regex": "A[B-Z]+"}, "abc", True),
        ({"regex": "A[B-Z]+"}, "xabc", False),
        ({"exact": "ALICE"}, "alicia", False),
        ({"present": True}, "x", True),  # ignore_case is harmless on present
    ],
)
def test_ignore_case(test: dict[str, Any], value: str, expected: bool) -> None:
    matcher = parse({"header": {"name": "x-user", "ignore_case": True, **test}})
    assert matcher.matches(user(value)) is expected


def test_without_ignore_case_regex_is_case_sensitive() -> None:
    matcher = parse({"header": {"name": "x-user", "regex": "A[B-Z]+"}})
    assert not matcher.matches(user("abc"))
    assert matcher.matches(user("ABC"))


# --------------------------------------------------------------------------- invert


@pytest.mark.parametrize(
    ("test", "value", "expected"),
    [
        ({"exact": "alice"}, "alice", False),
        ({"exact": "alice"}, "bob", True),
        ({"prefix": "al"}, "bob", True),
        ({"regex": "abc"}, "xabcx", True),
        ({"present": True}, "x", False),
        ({"present": False}, "x", True),
    ],
)
def test_invert_negates(test: dict[str, Any], value: str, expected: bool) -> None:
    plain = parse({"header": {"name": "x-user", **test}})
    inverted = parse({"header": {"name": "x-user", "invert": True, **test}})
    assert inverted.matches(user(value)) is expected
    assert plain.matches(user(value)) is not expected


@pytest.mark.parametrize(
    ("test", "expected"),
    [({"exact": "alice"}, True), ({"regex": ".*"}, True), ({"present": True}, True), ({"present": False}, False)],
)
def test_invert_on_absent_header_negates(test: dict[str, Any], expected: bool) -> None:
    matcher = parse({"header": {"name": "x-user", "invert": True, **test}})
    assert matcher.matches(head()) is expected


def test_invert_false_is_the_default() -> None:
    matcher = parse({"header": {"name": "x-user", "exact": "alice", "invert": False}})
    assert matcher.matches(user("alice"))


# --------------------------------------------------------------------------- headers


def test_header_names_are_case_insensitive() -> None:
    matcher = parse({"header": {"name": "X-User", "exact": "alice"}})
    assert matcher.matches(head(("x-USER", "alice")))
    assert matcher.matches(head(("X-User", "alice")))
    # The value stays case-sensitive.
    assert not matcher.matches(head(("X-User", "ALICE")))


def test_repeated_header_lines_match_the_joined_value() -> None:
    h = head(("x-tag", "a"), ("X-Tag", "b"))
    assert h.headers["x-tag"] == "a, b"
    assert parse({"header": {"name": "x-tag", "exact": "a, b"}}).matches(h)
    assert not parse({"header": {"name": "x-tag", "exact": "a"}}).matches(h)
    assert not parse({"header": {"name": "x-tag", "exact": "b"}}).matches(h)
    assert parse({"header": {"name": "x-tag", "contains": "b"}}).matches(h)
    assert parse({"header": {"name": "x-tag", "regex": "a, b"}}).matches(h)
    assert not parse({"header": {"name": "x-tag", "regex": "a"}}).matches(h)


def test_header_with_empty_value_is_present() -> None:
    h = head(("x-user", ""))
    assert parse({"header": {"name": "x-user", "present": True}}).matches(h)
    assert parse({"header": {"name": "x-user", "exact": ""}}).matches(h)
    assert not parse({"header": {"name": "x-user", "present": False}}).matches(h)


# --------------------------------------------------------------------------- path


def test_path_ignores_query_by_default() -> None:
    h = head(target="/api/users?limit=10")
    assert parse({"path": {"prefix": "/api"}}).matches(h)
    assert parse({"path": {"exact": "/api/users"}}).matches(h)
    assert parse({"path": {"suffix": "/users"}}).matches(h)
    assert not parse({"path": {"suffix": "limit=10"}}).matches(h)
    assert not parse({"path": {"contains": "?"}}).matches(h)
    assert parse({"path": {"regex": "/api/[a-z]+"}}).matches(h)


def test_path_with_query_sees_the_whole_target() -> None:
    h = head(target="/api/users?limit=10")
    assert parse({"path": {"suffix": "limit=10", "with_query": True}}).matches(h)
    assert parse({"path": {"exact": "/api/users?limit=10", "with_query": True}}).matches(h)
    assert not parse({"path": {"exact": "/api/users", "with_query": True}}).matches(h)
    assert parse({"path": {"regex": r"/api/users\?limit=[0-9]+", "with_query": True}}).matches(h)
    # with_query on a target without a query is the same as the path.
    assert parse({"path": {"exact": "/api", "with_query": True}}).matches(head(target="/api"))


def test_path_string_is_exact() -> None:
    matcher = parse({"path": "/health"})
    assert matcher.matches(head(target="/health"))
    assert matcher.matches(head(target="/health?verbose=1"))
    assert not matcher.matches(head(target="/healthz"))


@pytest.mark.parametrize(
    ("test", "target", "expected"),
    [
        ({"prefix": "/API", "ignore_case": True}, "/api/x", True),
        ({"prefix": "/API"}, "/api/x", False),
        ({"one_of": ["/a", "/b"]}, "/b?x=1", True),
        ({"one_of": ["/a", "/b"]}, "/c", False),
        ({"prefix": "/admin", "invert": True}, "/api", True),
        ({"prefix": "/admin", "invert": True}, "/admin/x", False),
    ],
)
def test_path_options(test: dict[str, Any], target: str, expected: bool) -> None:
    assert parse({"path": test}).matches(head(target=target)) is expected


# --------------------------------------------------------------------------- method


def test_method_string() -> None:
    matcher = parse({"method": "POST"})
    assert matcher.matches(head(method="POST"))
    assert not matcher.matches(head(method="GET"))
    # Methods are case-sensitive tokens (RFC 9110 section 9.1).
    assert not matcher.matches(head(method="post"))


def test_method_list() -> None:
    matcher = parse({"method": ["PUT", "PATCH"]})
    assert matcher.matches(head(method="PUT"))
    assert matcher.matches(head(method="PATCH"))
    assert not matcher.matches(head(method="POST"))


def test_method_matcher_form() -> None:
    matcher = parse({"method": {"regex": "P.*"}})
    assert matcher.matches(head(method="POST"))
    assert matcher.matches(head(method="PUT"))
    assert not matcher.matches(head(method="GET"))
    folded = parse({"method": {"exact": "get", "ignore_case": True}})
    assert folded.matches(head(method="GET"))
    inverted = parse({"method": {"exact": "GET", "invert": True}})
    assert not inverted.matches(head(method="GET"))
    assert inverted.matches(head(method="DELETE"))


# --------------------------------------------------------------------------- baggage


def test_baggage_member() -> None:
    matcher = parse({"baggage": {"key": "tenant", "exact": "acme"}})
    assert matcher.matches(head(("baggage", "user=1, tenant=acme")))
    assert not matcher.matches(head(("baggage", "tenant=globex")))
    assert not matcher.matches(head(("baggage", "user=acme")))
    assert not matcher.matches(head())


def test_baggage_member_is_percent_decoded_and_joined_across_lines() -> None:
    matcher = parse({"baggage": {"key": "tenant", "exact": "acme corp"}})
    assert matcher.matches(head(("baggage", "tenant=acme%20corp")))
    assert matcher.matches(head(("baggage", "a=1"), ("baggage", "tenant=acme%20corp")))


def test_baggage_member_present_and_invert() -> None:
    present = parse({"baggage": {"key": "tenant", "present": True}})
    absent = parse({"baggage": {"key": "tenant", "present": False}})
    inverted = parse({"baggage": {"key": "tenant", "prefix": "ac", "invert": True}})
    with_member = head(("baggage", "tenant=acme"))
    without = head(("baggage", "other=1"))
    assert present.matches(with_member)
    assert not present.matches(without)
    assert absent.matches(without)
    assert not absent.matches(with_member)
    assert not inverted.matches(with_member)
    assert inverted.matches(without)


def test_baggage_key_is_case_sensitive_but_value_can_fold() -> None:
    assert not parse({"baggage": {"key": "Tenant", "exact": "acme"}}).matches(head(("baggage", "tenant=acme")))
    folded = parse({"baggage": {"key": "tenant", "exact": "ACME", "ignore_case": True}})
    assert folded.matches(head(("baggage", "tenant=acme")))


# --------------------------------------------------------------------------- trees


def test_all_of_any_of_not() -> None:
    spec = {
        "all_of": [
            {"path": {"prefix": "/api"}},
            {"any_of": [{"header": {"name": "x-user", "exact": "alice"}}, {"method": "DELETE"}]},
            {"not": {"header": {"name": "x-debug", "present": True}}},
        ]
    }
    matcher = parse(spec)
    assert matcher.matches(head(("x-user", "alice"), target="/api/a"))
    assert matcher.matches(head(target="/api/a", method="DELETE"))
    assert not matcher.matches(head(("x-user", "alice"), target="/web"))
    assert not matcher.matches(head(("x-user", "bob"), target="/api/a"))
    assert not matcher.matches(head(("x-user", "alice"), ("x-debug", "1"), target="/api/a"))


def test_double_not_is_identity() -> None:
    matcher = parse({"not": {"not": {"method": "GET"}}})
    assert matcher.matches(head(method="GET"))
    assert not matcher.matches(head(method="PUT"))


def test_single_child_lists() -> None:
    assert parse({"all_of": [{"method": "GET"}]}).matches(head(method="GET"))
    assert not parse({"any_of": [{"method": "GET"}]}).matches(head(method="PUT"))


# --------------------------------------------------------------------------- why_not


def test_why_not_is_none_when_matching() -> None:
    spec = {"all_of": [{"header": {"name": "x-user", "exact": "alice"}}, {"not": {"method": "DELETE"}}]}
    h = head(("x-user", "alice"))
    assert parse(spec).matches(h)
    assert parse(spec).why_not(h) is None


def test_why_not_names_the_failing_leaf() -> None:
    matcher = parse({"header": {"name": "X-User", "exact": "alice"}})
    reason = matcher.why_not(user("bob"))
    assert reason is not None
    assert "header x-user" in reason
    assert "'alice'" in reason
    assert "'bob'" in reason
    absent = matcher.why_not(head())
    assert absent is not None
    assert "absent" in absent


def test_why_not_in_all_of_names_the_failing_child() -> None:
    matcher = parse(
        {"all_of": [{"path": {"prefix": "/api"}}, {"method": "POST"}, {"header": {"name": "x-a", "present": True}}]}
    )
    reason = matcher.why_not(head(("x-a", "1"), target="/api/x", method="GET"))
    assert reason is not None
    assert "method" in reason
    assert "'POST'" in reason
    assert "'GET'" in reason
    assert "path" not in reason


def test_why_not_for_inverted_leaf_says_not() -> None:
    reason = parse({"path": {"prefix": "/admin", "invert": True}}).why_not(head(target="/admin/users"))
    assert reason is not None
    assert "path" in reason
    assert "not prefix '/admin'" in reason


def test_why_not_any_of_lists_every_child() -> None:
    matcher = parse({"any_of": [{"method": "PUT"}, {"header": {"name": "x-user", "exact": "alice"}}]})
    reason = matcher.why_not(user("bob"))
    assert reason is not None
    assert reason.startswith("none of:")
    assert "'PUT'" in reason
    assert "header x-user" in reason
    assert matcher.why_not(head(method="PUT")) is None


def test_why_not_for_not() -> None:
    matcher = parse({"not": {"method": "DELETE"}})
    reason = matcher.why_not(head(method="DELETE"))
    assert reason is not None
    assert "not" in reason
    assert "DELETE" in reason
    assert matcher.why_not(head(method="GET")) is None


def test_why_not_for_mirrord_header_filter() -> None:
    matcher = parse({"http_filter": {"header_filter": "x-user: alice"}})
    reason = matcher.why_not(user("bob"))
    assert reason is not None
    assert "x-user: alice" in reason
    assert matcher.why_not(user("alice")) is None


# --------------------------------------------------------------------------- to_spec

ROUND_TRIP_SPECS: list[Any] = [
    {"header": {"name": "X-User", "exact": "alice"}},
    {"header": {"name": "x-user", "prefix": "AL", "ignore_case": True, "invert": True}},
    {"header": {"name": "x-user", "present": False}},
    {"header": {"name": "x-user", "present": True, "ignore_case": True}},
    {"header": {"name": "x-user", "one_of": ["carol", "alice", "bob"]}},
    {"path": "/health"},
    {"path": {"regex": "/api/v[0-9]+/.*", "with_query": True}},
    {"path": {"suffix": ".json", "invert": True}},
    {"method": "GET"},
    {"method": ["PUT", "POST"]},
    {"method": {"regex": "P.*"}},
    {"baggage": {"key": "tenant", "contains": "acme", "ignore_case": True}},
    {"all_of": [{"method": "GET"}, {"any_of": [{"path": {"prefix": "/a"}}, {"not": {"path": {"prefix": "/b"}}}]}]},
    {"http_filter": {"header_filter": "^x-user: (alice|bob)$"}},
    {"http_filter": {"path_filter": "/api", "ports": [80]}},
    {"http_filter": {"method_filter": ["get", "post"]}},
    {"http_filter": {"any_of": [{"header": "x-a: 1"}, {"path": "^/v2"}, {"method": "delete"}]}},
]

ROUND_TRIP_HEADS = [
    head(),
    head(("X-User", "alice"), target="/api/v1/users?x=1"),
    head(("x-user", "ALICE"), target="/health", method="POST"),
    head(("x-user", "bob"), ("baggage", "tenant=ACME-corp"), target="/b/x.json", method="PUT"),
    head(("x-user", "carol"), ("x-a", "1"), target="/v2/API/x", method="DELETE"),
    head(("baggage", "tenant=other"), target="/a", method="GET"),
]


@pytest.mark.parametrize("spec", ROUND_TRIP_SPECS)
def test_to_spec_round_trips(spec: Any) -> None:
    first = parse(spec)
    canonical = first.to_spec()
    second = parse(canonical)
    assert second.to_spec() == canonical
    for h in ROUND_TRIP_HEADS:
        assert second.matches(h) is first.matches(h)
        assert (second.why_not(h) is None) is first.matches(h)


def test_round_trip_specs_are_not_trivial() -> None:
    """Every round-trip spec both matches and misses some head, so the check has teeth."""
    for spec in ROUND_TRIP_SPECS:
        results = {parse(spec).matches(h) for h in ROUND_TRIP_HEADS}
        assert results == {True, False}, spec


def test_to_spec_canonical_forms() -> None:
    assert parse({"path": "/x"}).to_spec() == {"path": {"exact": "/x"}}
    assert parse({"method": ["PUT", "GET"]}).to_spec() == {"method": {"one_of": ["GET", "PUT"]}}
    assert parse({"header": {"name": "X-User", "exact": "a", "invert": True}}).to_spec() == {
        "header": {"name": "x-user", "exact": "a", "invert": True}
    }
    assert parse({"path": {"prefix": "/a", "with_query": True}}).to_spec() == {
        "path": {"prefix": "/a", "with_query": True}
    }


@settings(max_examples=60, deadline=None)
@given(
    value=st.text(alphabet="abAB-, ", max_size=6),
    literal=st.text(alphabet="abAB", min_size=1, max_size=3),
    kind=st.sampled_from(["exact", "prefix", "suffix", "contains"]),
    ignore_case=st.booleans(),
)
def test_string_kinds_agree_with_python(value: str, literal: str, kind: str, ignore_case: bool) -> None:
    matcher = parse({"header": {"name": "x-v", kind: literal, "ignore_case": ignore_case}})
    inverted = parse({"header": {"name": "x-v", kind: literal, "ignore_case": ignore_case, "invert": True}})
    s, lit = (value.lower(), literal.lower()) if ignore_case else (value, literal)
    expected = {
        "exact": s == lit,
        "prefix": s.startswith(lit),
        "suffix": s.endswith(lit),
        "contains": lit in s,
    }[kind]
    h = head(("x-v", value))
    assert matcher.matches(h) is expected
    assert inverted.matches(h) is not expected
    assert parse(matcher.to_spec()).matches(h) is expected


# --------------------------------------------------------------------------- mirrord http_filter


def test_mirrord_header_filter_is_unanchored_and_case_insensitive() -> None:
    matcher = parse({"http_filter": {"header_filter": "x-user: ali"}})
    assert matcher.matches(head(("X-User", "alice")))
    assert matcher.matches(head(("x-user", "ALICE")))
    assert matcher.matches(head(("x-other", "1"), ("x-user", "alice-smith")))
    assert matcher.matches(head(("my-x-user", "alice")))  # unanchored at the start too
    assert not matcher.matches(head(("x-user", "bob")))
    assert not matcher.matches(head(("x-username", "alice")))  # "x-username: alice" lacks "x-user: "
    assert not matcher.matches(head())


def test_mirrord_header_filter_can_anchor() -> None:
    matcher = parse({"http_filter": {"header_filter": "^x-user: alice$"}})
    assert matcher.matches(head(("x-user", "alice")))
    assert not matcher.matches(head(("x-user", "alice2")))
    assert not matcher.matches(head(("y-x-user", "alice")))


def test_mirrord_path_filter_is_unanchored() -> None:
    matcher = parse({"http_filter": {"path_filter": "/api/v[0-9]"}})
    assert matcher.matches(head(target="/api/v1/users"))
    assert matcher.matches(head(target="/prefix/api/v2"))
    assert not matcher.matches(head(target="/api/vx"))
    anchored = parse({"http_filter": {"path_filter": "^/api$"}})
    assert anchored.matches(head(target="/api"))
    assert not anchored.matches(head(target="/api/x"))


def test_mirrord_path_filter_alternation_stays_grouped() -> None:
    matcher = parse({"http_filter": {"path_filter": "^/a$|^/b$"}})
    assert matcher.matches(head(target="/a"))
    assert matcher.matches(head(target="/b"))
    assert not matcher.matches(head(target="/c/a"))


@pytest.mark.parametrize("methods", ["get", "GET", ["Get"], ["post", "get"]])
def test_mirrord_method_filter(methods: Any) -> None:
    matcher = parse({"http_filter": {"method_filter": methods}})
    assert matcher.matches(head(method="GET"))
    assert not matcher.matches(head(method="DELETE"))


def test_mirrord_all_of_and_any_of() -> None:
    all_of = parse({"http_filter": {"all_of": [{"header": "x-user: alice"}, {"path": "^/api"}, {"method": "post"}]}})
    assert all_of.matches(head(("x-user", "alice"), target="/api/x", method="POST"))
    assert not all_of.matches(head(("x-user", "alice"), target="/api/x", method="GET"))
    assert not all_of.matches(head(("x-user", "bob"), target="/api/x", method="POST"))
    assert not all_of.matches(head(("x-user", "alice"), target="/web", method="POST"))
    any_of = parse({"http_filter": {"any_of": [{"header": "x-user: alice"}, {"path": "^/api"}]}})
    assert any_of.matches(head(("x-user", "alice"), target="/web"))
    assert any_of.matches(head(target="/api"))
    assert not any_of.matches(head(("x-user", "bob"), target="/web"))


def test_mirrord_ports_are_accepted_and_ignored() -> None:
    with_ports = parse({"http_filter": {"header_filter": "x-user: alice", "ports": [80, 8080]}})
    without = parse({"http_filter": {"header_filter": "x-user: alice"}})
    for h in (user("alice"), user("bob")):
        assert with_ports.matches(h) is without.matches(h)
    assert with_ports.matches(user("alice"))


@pytest.mark.parametrize(
    "spec",
    [
        {"path": {"regex": "^(?!/health)"}},
        {"header": {"name": "x-user", "regex": "(?=a)a"}},
        {"path": {"regex": "(?<!x)/api"}},
        {"http_filter": {"path_filter": "^(?!/health)"}},
        {"http_filter": {"header_filter": "^(?!x-user)"}},
    ],
)
def test_look_around_is_refused_with_a_hint(spec: Any) -> None:
    problems = refuse(spec)
    assert len(problems) == 1
    reason = problems[0].reason
    assert "RE2" in reason
    assert "'not'" in reason


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({"cookie": {"name": "a", "exact": "b"}}, WHERE, "unknown matcher 'cookie'"),
        ({"all_of": [{"method": "GET"}, {"query": "x"}]}, WHERE + ".all_of[1]", "unknown matcher 'query'"),
        ({"header": {"name": "x", "exact": "a"}, "path": "/x"}, WHERE, "exactly one of"),
        ({}, WHERE, "exactly one of"),
        ("GET", WHERE, "exactly one of"),
        ({"header": {"name": "x", "exact": "a", "prefix": "b"}}, WHERE + ".header", "exactly one of"),
        ({"header": {"name": "x"}}, WHERE + ".header", "exactly one of"),
        ({"all_of": []}, WHERE + ".all_of", "non-empty list"),
        ({"any_of": []}, WHERE + ".any_of", "non-empty list"),
        ({"any_of": {"method": "GET"}}, WHERE + ".any_of", "non-empty list"),
        ({"not": {}}, WHERE + ".not", "exactly one of"),
        (
            {"all_of": [{"method": "GET"}, {"header": {"name": "x", "regex": "a("}}]},
            WHERE + ".all_of[1].header.regex",
            "invalid RE2 regex",
        ),
        ({"path": {"regex": "[z-a]"}}, WHERE + ".path.regex", "invalid RE2 regex"),
        ({"header": {"name": "x", "exact": "a", "invert": "yes"}}, WHERE + ".header.invert", "true or false"),
        ({"header": {"name": "x", "exact": "a", "invert": 1}}, WHERE + ".header.invert", "true or false"),
        ({"header": {"name": "x", "exact": "a", "ignore_case": "no"}}, WHERE + ".header.ignore_case", "true or false"),
        ({"path": {"present": True}}, WHERE + ".path.present", "not meaningful"),
        ({"method": {"present": True}}, WHERE + ".method.present", "not meaningful"),
        ({"header": {"name": "x", "present": "yes"}}, WHERE + ".header.present", "true or false"),
        ({"path": {"prefix": "/a", "with_query": "yes"}}, WHERE + ".path.with_query", "true or false"),
        ({"header": {"name": "x", "exact": "a", "colour": "red"}}, WHERE + ".header", "unknown field(s): colour"),
        ({"path": {"prefix": "/a", "name": "x"}}, WHERE + ".path", "unknown field(s): name"),
        ({"header": {"name": "x y", "exact": "a"}}, WHERE + ".header.name", "header name"),
        ({"header": {"exact": "a"}}, WHERE + ".header.name", "header name"),
        ({"header": {"name": "", "exact": "a"}}, WHERE + ".header.name", "header name"),
        ({"header": "x-user"}, WHERE + ".header", "mapping"),
        ({"baggage": {"key": "a=b", "exact": "a"}}, WHERE + ".baggage.key", "baggage key"),
        ({"header": {"name": "x", "exact": 5}}, WHERE + ".header.exact", "must be a string"),
        ({"header": {"name": "x", "one_of": []}}, WHERE + ".header.one_of", "non-empty list of strings"),
        ({"header": {"name": "x", "one_of": ["a", 1]}}, WHERE + ".header.one_of", "non-empty list of strings"),
        ({"header": {"name": "x", "one_of": "a"}}, WHERE + ".header.one_of", "non-empty list of strings"),
        ({"method": 5}, WHERE + ".method", "method"),
        ({"method": []}, WHERE + ".method.one_of", "non-empty list"),
        ({"http_filter": {"header_filter": "a", "path_filter": "b"}}, WHERE + ".http_filter", "exactly one of"),
        ({"http_filter": {"ports": [80]}}, WHERE + ".http_filter", "exactly one of"),
        ({"http_filter": {"query_filter": "a"}}, WHERE + ".http_filter", "exactly one of"),
        ({"http_filter": {"header_filter": "a("}}, WHERE + ".http_filter.header_filter", "invalid RE2 regex"),
        ({"http_filter": {"path_filter": ""}}, WHERE + ".http_filter.path_filter", "non-empty regex"),
        ({"http_filter": {"method_filter": []}}, WHERE + ".http_filter.method_filter", "method"),
        ({"http_filter": {"all_of": []}}, WHERE + ".http_filter.all_of", "non-empty list"),
        ({"http_filter": {"all_of": [{"cookie": "a"}]}}, WHERE + ".http_filter.all_of[0]", "must be one of"),
        (
            {"http_filter": {"any_of": [{"header": "a"}, {"path": "b("}]}},
            WHERE + ".http_filter.any_of[1].path",
            "invalid RE2 regex",
        ),
    ],
)
def test_validation_problem_names_the_field(spec: Any, field: str, reason: str) -> None:
    problems = refuse(spec)
    assert fields(problems) == [field]
    assert reason in problems[0].reason


def test_invalid_regex_message_includes_re2_reason() -> None:
    problems = refuse({"header": {"name": "x", "regex": "a("}})
    assert problems[0].reason.startswith("invalid RE2 regex: ")
    assert "missing )" in problems[0].reason


@pytest.mark.parametrize("spec", [{"header": {"name": "x", "regex": "a\ud800"}},
                                  {"http_filter": {"path_filter": "\udfff"}}])
def test_a_regex_with_a_lone_surrogate_is_refused(spec: Any) -> None:
    # JSON's "\ud800" decodes to a lone surrogate, which re2 (UTF-8) cannot take: it raised
    # UnicodeEncodeError (a 500 from the control plane's API; the controlplane_json fuzz target).
    problems = refuse(spec)
    assert len(problems) == 1 and "lone surrogate" in problems[0].reason


def test_regex_longer_than_the_limit() -> None:
    limits = MatchLimits(max_regex_chars=10)
    assert parse({"path": {"regex": "a" * 10}}, limits).matches(head(target="a" * 10))
    problems = refuse({"path": {"regex": "a" * 11}}, limits)
    assert fields(problems) == [WHERE + ".path.regex"]
    assert "longer than 10" in problems[0].reason


def test_regex_program_size_limit() -> None:
    limits = MatchLimits(max_regex_program_size=50)
    parse({"path": {"regex": "a{10}"}}, limits)
    problems = refuse({"path": {"regex": "a{100}"}}, limits)
    assert fields(problems) == [WHERE + ".path.regex"]
    assert "program size" in problems[0].reason
    assert "exceeds 50" in problems[0].reason


def test_mirrord_regexes_obey_the_limits() -> None:
    limits = MatchLimits(max_regex_program_size=50)
    problems = refuse({"http_filter": {"header_filter": "a{100}"}}, limits)
    assert fields(problems) == [WHERE + ".http_filter.header_filter"]
    assert "program size" in problems[0].reason
    problems = refuse({"http_filter": {"path_filter": "a" * 20}}, MatchLimits(max_regex_chars=10))
    assert fields(problems) == [WHERE + ".http_filter.path_filter"]


def test_literal_longer_than_the_limit() -> None:
    limits = MatchLimits(max_literal_chars=4)
    parse({"header": {"name": "x", "exact": "abcd"}}, limits)
    problems = refuse({"header": {"name": "x", "exact": "abcde"}}, limits)
    assert fields(problems) == [WHERE + ".header.exact"]
    problems = refuse({"header": {"name": "x", "one_of": ["a", "abcde"]}}, limits)
    assert fields(problems) == [WHERE + ".header.one_of"]


def test_node_limit() -> None:
    limits = MatchLimits(max_nodes=3)
    # all_of + 2 leaves = 3 nodes: at the limit.
    parse({"all_of": [{"method": "GET"}, {"path": "/a"}]}, limits)
    spec = {"all_of": [{"method": "GET"}, {"path": "/a"}, {"path": "/b"}, {"path": "/c"}]}
    problems = refuse(spec, limits)
    assert len(problems) == 1  # reported once, not once per extra node
    assert problems[0].field == WHERE + ".all_of[2]"
    assert "more than 3 nodes" in problems[0].reason


def test_node_limit_counts_nested_nodes() -> None:
    spec: Any = {"method": "GET"}
    for _ in range(5):
        spec = {"not": spec}
    parse(spec, MatchLimits(max_nodes=6))
    problems = refuse(spec, MatchLimits(max_nodes=5))
    assert len(problems) == 1
    assert "more than 5 nodes" in problems[0].reason
    assert problems[0].field == WHERE + ".not" * 5


def test_every_problem_is_reported() -> None:
    spec = {
        "all_of": [
            {"header": {"name": "x", "regex": "a("}},
            {"method": "GET"},
            {"path": {"present": True}},
            {"any_of": [{"baggage": {"key": "k", "exact": "v", "invert": "no"}}, {"nope": 1}]},
        ]
    }
    problems = refuse(spec)
    assert fields(problems) == [
        WHERE + ".all_of[0].header.regex",
        WHERE + ".all_of[2].path.present",
        WHERE + ".all_of[3].any_of[0].baggage.invert",
        WHERE + ".all_of[3].any_of[1]",
    ]


def test_problems_are_appended_to_the_callers_list() -> None:
    earlier = Problem("other", "earlier problem")
    problems = [earlier]
    assert parse_match({"method": "GET"}, WHERE, problems) is not None
    assert problems == [earlier]
    assert parse_match({"nope": 1}, "x.y", problems) is None
    assert problems[0] is earlier
    assert fields(problems) == ["other", "x.y"]


# --------------------------------------------------------------------------- linear time


def test_catastrophic_backtracking_pattern_is_linear() -> None:
    """``(a+)+$`` backtracks exponentially in Python's re; RE2 is linear in the input."""
    header = parse({"header": {"name": "x-v", "regex": "(a+)+$"}})
    path = parse({"path": {"regex": "(a+)+$"}})
    mirrord = parse({"http_filter": {"path_filter": "(a+)+$"}})
    subject = "a" * 50000 + "b"
    started = time.monotonic()
    results = [
        header.matches(head(("x-v", subject))),
        path.matches(head(target=subject)),
        mirrord.matches(head(target=subject)),
        header.matches(head(("x-v", "a" * 50000))),
    ]
    elapsed = time.monotonic() - started
    assert results == [False, False, False, True]
    assert elapsed < 5.0, f"matching took {elapsed:.1f} s: the regex engine backtracks"
