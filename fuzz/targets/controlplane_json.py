"""The control plane's JSON API (controlplane/api.py, and filters/model.py's validation under
it) on arbitrary request bodies: every body is either taken (201/200 with the session) or
refused with the API's own error reply (400 ``invalid`` listing each problem by field, 403,
404, 409), never another exception (which the HTTP server would turn into a 500).

The first byte picks the call: create (``POST /v1/sessions``), update
(``PUT /v1/sessions/fixed``) or extend (``POST /v1/sessions/fixed/extend``), and whether
the caller is a developer or an admin; the rest is the body. A session the API returns
must parse again to itself (``parse_session(to_dict())``). The API runs on an in-memory
store under a policy with rules of every kind; any change an input makes is undone
before the next one, so runs do not depend on each other.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client import CollectorRegistry

from controlplane.api import ApiService
from controlplane.audit import AuditLog
from controlplane.http import Reply, Request
from controlplane.identity import Identity, Roles
from controlplane.limits import Limits
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import parse_policy
from controlplane.store import SessionStore
from filters import Session, parse_session

NOW = 1_800_000_000.0
_POLICY = {
    "allowed_services": ["users", "orders-*", "svc*"],
    "allowed_destinations": ["10.0.0.0/8", "fd00::/8", "*.sandbox.local"],
    "max_ttl_s": 86400,
    "max_priority": 100,
    "max_sessions_per_owner": 50,
    "groups": {"agents": {"modes": ["steal", "mirror"], "max_ttl_s": 3600}},
}
_CALLERS = (Identity("alice", frozenset({"developers", "agents"}), "fuzz"),
            Identity("root", frozenset({"admins"}), "fuzz"))
_FIXED = {"id": "fixed", "key": "k-fixed", "ttl_s": 3600,
          "routes": [{"service": "users", "destination": "10.0.0.5:8080"}]}
_OPERATIONS = (("POST", "/v1/sessions"), ("PUT", "/v1/sessions/fixed"), ("POST", "/v1/sessions/fixed/extend"))
_STATUSES = frozenset({200, 201, 400, 403, 404, 409})


class _Proxies:
    """No proxies connected."""

    def proxies(self) -> list[dict[str, Any]]:
        return []

    def rollout(self, session: Session, revision: int) -> list[dict[str, Any]]:
        return []

    def refusals(self) -> dict[str, list[dict[str, Any]]]:
        return {}


class _Api:
    """An API service on an in-memory store holding one session, ``fixed``, owned by alice."""

    def __init__(self) -> None:
        self.monotonic = 0.0
        limits = Limits(audit_max_entries=1000)
        self.store = SessionStore(":memory:", retention=limits)
        registry = CollectorRegistry()
        audit = AuditLog(self.store, limits, clock=lambda: NOW)
        self.service = ApiService(self.store, parse_policy(_POLICY), self._no_tokens, Roles(), _Proxies(), registry,
                                  ControlPlaneMetrics(registry, self.store), audit, limits, clock=lambda: NOW,
                                  monotonic=self._tick)
        reply = self.call(0, json.dumps(_FIXED).encode())
        assert reply.status == 201, reply.body
        self.revision = self.store.revision

    @staticmethod
    async def _no_tokens(authorization: str | None) -> Identity:
        raise AssertionError("requests arrive admitted")

    def _tick(self) -> float:
        self.monotonic += 3600.0  # never rate-limited: every call is an hour after the last
        return self.monotonic

    def call(self, selector: int, body: bytes) -> Reply:
        method, path = _OPERATIONS[selector % len(_OPERATIONS)]
        identity = _CALLERS[(selector >> 2) & 1]
        return self.service.handle(Request(method, path, {}, {}, body, "192.0.2.1:4000", identity))


_apis: list[_Api] = []  # one service per process (building it costs more than a call), rebuilt after a change


def _check(reply: Reply) -> None:
    assert reply.status in _STATUSES, f"status {reply.status}: {reply.body!r}"
    body = json.loads(reply.body)
    assert isinstance(body, dict), body
    if reply.status >= 400:
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
        if reply.status == 400:
            assert body["error"] == "invalid" and body["problems"], body
            for problem in body["problems"]:
                assert isinstance(problem["field"], str) and isinstance(problem["reason"], str), problem
        return
    session = body["session"]
    again = parse_session(session, "session", now=NOW).to_dict()
    assert again == session, f"a session that does not parse to itself: {session!r} -> {again!r}"


def fuzz_one(data: bytes) -> None:
    """One API call with body ``data[1:]``; the store is put back as it was after a change."""
    if not data:
        return
    if not _apis:
        _apis.append(_Api())
    api = _apis[0]
    _check(api.call(data[0], data[1:]))
    if api.store.revision != api.revision:
        api.store.close()
        _apis.clear()


def seeds() -> list[bytes]:
    """Sessions with every field, near every limit, and bodies that are barely JSON."""
    route = {"service": "users", "destination": "10.0.0.5:8080", "mode": "steal", "fallback": "error",
             "priority": 5, "upstream_protocol": "http2",
             "match": {"all_of": [{"header": {"name": "x-user", "exact": "alice"}},
                                  {"path": {"prefix": "/api"}},
                                  {"not": {"method": {"exact": "DELETE"}}},
                                  {"baggage": {"name": "tenant", "regex": "^a.*"}}]}}
    specs: list[Any] = [
        {"key": "abc", "routes": [route]},
        {"id": "s1", "key": "k1", "owner": "alice", "labels": {"team": "payments"}, "expires_at": "2027-01-01T00:00Z",
         "priority": 3, "routes": [route, {**route, "service": "orders-a", "destination": "[fd00::1]:80"}]},
        {"routes": [{"service": "svc1", "destination": "a.sandbox.local:443",
                     "match": {"any_of": [{"header": {"name": "x", "present": True}}]}}], "group": "agents"},
        {"key": "k2", "ttl_s": 1e308, "routes": [route]},
        {"key": "k3", "ttl_s": 10**30, "routes": [route]},
        {"key": "k5", "expires_at": 10**400, "routes": [route]},
        {"ttl_s": 60},
        {"expires_at": NOW + 60},
        {"key": "k4", "routes": [{"service": "users", "destination": "10.0.0.5:8080",
                                  "match": {"header": {"name": "x", "regex": "(a|b)*c" * 10}}}]},
    ]
    out = [bytes([selector]) + json.dumps(spec).encode() for spec in specs for selector in (0, 1, 2, 4)]
    out += [b"\x00" + raw for raw in (b"{", b"[]", b"\xff", b"{\"a\":" * 200 + b"1" + b"}" * 200,
                                      b'{"key": "k", "key": "x", "routes": []}', b'{"ttl_s": NaN}',
                                      b'{"ttl_s": Infinity}', "{\"id\": \"\u00e9\"}".encode())]
    return out
