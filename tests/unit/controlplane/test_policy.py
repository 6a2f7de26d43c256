"""Unit tests for controlplane.policy: each rule refuses with its own name; defaults; the file format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controlplane.errors import Conflict, PolicyRefused
from controlplane.policy import Policy, load_policy, parse_policy
from controlplane.store import StoredSession
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
    assert policy.default_ttl_s == 7200 and policy.defaults.forbid_unfiltered_steal and not policy.require_owner
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
    assert err.policy == "require_owner" and "needs an owner" in err.message


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
    # Found by the policy_file fuzz target: these raised TypeError and OverflowError instead.
    ({"modes": [["steal"]]}, "policy.modes", "must be a list of"),
    ({"groups": {"developers": {"modes": [{"steal": 1}]}}}, "policy.groups.developers.modes", "must be a list of"),
    ({"max_ttl_s": 10**400}, "policy.max_ttl_s", "positive number of seconds"),
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
    # What PyYAML or reading the file raise besides YAMLError (the policy_file fuzz target).
    for content, message in ((b"\xff\xfe", "not UTF-8"), (b"max_ttl_s: 2001-02-30\n", "invalid YAML"),
                             (b"max_ttl_s: !!timestamp x\n", "invalid YAML"), (b"[" * 600, "invalid YAML")):
        bad.write_bytes(content)
        with pytest.raises(ValidationError, match=message):
            load_policy(bad)


# ---------------------------------------------------------------------- per-group guardrails

GROUPS = {
    "max_sessions_per_owner": 2, "max_ttl_s": 28800,
    "groups": {
        "developers": {"allowed_services": ["users"], "allowed_destinations": ["10.0.0.0/8"], "max_priority": 10,
                       "max_ttl_s": 7200, "modes": ["steal", "mirror"], "max_sessions_per_owner": 3},
        "agents": {"allowed_services": ["orders"], "modes": ["mirror", "steal_without_key"], "max_priority": 50,
                   "allow_lower_priority_overlap": True},
        "platform": {},
    },
}


def named(sid: str, key: str | None = None, owner: str = "alice", priority: int = 0,
          match: dict[str, Any] | None = None, service: str = "users", mode: str = "steal") -> Session:
    route: dict[str, Any] = {"service": service, "destination": "10.0.0.5:8080", "priority": priority, "mode": mode}
    if match is not None:
        route["match"] = match
    spec: dict[str, Any] = {"id": sid, "owner": owner, "ttl_s": 600, "routes": [route]}
    if key is not None:
        spec["key"] = key
    return parse_session(spec, now=NOW)


@pytest.mark.parametrize(("groups", "s", "rule", "words"), [
    (["developers"], named("a", "k", service="orders"), "allowed_services", ["'orders'", "group developers"]),
    (["developers"], session(destination="192.168.1.1:80"), "allowed_destinations", ["192.168.1.1:80", "10.0.0.0/8"]),
    (["developers"], named("a", "k", priority=11), "max_priority", ["priority 11", "above 10", "developers"]),
    (["developers"], session(ttl_s=7201), "max_ttl_s", ["2h", "developers"]),
    (["developers"], named("a", None, match={"header": {"name": "x-user", "exact": "a"}}), "modes",
     ["steal_without_key", "give the session a key"]),
    (["agents"], named("a", "k", service="orders"), "modes", ["mode steal", "mirror, steal_without_key"]),
    ([], named("a", "k", priority=5, service="payments"), None, []),
])
def test_each_group_rule_refuses_naming_the_rule(groups: list[str], s: Session, rule: str | None,
                                                 words: list[str]) -> None:
    policy = parse_policy(GROUPS)
    if rule is None:
        policy.check_create(s, NOW, 0, 0, groups)  # the defaults: no service, priority or mode limit
        return
    with pytest.raises(PolicyRefused) as info:
        policy.check_create(s, NOW, 0, 0, groups)
    assert info.value.policy == rule
    for word in words:
        assert word in info.value.message, info.value.message


def test_a_groups_lower_max_ttl_cuts_its_default_ttl() -> None:
    policy = parse_policy({"default_ttl_s": 7200, "groups": {"interns": {"max_ttl_s": 600}}})
    assert policy.default_ttl_for(["interns"]) == 600 and policy.default_ttl_for([]) == 7200


def test_max_sessions_per_owner_follows_the_group() -> None:
    policy = parse_policy(GROUPS)
    policy.check_create(session(), NOW, 0, 2, ["developers"])
    assert refused_by_groups(policy, session(), 3, ["developers"]).policy == "max_sessions_per_owner"
    err = refused_by_groups(policy, session(), 2, [])
    assert err.policy == "max_sessions_per_owner" and "the policy's defaults" in err.message


def refused_by_groups(policy: Policy, s: Session, owned: int, groups: list[str]) -> PolicyRefused:
    with pytest.raises(PolicyRefused) as info:
        policy.check_create(s, NOW, 0, owned, groups)
    return info.value


def test_a_member_of_several_groups_gets_the_most_permissive_rule() -> None:
    policy = parse_policy(GROUPS)
    rules = policy.rules_for(["agents", "developers", "unknown-group"])
    assert set(rules.allowed_services or ()) == {"users", "orders"}
    assert rules.max_priority == 50 and rules.modes == frozenset({"steal", "mirror", "steal_without_key"})
    assert rules.max_ttl_s == 28800, "agents inherit the defaults' max_ttl_s, which is the larger"
    assert rules.allowed_destinations is None, "agents set none: any destination"
    assert rules.allow_lower_priority_overlap
    assert policy.rules_for(["platform"]).allowed_services is None
    assert policy.rules_for(["nobody"]) == policy.defaults
    policy.check_extend(NOW + 28800, NOW, ["developers", "agents"])
    with pytest.raises(PolicyRefused, match="group developers"):
        policy.check_extend(NOW + 7201, NOW, ["developers"])


@pytest.mark.parametrize("match", [
    {"path": {"prefix": "/"}},
    {"path": {"prefix": ""}},
    {"path": {"regex": "/.*"}},
    {"path": {"regex": "(abc)?"}},
    {"header": {"name": "x-user", "regex": ".*"}},
    {"any_of": [{"header": {"name": "x-user", "exact": "bob"}}, {"path": {"prefix": "/"}}]},
    {"not": {"all_of": [{"header": {"name": "x", "exact": "a"}}, {"header": {"name": "x", "exact": "b"}}]}},
    {"not": {"path": {"exact": ""}}},
    {"header": {"name": "x-never-sent", "present": False}},
    {"header": {"name": "x-user", "exact": "zzz", "invert": True}},
    {"method": ["GET", "POST"]},
    {"header": {"name": "host", "present": True}},
    {"any_of": [{"header": {"name": "x", "present": True}}, {"header": {"name": "x", "present": False}}]},
    {"http_filter": {"header_filter": ".*"}},
])
def test_catch_all_filters_count_as_unfiltered(match: dict[str, Any]) -> None:
    err = refused_by(Policy(), session(key=None, match=match))
    assert err.policy == "forbid_unfiltered_steal" and "every request" in err.message


@pytest.mark.parametrize("match", [
    {"header": {"name": "x-user", "exact": "bob"}},
    {"header": {"name": "x-user", "present": True}},
    {"path": {"prefix": "/api"}},
    {"all_of": [{"path": {"prefix": "/"}}, {"header": {"name": "x-user", "exact": "bob"}}]},
    {"baggage": {"key": "tenant", "exact": "acme"}},
])
def test_real_filters_are_not_unfiltered(match: dict[str, Any]) -> None:
    Policy().check_create(session(key=None, match=match), NOW, 0, 0)


def stored(s: Session, group: str | None = None) -> StoredSession:
    return StoredSession(s, 1, group)


def test_overlap_with_another_owners_filter_is_a_conflict_naming_both() -> None:
    alice = stored(named("alice-bob", None, owner="alice", match={"header": {"name": "x-user", "exact": "bob"}}))
    grab = named("grab", None, owner="mallory", priority=1_000_000,
                 match={"header": {"name": "x-user", "present": True}})
    with pytest.raises(Conflict) as info:
        Policy().check_overlap(grab, None, [alice], NOW)
    err = info.value
    assert err.holder == "alice-bob" and err.session == "grab" and err.status == 409
    assert "'grab'" in err.message and "'alice-bob'" in err.message and "'alice'" in err.message
    assert err.to_dict()["holder"] == "alice-bob" and err.to_dict()["session"] == "grab"


def test_overlap_is_allowed_for_the_same_owner_a_shared_group_disjoint_filters_and_keys() -> None:
    alice = stored(named("a1", None, owner="alice", match={"header": {"name": "x-user", "exact": "bob"}}), "team")
    policy = Policy()
    policy.check_overlap(named("a2", None, owner="alice", match={"header": {"name": "x-user", "present": True}}),
                         None, [alice], NOW)
    policy.check_overlap(named("agent", None, owner="agent-7", match={"header": {"name": "x-user", "present": True}}),
                         "team", [alice], NOW)
    for disjoint_match in ({"header": {"name": "x-user", "exact": "carol"}},
                           {"header": {"name": "x-user", "present": False}},
                           {"header": {"name": "x-user", "exact": "bob", "invert": True}},
                           {"header": {"name": "x-user", "one_of": ["carol", "dave"]}}):
        policy.check_overlap(named("m", None, owner="mallory", match=disjoint_match), None, [alice], NOW)
    policy.check_overlap(named("keyed", "k", owner="mallory"), None, [alice], NOW)
    expired = stored(parse_session({"id": "old", "owner": "bob", "expires_at": NOW - 1, "routes": [
        {"service": "users", "destination": "10.0.0.5:80", "match": {"header": {"name": "x", "exact": "1"}}}]}))
    policy.check_overlap(named("m", None, owner="mallory", match={"header": {"name": "x", "exact": "1"}}), None,
                         [expired], NOW)


def test_lower_priority_overlap_needs_the_policy_and_a_lower_priority() -> None:
    alice = stored(named("a1", None, owner="alice", priority=5, match={"header": {"name": "x-user", "exact": "bob"}}))
    under = named("m", None, owner="mallory", priority=4, match={"header": {"name": "x-user", "present": True}})
    equal = named("m", None, owner="mallory", priority=5, match={"header": {"name": "x-user", "present": True}})
    with pytest.raises(Conflict, match="overlaps are not allowed under the policy's defaults"):
        Policy().check_overlap(under, None, [alice], NOW)
    policy = parse_policy(GROUPS)
    policy.check_overlap(under, None, [alice], NOW, ["agents"])
    with pytest.raises(Conflict, match="priority below 5"):
        policy.check_overlap(equal, None, [alice], NOW, ["agents"])


@pytest.mark.parametrize(("data", "field", "reason"), [
    ({"groups": []}, "policy.groups", "map group names"),
    ({"groups": {"devs": {"max_sessions": 5}}}, "policy.groups.devs.max_sessions", "unknown rule for a group"),
    ({"groups": {"devs": {"modes": ["teleport"]}}}, "policy.groups.devs.modes", "steal_without_key"),
    ({"groups": {"devs": {"max_priority": 10**7}}}, "policy.groups.devs.max_priority", "whole number"),
    ({"groups": {"devs": {"allow_lower_priority_overlap": "yes"}}},
     "policy.groups.devs.allow_lower_priority_overlap", "true or false"),
    ({"groups": {" devs": {}}}, "policy.groups", "whitespace"),
])
def test_invalid_groups_name_the_field(data: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_policy(data)
    assert any(p.field == field and reason in p.reason for p in info.value.problems), info.value.problems


def test_a_policy_file_with_a_number_too_long_to_convert_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("max_ttl_s: " + "9" * 5000 + "\n")
    with pytest.raises(ValidationError) as caught:
        load_policy(path)
    assert [p.field for p in caught.value.problems] == ["max_ttl_s"]
