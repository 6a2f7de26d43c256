"""Unit tests for controlplane.api without sockets: ``ApiService.admit`` then ``handle(Request) -> Reply``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.api import ApiService
from controlplane.audit import AuditLog
from controlplane.authconfig import AuthConfig
from controlplane.authn import Authenticator
from controlplane.http import Reply, Request
from controlplane.identity import Identity, Roles
from controlplane.limits import Limits
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import Policy, parse_policy
from controlplane.store import SessionStore
from controlplane.tokens import token_digest
from filters import Session

NOW = 1_800_000_000.0
TOKEN = "t0ken-for-tests"  # alice
BOB = "bob-token"
ADMIN = "admin-token"
PROXY = "proxy-token"
AGENT = "agent-token"  # alice's agent: shares group alice-agents with her
ROUTE = {"service": "users", "destination": "10.0.0.5:8080"}
IDENTITIES = {
    TOKEN: Identity("alice", frozenset({"developers", "alice-agents"}), "test"),
    BOB: Identity("bob", frozenset({"developers"}), "test"),
    ADMIN: Identity("root", frozenset({"admins"}), "test"),
    PROXY: Identity("node-1", frozenset({"proxies"}), "test"),
    AGENT: Identity("agent-7", frozenset({"alice-agents"}), "test"),
}


class Proxies:
    """What the push service would say: set by the test."""

    def __init__(self) -> None:
        self.listed: list[dict[str, Any]] = []
        self.rollouts: dict[str, list[dict[str, Any]]] = {}
        self.refused: dict[str, list[dict[str, Any]]] = {}

    def proxies(self) -> list[dict[str, Any]]:
        return self.listed

    def rollout(self, session: Session, revision: int) -> list[dict[str, Any]]:
        return self.rollouts.get(session.id, [])

    def refusals(self) -> dict[str, list[dict[str, Any]]]:
        return self.refused


class Api:
    """An ApiService on an in-memory store with settable clocks and five identities."""

    def __init__(self, policy: Policy | None = None, limits: Limits | None = None) -> None:
        self.now = NOW
        self.monotonic = 0.0
        self.store = SessionStore(":memory:")
        self.registry = CollectorRegistry()
        self.proxies = Proxies()
        authenticator = Authenticator(AuthConfig(), {token_digest(t): i for t, i in IDENTITIES.items()})
        self.audit = AuditLog(self.store, limits or Limits(), clock=lambda: self.now)
        self.service = ApiService(self.store, policy or parse_policy({}), authenticator.authenticate, Roles(),
                                  self.proxies, self.registry, ControlPlaneMetrics(self.registry, self.store),
                                  self.audit, limits, clock=lambda: self.now, monotonic=lambda: self.monotonic)

    def request(self, request: Request) -> Reply:
        admitted = asyncio.run(self.service.admit(request))
        return admitted if isinstance(admitted, Reply) else self.service.handle(admitted)

    def call(self, method: str, target: str, body: Any = None, token: str | None = TOKEN,
             raw: bytes | None = None) -> tuple[Reply, Any]:
        path, _, query_text = target.partition("?")
        query: dict[str, list[str]] = {}
        for pair in filter(None, query_text.split("&")):
            k, _, v = pair.partition("=")
            query.setdefault(k, []).append(v)
        headers = {"authorization": [f"Bearer {token}"]} if token is not None else {}
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        reply = self.request(Request(method, path, query, headers, data, "192.0.2.7:41000"))
        decoded = json.loads(reply.body) if reply.content_type == "application/json" and reply.body else None
        return reply, decoded

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    yield a
    a.store.close()


def test_create_defaults(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"key": "abc", "routes": [ROUTE]})
    assert reply.status == 201
    session = body["session"]
    assert re.fullmatch(r"s-[0-9a-f]{10}", session["id"])
    assert dict(reply.headers)["location"] == f"/v1/sessions/{session['id']}"
    assert session["created_at"] == NOW and session["expires_at"] == NOW + 7200, "the policy's default_ttl_s"
    assert body["revision"] == 1 == api.store.revision
    assert session["routes"] == [{**ROUTE, "mode": "steal", "fallback": "baseline", "priority": 0}]


def test_create_lists_every_problem(api: Api) -> None:
    spec = {"id": "bad id", "created_at": 5, "routes": [{"service": "users", "destination": "nohost", "mode": "x"}]}
    reply, body = api.call("POST", "/v1/sessions", spec)
    assert reply.status == 400 and body["error"] == "invalid"
    assert {p["field"] for p in body["problems"]} == {
        "session.created_at", "session.id", "session.routes[0].destination", "session.routes[0].mode"}
    assert api.store.revision == 0


@pytest.mark.parametrize(("raw", "reason"), [(b"{", "not valid JSON"), (b"[1]", "JSON object"),
                                             (b"\xff", "not valid JSON")])
def test_create_needs_a_json_object(api: Api, raw: bytes, reason: str) -> None:
    reply, body = api.call("POST", "/v1/sessions", raw=raw)
    assert reply.status == 400 and body["problems"][0]["field"] == "body" and reason in body["problems"][0]["reason"]


@pytest.mark.parametrize("name", ["ttl_s", "expires_at"])
def test_create_refuses_numbers_too_large_for_a_float(api: Api, name: str) -> None:
    # Found by the controlplane_json fuzz target: this was a 500 (OverflowError).
    reply, body = api.call("POST", "/v1/sessions", raw=b'{"key": "k", "routes": [{"service": "users", '
                           b'"destination": "10.0.0.5:8080"}], "' + name.encode() + b'": 1' + b"0" * 400 + b"}")
    assert reply.status == 400 and [p["field"] for p in body["problems"]] == ["session." + name]


def test_create_refuses_a_past_expiry(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"key": "k", "expires_at": NOW - 1, "routes": [ROUTE]})
    assert reply.status == 400 and body["problems"] == [{"field": "session.expires_at", "reason": "is in the past"}]


def test_policy_then_conflict(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"id": "open", "routes": [ROUTE]})
    assert reply.status == 403 and body["error"] == "policy" and body["policy"] == "forbid_unfiltered_steal"
    assert api.metric("turnout_cp_policy_refusals_total", policy="forbid_unfiltered_steal") == 1
    assert api.call("POST", "/v1/sessions", {"id": "a", "key": "k", "routes": [ROUTE]})[0].status == 201
    reply, body = api.call("POST", "/v1/sessions", {"id": "b", "key": "k", "routes": [ROUTE]})
    assert reply.status == 409 and body["error"] == "conflict" and body["holder"] == "a"
    reply, body = api.call("POST", "/v1/sessions", {"id": "a", "key": "other", "routes": [ROUTE]})
    assert reply.status == 409 and body["holder"] == "a"


def test_the_policy_can_be_swapped(api: Api) -> None:
    api.service.policy = parse_policy({"max_ttl_s": 60, "default_ttl_s": 30})
    reply, body = api.call("POST", "/v1/sessions", {"key": "k", "routes": [ROUTE]})
    assert reply.status == 201 and body["session"]["expires_at"] == NOW + 30
    reply, body = api.call("POST", "/v1/sessions", {"key": "k2", "ttl_s": 61, "routes": [ROUTE]})
    assert reply.status == 403 and body["policy"] == "max_ttl_s"


def test_get_list_delete(api: Api) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "ka", "owner": "alice", "routes": [ROUTE]})
    api.call("POST", "/v1/sessions", {"id": "b", "key": "kb", "routes": [ROUTE]}, token=BOB)
    reply, body = api.call("GET", "/v1/sessions/a")
    assert reply.status == 200 and body["session"]["owner"] == "alice" and body["revision"] == 1
    reply, body = api.call("GET", "/v1/sessions")
    assert [s["session"]["id"] for s in body["sessions"]] == ["a", "b"] and body["revision"] == 2
    reply, body = api.call("GET", "/v1/sessions?owner=bob")
    assert [s["session"]["id"] for s in body["sessions"]] == ["b"]
    reply, _ = api.call("DELETE", "/v1/sessions/a")
    assert reply.status == 204 and reply.body == b""
    for method in ("GET", "DELETE"):
        reply, body = api.call(method, "/v1/sessions/a")
        assert reply.status == 404 and body["error"] == "not_found"


def test_extend(api: Api) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "k", "routes": [ROUTE]})
    reply, body = api.call("POST", "/v1/sessions/a/extend", {"ttl_s": 60})
    assert reply.status == 200 and body["session"]["expires_at"] == NOW + 60 and body["revision"] == 2
    # NOW is 2027-01-15T08:00:00Z.
    for text in ("2027-01-15T09:00:00Z", "2027-01-15T11:00:00+02:00", "2027-01-15t09:00:00z"):
        reply, body = api.call("POST", "/v1/sessions/a/extend", {"expires_at": text})
        assert reply.status == 200 and body["session"]["expires_at"] == NOW + 3600, text
    reply, body = api.call("POST", "/v1/sessions/a/extend", {"expires_at": NOW + 500})
    assert reply.status == 200 and body["session"]["expires_at"] == NOW + 500
    api.service.policy = parse_policy({"max_ttl_s": 600, "default_ttl_s": 60})
    reply, body = api.call("POST", "/v1/sessions/a/extend", {"ttl_s": 601})
    assert reply.status == 403 and body["policy"] == "max_ttl_s"
    assert api.call("POST", "/v1/sessions/zzz/extend", {"ttl_s": 60})[0].status == 404


@pytest.mark.parametrize(("body", "field"), [
    ({}, "body"), ({"ttl_s": 1, "expires_at": NOW + 5}, "body"), ({"ttl": 5}, "body"), ({"ttl_s": 0}, "ttl_s"),
    ({"ttl_s": "2h"}, "ttl_s"), ({"expires_at": NOW - 5}, "expires_at"), ({"expires_at": "tomorrow"}, "expires_at"),
    ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"), ({"expires_at": True}, "expires_at"),
    # Integers too large for a float (float() raises OverflowError): the controlplane_json fuzz target.
    ({"ttl_s": 10**400}, "ttl_s"), ({"expires_at": 10**400}, "expires_at"),
])
def test_extend_refuses_bad_bodies(api: Api, body: dict[str, Any], field: str) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "k", "routes": [ROUTE]})
    reply, answer = api.call("POST", "/v1/sessions/a/extend", body)
    assert reply.status == 400 and answer["problems"][0]["field"] == field


def test_auth(api: Api) -> None:
    reply, body = api.call("GET", "/v1/sessions", token=None)
    assert reply.status == 401 and body["error"] == "unauthorized"
    assert dict(reply.headers)["www-authenticate"] == 'Bearer realm="turnout"'
    reply, body = api.call("GET", "/v1/sessions", token="wrong")
    assert reply.status == 401 and 'error="invalid_token"' in dict(reply.headers)["www-authenticate"]
    reply, _ = api.call("GET", "/v1/nothing-here", token=None)
    assert reply.status == 401, "unknown paths under /v1 say nothing before authentication"
    twice = Request("GET", "/v1/sessions", {}, {"authorization": [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]}, b"")
    assert api.request(twice).status == 401, "two Authorization headers are ambiguous"
    lower = Request("GET", "/v1/sessions", {}, {"authorization": [f"bearer {TOKEN}"]}, b"")
    assert api.request(lower).status == 200, "the scheme is case-insensitive"
    assert api.metric("turnout_cp_auth_failures_total") == 4


def test_health_metrics_and_proxies(api: Api) -> None:
    reply, body = api.call("GET", "/healthz", token=None)
    assert reply.status == 200 and body == {"status": "ok", "revision": 0}
    api.call("POST", "/v1/sessions", {"key": "k", "routes": [ROUTE]})
    reply, _ = api.call("GET", "/metrics", token=None)
    text = reply.body.decode()
    assert reply.status == 200 and reply.content_type.startswith("text/plain")
    assert "turnout_cp_sessions 1.0" in text and "turnout_cp_revision 1.0" in text
    assert 'turnout_cp_api_requests_total{code="201",method="POST"} 1.0' in text
    api.proxies.listed = [{"id": "p1", "acked_version": "1"}]
    reply, body = api.call("GET", "/v1/proxies")
    assert body == {"revision": 1, "proxies": [{"id": "p1", "acked_version": "1"}]}


def test_unknown_paths_and_methods(api: Api) -> None:
    reply, body = api.call("GET", "/nope", token=None)
    assert reply.status == 404 and body["error"] == "not_found"
    reply, body = api.call("GET", "/v1/sessions/a/b/c")
    assert reply.status == 404
    reply, body = api.call("PUT", "/v1/sessions")
    assert reply.status == 405 and dict(reply.headers)["allow"] == "GET, POST"
    reply, _ = api.call("GET", "/v1/sessions/a/extend")
    assert reply.status == 405
    reply, _ = api.call("BREW", "/healthz", token=None)
    assert reply.status == 405
    assert api.metric("turnout_cp_api_requests_total", method="other", code="405") == 1
    reply, _ = api.call("GET", "/v1/sessions/a%2Fextend")
    assert reply.status == 404, "an encoded slash stays inside the id"


# ---------------------------------------------------------------------- identities and ownership


def test_the_owner_is_the_identity_never_free_text(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"id": "a", "key": "ka", "routes": [ROUTE]})
    assert reply.status == 201 and body["session"]["owner"] == "alice"
    for owner in ("bob", "alice ", ""):
        reply, body = api.call("POST", "/v1/sessions", {"key": "kb", "owner": owner, "routes": [ROUTE]})
        assert reply.status == 403 and body["policy"] == "owner" and "you are 'alice'" in body["message"], owner
    reply, body = api.call("POST", "/v1/sessions", {"id": "for-bob", "key": "kc", "owner": "bob", "routes": [ROUTE]},
                           token=ADMIN)
    assert reply.status == 201 and body["session"]["owner"] == "bob", "an admin may create for someone"
    (entry,) = [e for e in api.store.audit() if e.session == "for-bob"]
    assert entry.identity == "root" and entry.owner == "bob", "the audit names who did it"


def test_only_the_owner_a_shared_group_or_an_admin_may_change(api: Api) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "ka", "routes": [ROUTE]})
    for method, target, body in (("POST", "/v1/sessions/a/extend", {"ttl_s": 60}),
                                 ("PUT", "/v1/sessions/a", {"key": "kz", "routes": [ROUTE]}),
                                 ("DELETE", "/v1/sessions/a", None)):
        reply, answer = api.call(method, target, body, token=BOB)
        assert reply.status == 403 and answer["error"] == "forbidden" and answer["owner"] == "alice", method
        assert "owned by 'alice'" in answer["message"] and "admins" in answer["message"]
    assert api.store.get("a") is not None and api.store.get("a").revision == 1  # type: ignore[union-attr]
    assert api.call("POST", "/v1/sessions/a/extend", {"ttl_s": 60}, token=ADMIN)[0].status == 200
    reply, _ = api.call("DELETE", "/v1/sessions/a", token=AGENT)
    assert reply.status == 403, "not shared with the agents' group"
    reply, body = api.call("POST", "/v1/sessions", {"id": "shared", "key": "ks", "group": "alice-agents",
                                                    "routes": [ROUTE]})
    assert reply.status == 201 and body["group"] == "alice-agents"
    assert api.call("POST", "/v1/sessions/shared/extend", {"ttl_s": 60}, token=AGENT)[0].status == 200
    assert api.call("DELETE", "/v1/sessions/shared", token=AGENT)[0].status == 204
    reply, body = api.call("POST", "/v1/sessions", {"key": "kt", "group": "admins", "routes": [ROUTE]})
    assert reply.status == 403 and "not in group 'admins'" in body["message"], "only your own groups"
    refusals = [e for e in api.store.audit() if e.action == "refuse"]
    assert [(e.identity, e.detail["method"], e.owner) for e in refusals[:3]] == [
        ("bob", "POST", "alice"), ("bob", "PUT", "alice"), ("bob", "DELETE", "alice")]
    assert all(e.source == "192.0.2.7:41000" for e in refusals)


def test_per_identity_caps_cannot_be_dodged(api: Api) -> None:
    api.service.policy = parse_policy({"max_sessions_per_owner": 2})
    for i in range(2):
        assert api.call("POST", "/v1/sessions", {"key": f"k{i}", "routes": [ROUTE]})[0].status == 201
    for owner in (None, "alice ", "Alice"):
        spec: dict[str, Any] = {"key": "k9", "routes": [ROUTE]}
        if owner is not None:
            spec["owner"] = owner
        reply, body = api.call("POST", "/v1/sessions", spec)
        assert reply.status == 403 and body["policy"] in ("max_sessions_per_owner", "owner"), owner
    assert api.store.count("alice") == 2
    assert api.call("POST", "/v1/sessions", {"key": "k9", "routes": [ROUTE]}, token=BOB)[0].status == 201


def test_update(api: Api) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "ka", "ttl_s": 600, "labels": {"t": "1"}, "routes": [ROUTE]})
    api.now += 10
    reply, body = api.call("PUT", "/v1/sessions/a", {"key": "kb", "routes": [ROUTE, {**ROUTE, "service": "orders"}]})
    assert reply.status == 200 and body["revision"] == 2
    session = body["session"]
    assert session["key"] == "kb" and session["owner"] == "alice" and session["created_at"] == NOW
    assert session["expires_at"] == NOW + 600, "without a ttl the expiry stays"
    assert "labels" not in session, "a whole new spec"
    (update,) = [e for e in api.store.audit() if e.action == "update"]
    assert set(update.detail["changed"]) == {"key", "labels", "routes"}
    reply, body = api.call("PUT", "/v1/sessions/a", {"id": "b", "owner": "alice", "routes": [ROUTE]})
    assert reply.status == 400 and body["problems"][0]["field"] == "session.id"
    reply, body = api.call("PUT", "/v1/sessions/a", {"key": "kb", "owner": "bob", "routes": [ROUTE]}, token=ADMIN)
    assert reply.status == 403 and body["policy"] == "owner", "the owner cannot change"
    assert api.call("PUT", "/v1/sessions/zzz", {"key": "k", "routes": [ROUTE]})[0].status == 404


def test_proxy_credentials_cannot_use_the_api(api: Api) -> None:
    reply, body = api.call("GET", "/v1/sessions", token=PROXY)
    assert reply.status == 403 and "proxy credential" in body["message"]
    reply, body = api.call("GET", "/v1/whoami", token=PROXY)
    assert reply.status == 200 and body["proxy"] and not body["admin"] and body["identity"] == "node-1"


def test_whoami_shows_groups_and_rules(api: Api) -> None:
    api.service.policy = parse_policy({"groups": {"developers": {"max_ttl_s": 3600}}})
    reply, body = api.call("GET", "/v1/whoami")
    assert reply.status == 200 and body["identity"] == "alice" and body["groups"] == ["alice-agents", "developers"]
    assert body["rules"]["groups"] == ["developers"] and body["rules"]["max_ttl_s"] == 3600
    assert api.call("GET", "/v1/whoami", token=ADMIN)[1]["admin"] is True


def test_audit_endpoint_shows_admins_everything_and_others_their_own(api: Api) -> None:
    api.call("POST", "/v1/sessions", {"id": "a", "key": "ka", "routes": [ROUTE]})
    api.call("POST", "/v1/sessions", {"id": "b", "key": "kb", "routes": [ROUTE]}, token=BOB)
    api.call("DELETE", "/v1/sessions/a", token=ADMIN)
    api.call("GET", "/v1/sessions", token="forged")
    _, everything = api.call("GET", "/v1/audit", token=ADMIN)
    assert everything["all"] and [(e["action"], e["identity"]) for e in everything["entries"]] == [
        ("create", "alice"), ("create", "bob"), ("delete", "root"), ("refuse", "-")]
    assert everything["entries"][3]["outcome"] == "unauthorized" and everything["entries"][3]["source"] == \
        "192.0.2.7:41000"
    _, mine = api.call("GET", "/v1/audit")
    assert not mine["all"] and [e["action"] for e in mine["entries"]] == ["create", "delete"], \
        "alice's create, and the admin's delete of her session"
    _, about_a = api.call("GET", "/v1/audit?session=a", token=ADMIN)
    assert [e["action"] for e in about_a["entries"]] == ["create", "delete"]
    _, later = api.call("GET", f"/v1/audit?since={NOW + 1}", token=ADMIN)
    assert later["entries"] == []
    assert api.call("GET", "/v1/audit?since=2027-01-15T08:00:00Z&limit=1", token=ADMIN)[1]["entries"][0]["action"] \
        == "refuse"
    for bad in ("limit=0", "limit=5000", "since=yesterday"):
        assert api.call("GET", f"/v1/audit?{bad}", token=ADMIN)[0].status == 400, bad


def test_changes_are_rate_limited_per_identity() -> None:
    api = Api(limits=Limits(changes_per_minute=60, change_burst=3))
    try:
        for i in range(3):
            assert api.call("POST", "/v1/sessions", {"key": f"k{i}", "routes": [ROUTE]})[0].status == 201
        reply, body = api.call("DELETE", "/v1/sessions/nope")
        assert reply.status == 429 and body["error"] == "rate_limited" and dict(reply.headers)["retry-after"] == "1"
        assert "'alice'" in body["message"]
        assert api.call("GET", "/v1/sessions")[0].status == 200, "reads are not limited"
        assert api.call("POST", "/v1/sessions", {"key": "kb", "routes": [ROUTE]}, token=BOB)[0].status == 201
        api.monotonic += 1.0
        assert api.call("POST", "/v1/sessions", {"key": "k9", "routes": [ROUTE]})[0].status == 201
        assert api.metric("turnout_cp_rate_limited_total") == 1
        assert [e.outcome for e in api.store.audit() if e.action == "refuse"] == ["rate_limited"]
    finally:
        api.store.close()


def test_json_nesting_is_bounded(api: Api) -> None:
    for depth in (170, 5000):
        raw = b"[" * depth + b"]" * depth
        reply, body = api.call("POST", "/v1/sessions", raw=b'{"id": "x", "labels": ' + raw + b"}")
        assert reply.status == 400 and "nests deeper than 160 levels" in body["problems"][0]["reason"], depth
    deep_match: dict[str, Any] = {"header": {"name": "x-user", "exact": "a"}}
    for _ in range(40):
        deep_match = {"all_of": [deep_match]}
    reply, body = api.call("POST", "/v1/sessions", {"key": "k", "routes": [{**ROUTE, "match": deep_match}]})
    assert reply.status == 201, "a deep but legal match tree (84 levels) passes"


def test_overlap_with_another_owner_is_409_naming_both(api: Api) -> None:
    bob_only = {**ROUTE, "match": {"header": {"name": "x-user", "exact": "bob"}}}
    assert api.call("POST", "/v1/sessions", {"id": "alice-bob", "routes": [bob_only]})[0].status == 201
    grab = {**ROUTE, "priority": 1_000_000, "match": {"header": {"name": "x-user", "present": True}}}
    reply, body = api.call("POST", "/v1/sessions", {"id": "grab", "routes": [grab]}, token=BOB)
    assert reply.status == 409 and body["holder"] == "alice-bob" and body["session"] == "grab"
    assert "'alice'" in body["message"]
    api.call("POST", "/v1/sessions", {"id": "bob-own", "routes": [
        {**ROUTE, "match": {"header": {"name": "x-user", "exact": "carol"}}}]}, token=BOB)
    reply, body = api.call("PUT", "/v1/sessions/bob-own", {"routes": [grab]}, token=BOB)
    assert reply.status == 409 and body["holder"] == "alice-bob", "an update cannot widen into it either"
