"""Unit tests for controlplane.api without sockets: ``ApiService.handle(Request) -> Reply``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from controlplane.api import ApiService
from controlplane.http import Reply, Request
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import parse_policy
from controlplane.store import SessionStore

NOW = 1_800_000_000.0
TOKEN = "t0ken-for-tests"
ROUTE = {"service": "users", "destination": "10.0.0.5:8080"}


class Api:
    """An ApiService on an in-memory store with a settable clock."""

    def __init__(self) -> None:
        self.now = NOW
        self.store = SessionStore(":memory:")
        self.registry = CollectorRegistry()
        self.proxies: list[dict[str, Any]] = []
        self.service = ApiService(self.store, parse_policy({}), TOKEN, lambda: self.proxies, self.registry,
                                  ControlPlaneMetrics(self.registry, self.store), clock=lambda: self.now)

    def call(self, method: str, target: str, body: Any = None, token: str | None = TOKEN,
             raw: bytes | None = None) -> tuple[Reply, Any]:
        path, _, query_text = target.partition("?")
        query: dict[str, list[str]] = {}
        for pair in filter(None, query_text.split("&")):
            k, _, v = pair.partition("=")
            query.setdefault(k, []).append(v)
        headers = {"authorization": [f"Bearer {token}"]} if token is not None else {}
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        reply = self.service.handle(Request(method, path, query, headers, data))
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
    api.call("POST", "/v1/sessions", {"id": "b", "key": "kb", "owner": "bob", "routes": [ROUTE]})
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
    assert api.service.handle(twice).status == 401, "two Authorization headers are ambiguous"
    lower = Request("GET", "/v1/sessions", {}, {"authorization": [f"bearer {TOKEN}"]}, b"")
    assert api.service.handle(lower).status == 200, "the scheme is case-insensitive"


def test_health_metrics_and_proxies(api: Api) -> None:
    reply, body = api.call("GET", "/healthz", token=None)
    assert reply.status == 200 and body == {"status": "ok", "revision": 0}
    api.call("POST", "/v1/sessions", {"key": "k", "routes": [ROUTE]})
    reply, _ = api.call("GET", "/metrics", token=None)
    text = reply.body.decode()
    assert reply.status == 200 and reply.content_type.startswith("text/plain")
    assert "turnout_cp_sessions 1.0" in text and "turnout_cp_revision 1.0" in text
    assert 'turnout_cp_api_requests_total{code="201",method="POST"} 1.0' in text
    api.proxies = [{"id": "p1", "acked_version": "1"}]
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
