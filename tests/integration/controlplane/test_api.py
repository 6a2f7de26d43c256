"""The HTTP API of a real control plane, driven with httpx (and raw sockets for bad framing)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from tests.integration.cp_support import ROUTE, ControlPlane, run_cli, running_control_plane, write_policy


def test_create_get_list_extend_delete(control_plane: ControlPlane) -> None:
    with control_plane.client() as http:
        spec = {"id": "crud-1", "key": "crud-key", "owner": "alice", "labels": {"team": "payments"}, "ttl_s": 600,
                "routes": [ROUTE, {"service": "orders", "destination": "10.0.0.6:80", "mode": "mirror",
                                   "match": {"header": {"name": "x-user", "exact": "alice"}}}]}
        before = time.time()
        created = http.post("/v1/sessions", json=spec)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/v1/sessions/crud-1"
        body = created.json()
        session, revision = body["session"], body["revision"]
        assert before <= session["created_at"] <= time.time()
        assert session["expires_at"] == session["created_at"] + 600
        assert session["routes"][1]["match"] == {"header": {"name": "x-user", "exact": "alice"}}

        got = http.get("/v1/sessions/crud-1")
        assert got.status_code == 200 and got.json() == {**body, "proxies": []}, "no proxy fronts users here"

        listed = http.get("/v1/sessions", params={"owner": "alice"}).json()
        assert [s["session"]["id"] for s in listed["sessions"]] == ["crud-1"]
        assert listed["revision"] >= revision
        assert http.get("/v1/sessions", params={"owner": "nobody"}).json()["sessions"] == []

        extended = http.post("/v1/sessions/crud-1/extend", json={"ttl_s": 3600})
        assert extended.status_code == 200 and extended.json()["revision"] == revision + 1
        assert extended.json()["session"]["expires_at"] >= before + 3600

        deleted = http.delete("/v1/sessions/crud-1")
        assert deleted.status_code == 204 and deleted.content == b""
        for response in (http.get("/v1/sessions/crud-1"), http.delete("/v1/sessions/crud-1"),
                         http.post("/v1/sessions/crud-1/extend", json={"ttl_s": 60})):
            assert response.status_code == 404 and response.json()["error"] == "not_found"


def test_invalid_lists_every_problem(control_plane: ControlPlane) -> None:
    with control_plane.client() as http:
        response = http.post("/v1/sessions", json={
            "id": "-bad", "key": "ok", "created_at": 1, "routes": [
                {"service": "users", "destination": "nohost"},
                {"service": "orders", "destination": "10.0.0.1:80", "fallback": "maybe",
                 "match": {"header": {"name": "x", "regex": "(?!a)b"}}},
            ]})
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "invalid"
        assert {p["field"] for p in body["problems"]} == {
            "session.created_at", "session.id", "session.routes[0].destination", "session.routes[1].fallback",
            "session.routes[1].match.header.regex"}
        assert all(p["reason"] for p in body["problems"])
        response = http.post("/v1/sessions", content=b"{not json", headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["problems"][0]["field"] == "body"


def test_numbers_too_long_to_convert_are_400_naming_the_field(control_plane: ControlPlane) -> None:
    # 5,000 digits: Python's JSON decoder refuses more than 4,300 with a ValueError whose
    # message is about sys.set_int_max_str_digits; the answer names the field instead.
    digits = b"7" * 5000
    with control_plane.client() as http:
        response = http.post("/v1/sessions", headers={"content-type": "application/json"},
                             content=b'{"key": "k", "priority": ' + digits + b', "routes": [{"service": "users", '
                                     b'"destination": "10.0.0.5:8080"}]}')
        assert response.status_code == 400, response.text
        assert response.json()["problems"] == [
            {"field": "session.priority", "reason": "a number of 5000 characters; numbers are at most 100"}]
        assert http.post("/v1/sessions", json={"id": "long-1", "key": "long", "routes": [ROUTE]}).status_code == 201
        response = http.post("/v1/sessions/long-1/extend", headers={"content-type": "application/json"},
                             content=b'{"ttl_s": ' + digits + b"}")
        assert response.status_code == 400 and response.json()["problems"][0]["field"] == "ttl_s", response.text
        # Short enough to convert, too large to add to a float time: refused, not a 500.
        response = http.post("/v1/sessions/long-1/extend", json={"ttl_s": 10**99})
        assert response.status_code == 400 and response.json()["problems"][0]["field"] == "ttl_s", response.text
        response = http.get("/v1/audit", params={"limit": "1" * 5000})
        assert response.status_code == 400 and response.json()["problems"][0]["field"] == "limit", response.text
        assert http.get("/healthz").status_code == 200


def test_conflict_names_the_holder(control_plane: ControlPlane) -> None:
    with control_plane.client() as http:
        assert http.post("/v1/sessions", json={"id": "holder-1", "key": "shared", "routes": [ROUTE]}).status_code == 201
        response = http.post("/v1/sessions", json={"id": "second-1", "key": "shared", "routes": [ROUTE]})
        assert response.status_code == 409
        body = response.json()
        assert body["error"] == "conflict" and body["holder"] == "holder-1" and "holder-1" in body["message"]
        assert http.post("/v1/sessions", json={"id": "holder-1", "key": "else", "routes": [ROUTE]}).status_code == 409
        http.delete("/v1/sessions/holder-1")


def test_unauthorized(control_plane: ControlPlane) -> None:
    for token in (None, "wrong-token"):
        with control_plane.client(token=token) as http:
            for response in (http.get("/v1/sessions"), http.get("/v1/proxies"),
                             http.post("/v1/sessions", json={"key": "k", "routes": [ROUTE]}),
                             http.delete("/v1/sessions/anything")):
                assert response.status_code == 401
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert response.json()["error"] == "unauthorized"
            # No token needed for health and metrics.
            assert http.get("/healthz").status_code == 200
            assert http.get("/metrics").status_code == 200
    with control_plane.client() as http:
        assert http.get("/v1/sessions/never-created").status_code == 404, "nothing was created without a token"


def test_metrics(control_plane: ControlPlane) -> None:
    with control_plane.client() as http:
        http.post("/v1/sessions", json={"id": "metrics-open", "routes": [ROUTE]})  # forbid_unfiltered_steal
        text = http.get("/metrics").text
    assert "turnout_cp_sessions " in text and "turnout_cp_revision " in text
    assert 'turnout_cp_policy_refusals_total{policy="forbid_unfiltered_steal"}' in text
    assert 'turnout_cp_api_requests_total{code="403",method="POST"}' in text


def test_bounded_body_and_bad_framing_get_json_errors(control_plane: ControlPlane) -> None:
    with control_plane.client() as http:
        response = http.post("/v1/sessions", content=b"x" * ((1 << 20) + 1))
        assert response.status_code == 413 and response.json()["error"] == "too_large"
    host, port = control_plane.api_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 400 ") and b'"error": "bad_request"' in data


def test_keep_alive(control_plane: ControlPlane) -> None:
    ports = set()
    with control_plane.client() as http:
        for _ in range(3):
            response = http.get("/healthz")
            assert response.status_code == 200
            stream = response.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
    assert len(ports) == 1, "one connection for all three requests"


def test_policy_refusals(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, {
        "allowed_services": ["users", "orders-*"],
        "allowed_destinations": ["10.0.0.0/8", "*.sandbox.svc.cluster.local"],
        "max_sessions_per_owner": 2,
        "max_ttl_s": 3600,
        "default_ttl_s": 600,
    })
    with running_control_plane(tmp_path, "--policy", str(policy)) as cp, cp.client() as http:
        def refused(spec: dict[str, object]) -> str:
            response = http.post("/v1/sessions", json=spec)
            assert response.status_code == 403, response.text
            body = response.json()
            assert body["error"] == "policy" and body["message"]
            return str(body["policy"])

        assert refused({"routes": [ROUTE], "owner": "a"}) == "forbid_unfiltered_steal"
        assert refused({"key": "k1", "ttl_s": 7200, "routes": [ROUTE], "owner": "a"}) == "max_ttl_s"
        assert refused({"key": "k1", "owner": "a",
                        "routes": [{"service": "users", "destination": "8.8.8.8:80"}]}) == "allowed_destinations"
        assert refused({"key": "k1", "owner": "a",
                        "routes": [{"service": "billing", "destination": "10.0.0.1:80"}]}) == "allowed_services"
        for i in range(2):
            ok = http.post("/v1/sessions", json={"key": f"own{i}", "owner": "carol", "routes": [
                {"service": "orders-eu", "destination": "api.carol.sandbox.svc.cluster.local:8080"}]})
            assert ok.status_code == 201, ok.text
            assert ok.json()["session"]["expires_at"] - ok.json()["session"]["created_at"] == 600
        assert refused({"key": "own3", "owner": "carol", "routes": [ROUTE]}) == "max_sessions_per_owner"
        assert http.post("/v1/sessions", json={"key": "own3", "owner": "dave", "routes": [ROUTE]}).status_code == 201
        sid = http.get("/v1/sessions", params={"owner": "dave"}).json()["sessions"][0]["session"]["id"]
        response = http.post(f"/v1/sessions/{sid}/extend", json={"ttl_s": 7200})
        assert response.status_code == 403 and response.json()["policy"] == "max_ttl_s"


def test_a_limits_policy_turns_into_400_problems(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, {"limits": {"max_routes_per_session": 1, "max_literal_chars": 4}})
    with running_control_plane(tmp_path, "--policy", str(policy)) as cp, cp.client() as http:
        response = http.post("/v1/sessions", json={"key": "k", "routes": [
            ROUTE, {"service": "orders", "destination": "10.0.0.1:80",
                    "match": {"header": {"name": "x-user", "exact": "alice"}}}]})
        assert response.status_code == 400
        assert [p["field"] for p in response.json()["problems"]] == ["session.routes"]


def test_without_auth_an_admin_token_is_generated_for_the_cli_on_this_machine(tmp_path: Path) -> None:
    with running_control_plane(tmp_path, token=None) as cp:
        path = tmp_path / "state" / "turnout" / f"control-plane-{cp.api_url.rsplit(':', 1)[1]}.token"
        assert f"admin token in {path}" in cp.ready_line
        assert path.stat().st_mode & 0o777 == 0o600
        with httpx.Client(base_url=cp.api_url) as http:
            assert http.post("/v1/sessions", json={"key": "k", "routes": [ROUTE]}).status_code == 401, \
                "nothing is open"
        created = run_cli(cp, "session", "create", "--json", "--key", "k", "--route", "users=10.0.0.5:8080",
                          token=None, state=tmp_path)
        assert created.code == 0, created.err
        assert created.json()["session"]["owner"] == "admin"
        whoami = run_cli(cp, "whoami", "--json", token=None, state=tmp_path).json()
        assert whoami["admin"] and whoami["proxy"] and whoami["via"] == "generated token"
        assert cp.stop() == 0
    assert not path.exists(), "the token dies with the run"
