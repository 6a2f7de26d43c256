"""Unit tests for controlplane.overlap: what counts as no filter, and which filters provably never meet.

Every "disjoint" answer is checked against the proxies' own matching: no probe request may
match both filters the analysis calls disjoint.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from controlplane.overlap import disjoint, unfiltered
from filters import Matcher, Problem, RequestHead, parse_match


def match(spec: dict[str, Any]) -> Matcher:
    problems: list[Problem] = []
    node = parse_match(spec, "match", problems)
    assert node is not None, problems
    return node


# Requests that exercise the subjects the filters below read.
REQUESTS = [RequestHead(method, path, headers) for method, path, headers in itertools.product(
    ("GET", "POST"), ("/", "/api/users", "/apiv2", "/static/x.js"),
    ({}, {"x-user": "bob"}, {"x-user": "BOB"}, {"x-user": "carol"}, {"x-user": "bob", "x-team": "a"},
     {"baggage": "tenant=acme"}))]

DISJOINT = [
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-user", "exact": "carol"}}),
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-user", "present": False}}),
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-user", "exact": "bob", "invert": True}}),
    ({"header": {"name": "x-user", "exact": "bob"}}, {"not": {"header": {"name": "x-user", "present": True}}}),
    ({"header": {"name": "x-user", "one_of": ["a", "b"]}}, {"header": {"name": "x-user", "one_of": ["c", "d"]}}),
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-user", "regex": "c.*"}}),
    ({"path": {"prefix": "/api/"}}, {"path": {"prefix": "/static/"}}),
    ({"path": {"suffix": ".js"}}, {"path": {"suffix": ".css"}}),
    ({"header": {"name": "x-user", "exact": "bob", "ignore_case": True}},
     {"header": {"name": "x-user", "prefix": "CA", "ignore_case": True}}),
    ({"any_of": [{"header": {"name": "x-user", "exact": "a"}}, {"header": {"name": "x-user", "exact": "b"}}]},
     {"header": {"name": "x-user", "exact": "c"}}),
    ({"all_of": [{"path": {"prefix": "/api"}}, {"header": {"name": "x-user", "exact": "bob"}}]},
     {"header": {"name": "x-user", "exact": "carol"}}),
    ({"method": "GET"}, {"method": "POST"}),
]

OVERLAPPING = [
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-user", "present": True}}),
    ({"header": {"name": "x-user", "exact": "bob"}}, {"header": {"name": "x-team", "exact": "a"}}),
    ({"header": {"name": "x-user", "exact": "bob", "ignore_case": True}},
     {"header": {"name": "x-user", "exact": "BOB"}}),
    ({"path": {"prefix": "/api"}}, {"path": {"prefix": "/api/users"}}),
    ({"header": {"name": "x-user", "regex": "b.*"}}, {"header": {"name": "x-user", "regex": ".*b"}}),
    ({"not": {"header": {"name": "x-user", "exact": "bob"}}}, {"header": {"name": "x-user", "present": True}}),
    ({"http_filter": {"header_filter": "x-user: bob"}}, {"header": {"name": "x-user", "exact": "bob"}}),
]


@pytest.mark.parametrize(("a", "b"), DISJOINT)
def test_disjoint_filters_are_proven_and_really_are(a: dict[str, Any], b: dict[str, Any]) -> None:
    left, right = match(a), match(b)
    assert disjoint(left, right) and disjoint(right, left)
    assert not [r for r in REQUESTS if left.matches(r) and right.matches(r)]


@pytest.mark.parametrize(("a", "b"), OVERLAPPING)
def test_filters_that_can_meet_are_never_called_disjoint(a: dict[str, Any], b: dict[str, Any]) -> None:
    left, right = match(a), match(b)
    assert not disjoint(left, right) and not disjoint(right, left)


def test_no_match_overlaps_everything_that_can_match() -> None:
    bob = match({"header": {"name": "x-user", "exact": "bob"}})
    never = match({"all_of": [{"header": {"name": "x", "exact": "1"}}, {"header": {"name": "x", "exact": "2"}}]})
    assert not disjoint(None, bob) and not disjoint(bob, None) and not disjoint(None, None)
    assert disjoint(None, never) and disjoint(never, bob)


def test_unfiltered() -> None:
    assert unfiltered(None)
    assert unfiltered(match({"path": {"prefix": "/"}}))
    assert unfiltered(match({"path": {"regex": ".*"}}))
    assert not unfiltered(match({"header": {"name": "x-user", "exact": "bob"}}))
    assert not unfiltered(match({"path": {"prefix": "/api"}}))
