"""Tunnels in the control plane, without sockets: tickets, who may attach, gateways, what proxies get."""

from __future__ import annotations

import asyncio
import json
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
from controlplane.policy import parse_policy
from controlplane.push import PushService
from controlplane.store import SessionStore
from controlplane.tokens import token_digest
from controlplane.tunnels import TunnelRegistry
from turnout.v1.convert import session_from_proto, session_to_proto

NOW = 1_800_000_000.0
ALICE, BOB, GATEWAY, OTHER_GATEWAY, PROXY = "alice-t", "bob-t", "gw-t", "gw2-t", "proxy-t"
IDENTITIES = {
    ALICE: Identity("alice", frozenset({"developers"}), "test"),
    BOB: Identity("bob", frozenset({"developers"}), "test"),
    GATEWAY: Identity("gateway", frozenset({"gateways"}), "test"),
    OTHER_GATEWAY: Identity("gateway-2", frozenset({"gateways"}), "test"),
    PROXY: Identity("node-1", frozenset({"proxies"}), "test"),
}
TUNNEL_ROUTE = {"service": "users", "destination": "tunnel", "fallback": "error"}


class Api:
    """An ApiService with a tunnel registry and a push service on an in-memory store."""

    def __init__(self) -> None:
        self.now = NOW
        self.store = SessionStore(":memory:")
        self.registry = CollectorRegistry()
        authenticator = Authenticator(AuthConfig(), {token_digest(t): i for t, i in IDENTITIES.items()})
        self.audit = AuditLog(self.store, Limits(), clock=lambda: self.now)
        self.tunnels = TunnelRegistry(self.store, self.audit, clock=lambda: self.now)
        self.push = PushService(self.store, "cp", CollectorRegistry(), resolve=self.tunnels.resolve)
        self.service = ApiService(self.store, parse_policy({"allowed_destinations": ["10.0.0.0/8"]}),
                                  authenticator.authenticate, Roles(), self.push, self.registry,
                                  ControlPlaneMetrics(self.registry, self.store), self.audit,
                                  clock=lambda: self.now, tunnels=self.tunnels)

    def call(self, method: str, target: str, body: Any = None, token: str = ALICE) -> tuple[Reply, Any]:
        path, _, query_text = target.partition("?")
        query: dict[str, list[str]] = {}
        for pair in filter(None, query_text.split("&")):
            k, _, v = pair.partition("=")
            query.setdefault(k, []).append(v)
        request = Request(method, path, query, {"authorization": [f"Bearer {token}"]},
                          b"" if body is None else json.dumps(body).encode(), "192.0.2.7:41000")
        admitted = asyncio.run(self.service.admit(request))
        reply = admitted if isinstance(admitted, Reply) else self.service.handle(admitted)
        return reply, json.loads(reply.body) if reply.body and reply.content_type == "application/json" else None

    def create(self, **spec: Any) -> str:
        reply, body = self.call("POST", "/v1/sessions", {"key": "k1", "routes": [TUNNEL_ROUTE], **spec})
        assert reply.status == 201, body
        return str(body["session"]["id"])

    def attach(self, session_id: str, token: str = GATEWAY, address: str = "10.1.2.3:40001") -> dict[str, Any]:
        reply, body = self.call("POST", f"/v1/sessions/{session_id}/tunnel", {})
        assert reply.status == 201, body
        reply, body = self.call("POST", "/v1/tunnels", {"ticket": body["ticket"], "gateway": "gw-a",
                                                        "address": address, "peer": "198.51.100.9:5000"},
                                token=token)
        assert reply.status == 201, body
        return dict(body["tunnel"])

    def pushed_destination(self, session_id: str) -> tuple[str, str]:
        stored = self.store.get(session_id)
        assert stored is not None
        msg = session_to_proto(self.tunnels.resolve(stored.session))
        assert msg is not None
        return msg.routes[0].destination, msg.routes[0].tunnel


@pytest.fixture
def api() -> Iterator[Api]:
    a = Api()
    yield a
    a.store.close()


def test_a_tunnel_route_is_stored_as_tunnel_and_pushed_unresolved_until_attached(api: Api) -> None:
    session_id = api.create()
    assert api.store.get(session_id).session.routes[0].destination is None  # type: ignore[union-attr]
    destination, tunnel = api.pushed_destination(session_id)
    assert (destination, tunnel) == ("tunnel", "")
    # A proxy validates the pushed form with the same parser: a disconnected tunnel route.
    stored = api.store.get(session_id)
    assert stored is not None
    msg = session_to_proto(api.tunnels.resolve(stored.session))
    assert msg is not None
    assert session_from_proto(msg).routes[0].destination is None


def test_attach_resolves_the_route_bumps_the_revision_and_detach_undoes_it(api: Api) -> None:
    session_id = api.create()
    before = api.store.revision
    tunnel = api.attach(session_id)
    assert api.store.revision == before + 1, "proxies are pushed the resolved route"
    destination, name = api.pushed_destination(session_id)
    assert destination == "10.1.2.3:40001" and name == f"{tunnel['id']} on gateway gw-a"
    reply, body = api.call("GET", f"/v1/sessions/{session_id}")
    assert body["tunnel"]["id"] == tunnel["id"] and body["tunnel"]["identity"] == "alice"
    assert body["session"]["routes"][0]["destination"] == "tunnel", "the stored spec is unchanged"
    reply, _ = api.call("DELETE", f"/v1/tunnels/{tunnel['id']}?reason=cut", token=GATEWAY)
    assert reply.status == 204
    assert api.pushed_destination(session_id) == ("tunnel", "")
    assert api.store.revision == before + 2
    actions = [e.action for e in api.store.audit(None, session_id, None, 100)]
    assert actions == ["create", "tunnel_attach", "tunnel_detach"]


def test_only_who_may_change_the_session_gets_a_ticket(api: Api) -> None:
    session_id = api.create()
    reply, body = api.call("POST", f"/v1/sessions/{session_id}/tunnel", {}, token=BOB)
    assert reply.status == 403 and body["owner"] == "alice" and "owned by 'alice'" in body["message"]
    refusals = [e for e in api.store.audit(None, session_id, None, 100) if e.action == "refuse"]
    assert refusals and refusals[0].identity == "bob" and refusals[0].detail["owner"] == "alice"


def test_a_ticket_needs_a_tunnel_route_and_works_once(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"key": "pod", "routes": [{"service": "users",
                                                                             "destination": "10.0.0.5:80"}]})
    pod = body["session"]["id"]
    reply, body = api.call("POST", f"/v1/sessions/{pod}/tunnel", {})
    assert reply.status == 400 and "no route with destination 'tunnel'" in body["message"]
    session_id = api.create()
    _, body = api.call("POST", f"/v1/sessions/{session_id}/tunnel", {})
    ticket = body["ticket"]
    spec = {"ticket": ticket, "gateway": "gw-a", "address": "10.1.2.3:4000"}
    assert api.call("POST", "/v1/tunnels", spec, token=GATEWAY)[0].status == 201
    reply, body = api.call("POST", "/v1/tunnels", spec, token=GATEWAY)
    assert reply.status == 401 and "unknown, used or expired" in body["message"]
    _, body = api.call("POST", f"/v1/sessions/{session_id}/tunnel", {})
    api.now += 31
    reply, _ = api.call("POST", "/v1/tunnels", {**spec, "ticket": body["ticket"]}, token=GATEWAY)
    assert reply.status == 401, "expired"


def test_only_gateways_register_and_only_their_own_tunnels(api: Api) -> None:
    session_id = api.create()
    _, body = api.call("POST", f"/v1/sessions/{session_id}/tunnel", {})
    for token in (ALICE, BOB):
        reply, refused = api.call("POST", "/v1/tunnels", {"ticket": body["ticket"], "gateway": "x",
                                                          "address": "10.0.0.1:1"}, token=token)
        assert reply.status == 403 and "not a gateway" in refused["message"]
    reply, _ = api.call("GET", "/v1/sessions", token=GATEWAY)
    assert reply.status == 403, "a gateway credential only registers tunnels"
    reply, _ = api.call("POST", "/v1/tunnels", {}, token=PROXY)
    assert reply.status == 403
    tunnel = api.attach(session_id)
    reply, _ = api.call("DELETE", f"/v1/tunnels/{tunnel['id']}", token=OTHER_GATEWAY)
    assert reply.status == 404, "another gateway cannot detach it"
    reply, _ = api.call("POST", f"/v1/tunnels/{tunnel['id']}", {"requests": 3, "errors": 1}, token=GATEWAY)
    assert reply.status == 200
    _, listed = api.call("GET", "/v1/tunnels")
    assert [(t["id"], t["requests"], t["errors"]) for t in listed["tunnels"]] == [(tunnel["id"], 3, 1)]


def test_a_reconnect_replaces_the_tunnel_and_a_silent_gateway_loses_it(api: Api) -> None:
    session_id = api.create()
    first = api.attach(session_id)
    second = api.attach(session_id, address="10.1.2.3:40002")
    assert api.pushed_destination(session_id)[0] == "10.1.2.3:40002"
    reply, _ = api.call("DELETE", f"/v1/tunnels/{first['id']}", token=GATEWAY)
    assert reply.status == 404, "the replaced tunnel is gone; its late detach changes nothing"
    assert api.pushed_destination(session_id)[0] == "10.1.2.3:40002"
    api.now += api.tunnels.lease_s + 1
    assert api.tunnels.expire() == [second["id"]]
    assert api.pushed_destination(session_id) == ("tunnel", "")


def test_deleting_the_session_drops_its_tunnel(api: Api) -> None:
    session_id = api.create()
    tunnel = api.attach(session_id)
    assert api.call("DELETE", f"/v1/sessions/{session_id}")[0].status == 204
    assert api.tunnels.tunnels() == []
    reply, _ = api.call("POST", f"/v1/tunnels/{tunnel['id']}", {}, token=GATEWAY)
    assert reply.status == 404


def test_the_tunnel_field_is_the_control_planes(api: Api) -> None:
    reply, body = api.call("POST", "/v1/sessions", {"key": "k", "routes": [
        {"service": "users", "destination": "10.0.0.5:80", "tunnel": "forged"}]})
    assert reply.status == 400 and body["problems"][0]["field"] == "session.routes[0].tunnel"
    # allowed_destinations (10.0.0.0/8 here) does not apply to a tunnel: it is the owner's machine.
    assert api.create(key="k2")
