"""Unit tests for controlplane.policy: each rule refuses with its own name; defaults; the file format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import PolicyRefused
from controlplane.policy import Policy, load_policy, parse_policy
from filters import MatchLimits, RuleLimits, Session, ValidationError, parse_session

NOW = 1_800_000_000.0


def session(key: str | None = "k1", owner: str = "alice", ttl_s: float = 3600, **route: Any) -> Session:
    spec: dict[str, Any] = {"id": "s1", "owner": owner, "ttl_s": ttl_s,
                            "routes": [{"service": "users", "destination": "10.0.0.5:8080", **route}]}
    if key is not None:
        spec["key"] = key
    return parse_session(spec, now=NOW)


def refused_by(policy: Policy, s: Session, total: int = 0, owned: int = 0) -> PolicyRefused:
    with pytest.raises(PolicyRefused) as info:
        policy.check_create(s, NOW, total, owned)
    return info.value


def test_defaults() -> None:
    policy = parse_policy({})
    assert policy == Policy()
    assert policy.default_ttl_s == 7200 and policy.forbid_unfiltered_steal and not policy.require_owner
    assert policy.limits == RuleLimits()
    policy.check_create(session(owner="", ttl_s=10 * 86400, destination="203.0.113.9:80"), NOW, 10**4, 10**4)
    policy.check_extend(None, NOW)


def test_an_empty_policy_file_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("# nothing yet\n")
    assert load_policy(path) == Policy()


def test_forbid_unfiltered_steal() -> None:
    policy = Policy()
    err = refused_by(policy, session(key=None))
    assert err.policy == "forbid_unfiltered_steal"
    assert "'users'" in err.message and "give the session a key" in err.message
    # A key, a match, or mirror mode each make it acceptable; so does turning the rule off.
    policy.check_create(session(key="k"), NOW, 0, 0)
    policy.check_create(session(key=None, match={"header": {"name": "x-user", "exact": "a"}}), NOW, 0, 0)
    policy.check_create(session(key=None, mode="mirror"), NOW, 0, 0)
    parse_policy({"forbid_unfiltered_steal": False}).check_create(session(key=None), NOW, 0, 0)


def test_max_ttl_s_caps_create_and_extend() -> None:
    policy = parse_policy({"max_ttl_s": 3600, "default_ttl_s": 1800})
    policy.check_create(session(ttl_s=3600), NOW, 0, 0)
    err = refused_by(policy, session(ttl_s=3601))
    assert err.policy == "max_ttl_s" and "1h" in err.message and "shorter" in err.message
    policy.check_extend(NOW + 3600, NOW)
    with pytest.raises(PolicyRefused) as info:
        policy.check_extend(NOW + 7200, NOW)
    assert info.value.policy == "max_ttl_s" and "2h" in info.value.message
    with pytest.raises(PolicyRefused, match="must expire"):
        policy.check_extend(None, NOW)


def test_allowed_services() -> None:
    policy = parse_policy({"allowed_services": ["users", "orders-*"]})
    policy.check_create(session(), NOW, 0, 0)
    spec = {"id": "s", "key": "k", "expires_at": NOW + 60, "routes": [
        {"service": "orders-eu", "destination": "10.0.0.1:80"}, {"service": "payments", "destination": "10.0.0.1:80"}]}
    err = refused_by(policy, parse_session(spec))
    assert err.policy == "allowed_services" and "'payments'" in err.message and "orders-*" in err.message


@pytest.mark.parametrize(("destination", "allowed"), [
    ("10.1.2.3:8080", True),
    ("[fd00::5]:80", True),
    ("api.team.sandbox.svc.cluster.local:80", True),
    ("API.Team.Sandbox.svc.cluster.local.:80", True),
    ("192.168.1.1:80", False),
    ("[::ffff:192.168.1.1]:80", False),
    ("[::ffff:10.0.0.1]:80", True),
    ("users.default.svc.cluster.local:80", False),
    ("sandbox.svc.cluster.local.evil.com:80", False),
    ("010.0.0.1:80", False),
    ("167772161:80", False),
])
def test_allowed_destinations(destination: str, allowed: bool) -> None:
    policy = parse_policy({"allowed_destinations": ["10.0.0.0/8", "fd00::/8", "*.sandbox.svc.cluster.local"]})
    s = session(destination=destination)
    if allowed:
        policy.check_create(s, NOW, 0, 0)
    else:
        err = refused_by(policy, s)
        assert err.policy == "allowed_destinations" and "10.0.0.0/8" in err.message


def test_max_sessions_and_per_owner() -> None:
    policy = parse_policy({"max_sessions": 10, "max_sessions_per_owner": 2})
    policy.check_create(session(), NOW, 9, 1)
    assert refused_by(policy, session(), total=10, owned=0).policy == "max_sessions"
    err = refused_by(policy, session(owner="bob"), total=3, owned=2)
    assert err.policy == "max_sessions_per_owner" and "'bob'" in err.message


def test_require_owner() -> None:
    policy = parse_policy({"require_owner": True})
    policy.check_create(session(owner="alice"), NOW, 0, 0)
    err = refused_by(policy, session(owner=""))
    assert err.policy == "require_owner" and "--owner" in err.message


def test_limits_tighten_filters_limits() -> None:
    policy = parse_policy({"limits": {"max_routes_per_session": 2, "max_labels": 1, "max_regex_chars": 10,
                                      "max_regex_program_size": 50, "max_literal_chars": 8, "max_match_nodes": 3}})
    assert policy.limits.max_routes_per_session == 2 and policy.limits.max_labels == 1
    assert policy.limits.match == MatchLimits(max_regex_chars=10, max_regex_program_size=50, max_literal_chars=8,
                                              max_nodes=3)
    assert policy.limits.max_sessions == RuleLimits().max_sessions
    spec = {"id": "s", "key": "k", "labels": {"a": "1", "b": "2"}, "routes": [
        {"service": f"svc{i}", "destination": "10.0.0.1:80"} for i in range(3)]}
    with pytest.raises(ValidationError) as info:
        parse_session(spec, limits=policy.limits)
    fields = {p.field for p in info.value.problems}
    assert fields == {"session.labels", "session.routes"}
    match = {"all_of": [{"header": {"name": "x", "regex": "a{1,100}b"}}, {"path": {"exact": "/0123456789"}},
                        {"method": "GET"}]}
    with pytest.raises(ValidationError) as info:
        parse_session({"id": "s", "routes": [{"service": "u", "destination": "10.0.0.1:80", "match": match}]},
                      limits=policy.limits)
    reasons = " ".join(p.reason for p in info.value.problems)
    assert "more than 3 nodes" in reasons


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"max_ttl": 60}, "policy.max_ttl", "unknown policy field"),
    ({"limits": {"max_regexes": 1}}, "policy.limits.max_regexes", "unknown limit"),
    ({"limits": {"max_regex_chars": 5000}}, "policy.limits.max_regex_chars", "from 1 to 1000"),
    ({"limits": {"max_match_nodes": 0}}, "policy.limits.max_match_nodes", "from 1 to 64"),
    ({"limits": []}, "policy.limits", "mapping"),
    ({"max_sessions": -1}, "policy.max_sessions", "whole number"),
    ({"max_sessions_per_owner": True}, "policy.max_sessions_per_owner", "whole number"),
    ({"max_ttl_s": "2h"}, "policy.max_ttl_s", "positive number of seconds"),
    ({"default_ttl_s": 0}, "policy.default_ttl_s", "positive number of seconds"),
    ({"max_ttl_s": 60}, "policy.default_ttl_s", "longer than max_ttl_s"),
    ({"require_owner": "yes"}, "policy.require_owner", "true or false"),
    ({"allowed_services": "users"}, "policy.allowed_services", "list"),
    ({"allowed_destinations": ["10.0.0.1/8"]}, "policy.allowed_destinations[0]", "not a valid CIDR"),
    ({"allowed_destinations": ["10.*"]}, "policy.allowed_destinations[0]", "write a CIDR"),
    ({"allowed_destinations": ["host name"]}, "policy.allowed_destinations[0]", "neither a CIDR"),
])
def test_invalid_policy_names_the_field(data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_policy(data)
    assert any(p.field == field and reason in p.reason for p in info.value.problems), info.value.problems


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        parse_policy({"bogus": 1, "max_sessions": 0, "require_owner": 1})
    assert {p.field for p in info.value.problems} == {"policy.bogus", "policy.max_sessions", "policy.require_owner"}


def test_load_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_sessions: [\n")
    with pytest.raises(ValidationError, match="invalid YAML"):
        load_policy(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValidationError, match="mapping"):
        load_policy(bad)
