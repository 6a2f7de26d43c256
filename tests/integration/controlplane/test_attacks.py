"""Issue 14's attack list, row by row, against a real control plane (subprocess, real sockets, real
grpcio clients, a real proxy for the NACK row). Each test failed on 2824f8a and passes now.

Identities come from a tokens file: alice, bob, mallory and capped are developers, root an admin,
node-a and node-b proxies bound to their node ids, shared an unbound proxy credential.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.controlplane.test_security import first_reply_code, open_stream
from tests.integration.cp_support import (
    ROUTE,
    ControlPlane,
    eventually,
    run_cli,
    running_control_plane,
    write_auth,
    write_policy,
    write_tokens,
)
from tests.integration.support import RecordingUpstream, free_port, inbound, running_proxy
from turnout.v1 import config_pb2, config_pb2_grpc

ALICE, BOB, MALLORY, CAPPED, ROOT_TOKEN = "alice-token", "bob-token", "mallory-token", "capped-token", "root-token"
NODE_A, NODE_B, SHARED = "node-a-token", "node-b-token", "shared-proxy-token"
TOKENS = {
    ALICE: {"identity": "alice", "groups": ["developers"]},
    BOB: {"identity": "bob", "groups": ["developers"]},
    MALLORY: {"identity": "mallory", "groups": ["developers"]},
    CAPPED: {"identity": "capped", "groups": ["developers"]},
    ROOT_TOKEN: {"identity": "root", "groups": ["admins"]},
    NODE_A: {"identity": "node-a", "groups": ["proxies"], "node_ids": ["node-a"]},
    NODE_B: {"identity": "node-b", "groups": ["proxies"], "node_ids": ["node-b"]},
    SHARED: {"identity": "shared-proxy", "groups": ["proxies"]},
}
LIMITS = {"max_disconnected_proxies": 20, "max_initial_resource_versions": 1000}


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    tmp = tmp_path_factory.mktemp("attacks")
    write_tokens(tmp, TOKENS)
    auth = write_auth(tmp, {"tokens_file": "tokens.yaml", "limits": LIMITS})
    policy = write_policy(tmp, {"max_sessions_per_owner": 5})
    with running_control_plane(tmp, "--auth", str(auth), "--policy", str(policy), token=None) as control_plane:
        yield control_plane


def as_(cp: ControlPlane, token: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return cp.request(method, path, body, token=token)


def api_port(cp: ControlPlane) -> int:
    return int(cp.api_url.rsplit(":", 1)[1])


# ---------------------------------------------------------------------- one shared token, free-text owner


def test_mallory_cannot_extend_update_or_delete_alices_session(cp: ControlPlane) -> None:
    status, created = as_(cp, ALICE, "POST", "/v1/sessions", {"id": "alice-1", "key": "alice-k", "routes": [ROUTE]})
    assert status == 201 and created["session"]["owner"] == "alice"
    for method, path, body in (("POST", "/v1/sessions/alice-1/extend", {"ttl_s": 60}),
                               ("PUT", "/v1/sessions/alice-1", {"key": "mallory-k", "routes": [ROUTE]}),
                               ("DELETE", "/v1/sessions/alice-1", None)):
        status, refused = as_(cp, MALLORY, method, path, body)
        assert status == 403, (method, refused)
        assert refused["error"] == "forbidden" and refused["owner"] == "alice" and "'alice'" in refused["message"]
    status, after = as_(cp, ALICE, "GET", "/v1/sessions/alice-1")
    assert status == 200 and after["revision"] == created["revision"] and after["session"] == created["session"]
    assert as_(cp, ROOT_TOKEN, "POST", "/v1/sessions/alice-1/extend", {"ttl_s": 60})[0] == 200, "an admin may"
    assert as_(cp, ALICE, "DELETE", "/v1/sessions/alice-1")[0] == 204, "the owner may"


def test_an_owner_with_a_trailing_space_gets_no_sixth_session(cp: ControlPlane) -> None:
    for i in range(5):
        assert as_(cp, CAPPED, "POST", "/v1/sessions", {"key": f"cap-{i}", "routes": [ROUTE]})[0] == 201
    status, body = as_(cp, CAPPED, "POST", "/v1/sessions", {"key": "cap-5", "owner": "capped ", "routes": [ROUTE]})
    assert status == 403 and body["policy"] == "owner"
    status, body = as_(cp, CAPPED, "POST", "/v1/sessions", {"key": "cap-5", "routes": [ROUTE]})
    assert status == 403 and body["policy"] == "max_sessions_per_owner" and "'capped'" in body["message"]
    mine = as_(cp, CAPPED, "GET", "/v1/sessions?owner=capped")[1]["sessions"]
    assert len(mine) == 5 and as_(cp, CAPPED, "GET", "/v1/sessions?owner=capped%20")[1]["sessions"] == []


# ---------------------------------------------------------------------- filters that take others' traffic


def test_a_broad_filter_cannot_take_the_requests_another_owners_session_matches(cp: ControlPlane) -> None:
    bob_only = {**ROUTE, "match": {"header": {"name": "x-user", "exact": "bob"}}}
    assert as_(cp, ALICE, "POST", "/v1/sessions", {"id": "alice-bob", "routes": [bob_only]})[0] == 201
    grab = {**ROUTE, "priority": 1_000_000, "match": {"header": {"name": "x-user", "present": True}}}
    status, body = as_(cp, MALLORY, "POST", "/v1/sessions", {"id": "grab", "routes": [grab]})
    assert status == 409 and body["error"] == "conflict"
    assert body["holder"] == "alice-bob" and body["session"] == "grab"
    assert "'grab'" in body["message"] and "'alice-bob'" in body["message"] and "'alice'" in body["message"]
    assert as_(cp, MALLORY, "GET", "/v1/sessions/grab")[0] == 404
    carol = {**ROUTE, "match": {"header": {"name": "x-user", "exact": "carol"}}}
    assert as_(cp, MALLORY, "POST", "/v1/sessions", {"id": "mallory-carol", "routes": [carol]})[0] == 201, \
        "a filter that cannot match alice's requests is fine"


def test_a_catch_all_match_does_not_bypass_forbid_unfiltered_steal(cp: ControlPlane) -> None:
    result = run_cli(cp, "session", "create", "--route", "users=10.0.0.5:8080", "--match", "{path: {prefix: /}}",
                     token=BOB)
    assert result.code == 1, result.out
    assert result.err.startswith("turnout: refused by policy forbid_unfiltered_steal: "), result.err
    never = {"all_of": [{"header": {"name": "x", "exact": "a"}}, {"header": {"name": "x", "exact": "b"}}]}
    for match in ({"path": {"regex": "(x)?"}},
                  {"any_of": [{"header": {"name": "x-user", "exact": "bob"}}, {"path": {"prefix": "/"}}]},
                  {"not": never}):
        status, body = as_(cp, BOB, "POST", "/v1/sessions", {"routes": [{**ROUTE, "match": match}]})
        assert status == 403 and body["policy"] == "forbid_unfiltered_steal", match


# ---------------------------------------------------------------------- audit


def test_every_change_refusal_and_proxy_connect_is_audited(cp: ControlPlane) -> None:
    started = time.time()
    assert as_(cp, BOB, "POST", "/v1/sessions", {"id": "audited", "key": "aud-k", "routes": [ROUTE]})[0] == 201
    assert as_(cp, BOB, "PUT", "/v1/sessions/audited", {"key": "aud-k2", "routes": [ROUTE]})[0] == 200
    assert as_(cp, BOB, "POST", "/v1/sessions/audited/extend", {"ttl_s": 120})[0] == 200
    assert as_(cp, MALLORY, "DELETE", "/v1/sessions/audited")[0] == 403
    assert as_(cp, BOB, "DELETE", "/v1/sessions/audited")[0] == 204
    assert as_(cp, "forged-token", "GET", "/v1/sessions")[0] == 401
    assert as_(cp, BOB, "POST", "/v1/sessions", {"id": "brief", "key": "brief-k", "ttl_s": 1, "routes": [ROUTE]})[0] \
        == 201
    with open_stream(cp.grpc_target, NODE_A, node_id="node-a", timeout_s=2) as call:
        assert first_reply_code(call) is None
    with open_stream(cp.grpc_target, "forged-token", node_id="node-z") as call:
        assert first_reply_code(call) is grpc.StatusCode.UNAUTHENTICATED

    def entries() -> list[dict[str, Any]]:
        status, body = as_(cp, ROOT_TOKEN, "GET", f"/v1/audit?since={started}&limit=1000")
        assert status == 200 and body["all"], body
        return list(body["entries"])

    def complete() -> list[dict[str, Any]] | None:
        got = entries()
        return got if {"expire", "proxy_disconnect"} <= {e["action"] for e in got} else None

    found = eventually(complete, timeout_s=8)
    by_action = {(e["action"], e["session"]): e for e in found}
    assert by_action[("create", "audited")]["identity"] == "bob"
    assert by_action[("update", "audited")]["detail"]["changed"]["key"] == {"from": "aud-k", "to": "aud-k2"}
    assert by_action[("extend", "audited")]["detail"]["expires_at"]["to"] > started
    assert by_action[("delete", "audited")]["identity"] == "bob"
    assert by_action[("refuse", "audited")]["identity"] == "mallory"
    assert by_action[("refuse", "audited")]["outcome"] == "forbidden"
    assert by_action[("refuse", None)]["identity"] == "-" and by_action[("refuse", None)]["outcome"] == "unauthorized"
    assert by_action[("expire", "brief")]["identity"] == "turnout:expiry"
    assert by_action[("proxy_connect", None)]["identity"] == "node-a"
    assert by_action[("proxy_connect", None)]["detail"]["node"] == "node-a"
    assert by_action[("proxy_refuse", None)]["outcome"] == "unauthenticated"
    for entry in found:
        assert entry["source"].startswith(("127.0.0.1:", "ipv4:127.0.0.1:")) or entry["action"] == "expire", entry
    # Each is also one JSON line in the log.
    lines = [json.loads(line)["audit"] for line in cp.log().splitlines() if line.startswith('{"audit":')]
    assert {e["seq"] for e in found} <= {e["seq"] for e in lines}
    # Only what concerns them for others; by session and time; human table.
    mine = run_cli(cp, "audit", "--json", "--session", "audited", "--since", "5m", token=BOB).json()
    assert [e["action"] for e in mine["entries"]] == ["create", "update", "extend", "refuse", "delete"]
    assert not mine["all"]
    table = run_cli(cp, "audit", "--session", "audited", token=BOB)
    assert table.code == 0 and table.out.splitlines()[0].split()[:4] == ["TIME", "IDENTITY", "SOURCE", "ACTION"]
    assert "mallory" in table.out and "forbidden" in table.out


# ---------------------------------------------------------------------- the truth from session create


def test_session_create_exits_non_zero_when_every_proxy_refuses(cp: ControlPlane, tmp_path: Path) -> None:
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    token_file = tmp_path / "proxy.token"
    token_file.write_text(SHARED + "\n")
    config = {
        "listeners": [inbound("users-in", free_port(), "users", baseline.address)],
        "control_plane": {"address": cp.grpc_target, "token_file": str(token_file), "node_id": "proxy-static",
                          "state_path": None},
        "sessions": [{"id": "static-1", "key": "clash", "routes": [{"service": "users",
                                                                     "destination": sandbox.address}]}],
        "limits": {"control_plane_initial_fetch_timeout_s": 2.0, "control_plane_reconnect_base_s": 0.1,
                   "control_plane_reconnect_max_s": 0.5},
    }
    try:
        with running_proxy(config, tmp_path):
            eventually(lambda: in_sync(proxy_record(cp, "proxy-static")))
            refused = run_cli(cp, "session", "create", "--id", "clash", "--key", "clash", "--route",
                              f"users={sandbox.address}", token=BOB)
            assert refused.code == 1, (refused.out, refused.err)
            assert "created session clash" in refused.out and "REFUSED (NACK)" in refused.out
            assert "refused by 1 of 1 proxies" in refused.err and "proxy-static" in refused.err
            assert "already claimed by session 'static-1'" in refused.err
            got = run_cli(cp, "session", "get", "clash", token=BOB)
            assert got.code == 0 and "REFUSED (NACK)" in got.out and "static-1" in got.out
            listed = run_cli(cp, "session", "list", "--owner", "bob", token=BOB)
            row = next(line for line in listed.out.splitlines() if line.startswith("clash "))
            assert row.split()[-1] == "proxy-static"
            accepted = run_cli(cp, "session", "create", "--json", "--id", "fine", "--key", "fine", "--route",
                               f"users={sandbox.address}", token=BOB)
            assert accepted.code == 0, accepted.err
            assert accepted.json()["proxies"] == [{"proxy": "proxy-static", "cluster": "", "state": "acked"}]
    finally:
        baseline.stop()
        sandbox.stop()


# ---------------------------------------------------------------------- abuse of the API port


def test_json_nested_a_thousand_deep_is_400_not_500(cp: ControlPlane) -> None:
    body = b'{"id": "deep", "labels": ' + b"[" * 1200 + b"]" * 1200 + b"}"
    with cp.client(token=ALICE) as http:
        response = http.post("/v1/sessions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nests deeper than" in response.json()["problems"][0]["reason"]
    assert "RecursionError" not in cp.log() and "Traceback" not in cp.log()


@pytest.mark.parametrize("size", [70_000, 120_000])
def test_request_heads_over_64_kib_are_431(cp: ControlPlane, size: int) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * size + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", api_port(cp)), timeout=5) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 431 ") and b'"error": "too_large"' in data


def test_530_idle_unauthenticated_connections_lock_nobody_out(cp: ControlPlane) -> None:
    idle = []
    try:
        for _ in range(530):
            idle.append(socket.create_connection(("127.0.0.1", api_port(cp)), timeout=5))
        started = time.monotonic()
        with cp.client(token=None) as http:
            assert http.get("/healthz").status_code == 200
        with cp.client(token=ALICE) as http:
            assert http.get("/v1/sessions").status_code == 200
        assert time.monotonic() - started < 3, "served at once, not after the idle ones time out"
        with cp.client(token=None) as http:
            metrics = http.get("/metrics").text
        evicted = next(line for line in metrics.splitlines() if line.startswith("turnout_cp_api_connections_evicted "))
        assert float(evicted.split()[1]) >= 530 - 256, "the oldest idle connections were closed to make room"
    finally:
        for sock in idle:
            sock.close()


def test_changes_are_rate_limited_per_identity(cp: ControlPlane) -> None:
    with cp.client(token=MALLORY) as http:  # one connection: 40 changes in well under a second
        responses = [http.delete(f"/v1/sessions/none-{i}") for i in range(40)]
    codes = [r.status_code for r in responses]
    assert codes[0] == 404 and codes.index(429) <= 30 and codes.count(429) >= 5, codes
    limited = responses[codes.index(429)]
    assert int(limited.headers["retry-after"]) >= 1 and "'mallory'" in limited.json()["message"]
    assert as_(cp, ALICE, "GET", "/v1/sessions")[0] == 200, "others are not held back"


# ---------------------------------------------------------------------- abuse of the push port


class DeltaStream:
    """A delta stream as a proxy opens it, with a chosen first request; ``ack`` answers a response."""

    def __init__(self, target: str, token: str, node_id: str, initial: dict[str, str] | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        stub = config_pb2_grpc.SessionDiscoveryStub(self.channel)  # type: ignore[no-untyped-call]
        self.requests: queue.Queue[Any] = queue.Queue()
        self.requests.put(config_pb2.DeltaDiscoveryRequest(node=config_pb2.Node(id=node_id, services=["users"]),
                                                           initial_resource_versions=initial or {}))

        def requests() -> Iterator[Any]:
            while (item := self.requests.get(timeout=15)) is not None:
                yield item

        self.call = stub.DeltaSessions(requests(), metadata=[("authorization", f"Bearer {token}")], timeout=15)

    def first(self) -> Any:
        """The next response, or the RpcError that ended the call."""
        try:
            return next(self.call)
        except grpc.RpcError as exc:
            return exc

    def ack(self, response: Any) -> None:
        self.requests.put(config_pb2.DeltaDiscoveryRequest(response_nonce=response.nonce))

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()


def proxy_record(cp: ControlPlane, node_id: str) -> dict[str, Any] | None:
    return next((p for p in as_(cp, ROOT_TOKEN, "GET", "/v1/proxies")[1]["proxies"] if p["id"] == node_id), None)


def in_sync(record: dict[str, Any] | None) -> bool:
    return record is not None and record["connected"] and record["in_sync"]


def gone(record: dict[str, Any] | None, pruned_ok: bool = False) -> bool:
    """Disconnected (or, with ``pruned_ok``, already forgotten)."""
    return (record is None and pruned_ok) or (record is not None and not record["connected"])


def test_a_second_stream_cannot_take_over_another_proxys_node_id(cp: ControlPlane) -> None:
    victim = DeltaStream(cp.grpc_target, NODE_A, "node-a")
    try:
        first = victim.first()
        assert not isinstance(first, grpc.RpcError)
        victim.ack(first)
        for token in (NODE_B, SHARED):
            thief = DeltaStream(cp.grpc_target, token, "node-a")
            try:
                refused = thief.first()
                assert isinstance(refused, grpc.RpcError) and refused.code() is grpc.StatusCode.PERMISSION_DENIED
                assert "node-a" in (refused.details() or "")
            finally:
                thief.close()
        record = proxy_record(cp, "node-a")
        assert record is not None and record["connected"] and record["identity"] == "node-a", "the victim kept it"
        as_(cp, ALICE, "POST", "/v1/sessions", {"id": "after-theft", "key": "after-theft", "routes": [ROUTE]})
        pushed = victim.first()
        assert [r.name for r in pushed.resources] == ["after-theft"], "the victim's stream still gets pushes"
    finally:
        victim.close()
        as_(cp, ALICE, "DELETE", "/v1/sessions/after-theft")


def test_junk_node_ids_are_refused_and_disconnected_proxies_pruned(cp: ControlPlane) -> None:
    big = DeltaStream(cp.grpc_target, SHARED, "x" * 100_000)
    try:
        refused = big.first()
        assert isinstance(refused, grpc.RpcError) and refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "node.id is longer than 256" in (refused.details() or "")
    finally:
        big.close()
    for i in range(60):
        stream = DeltaStream(cp.grpc_target, SHARED, f"junk-{i:03d}-" + "y" * 200)
        try:
            assert not isinstance(stream.first(), grpc.RpcError)
        finally:
            stream.close()
    eventually(lambda: all(gone(proxy_record(cp, f"junk-{i:03d}-" + "y" * 200), pruned_ok=True) for i in (0, 59)))
    with cp.client(token=ROOT_TOKEN) as http:
        response = http.get("/v1/proxies")
    disconnected = [p for p in response.json()["proxies"] if not p["connected"]]
    assert len(disconnected) <= LIMITS["max_disconnected_proxies"]
    assert len(response.content) < 40_000, "bounded whatever node ids are made up"


def test_fake_initial_resource_versions_are_capped_and_forgotten(cp: ControlPlane) -> None:
    too_many = DeltaStream(cp.grpc_target, SHARED, "fake-1", {f"fake-{i}": "1" for i in range(1001)})
    try:
        refused = too_many.first()
        assert isinstance(refused, grpc.RpcError) and refused.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "1001 initial_resource_versions, over the limit of 1000" in (refused.details() or "")
    finally:
        too_many.close()
    fakes = {f"fake-{i}": "1" for i in range(1000)}
    stream = DeltaStream(cp.grpc_target, SHARED, "fake-2", fakes)
    try:
        first = stream.first()
        assert set(first.removed_resources) == set(fakes), "what the store does not hold is removed, once"
        record = proxy_record(cp, "fake-2")
        assert record is not None and record["tracked_versions"] >= 1000
    finally:
        stream.close()
    eventually(lambda: gone(proxy_record(cp, "fake-2")))
    record = proxy_record(cp, "fake-2")
    assert record is not None and record["tracked_versions"] == 0, "nothing is kept for a proxy that left"


# ---------------------------------------------------------------------- the CLI at the wrong port


def test_the_cli_at_the_grpc_port_prints_one_line_not_a_traceback(cp: ControlPlane) -> None:
    url = f"http://{cp.grpc_target}"
    result = run_cli(None, "session", "list", url=url, token=ALICE)
    assert result.code == 3 and "Traceback" not in result.err and "BadStatusLine" not in result.err
    assert result.err.count("\n") == 1 and url in result.err and "gRPC port" in result.err
