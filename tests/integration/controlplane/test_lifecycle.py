"""A real control plane over time: restarts, TTL expiry, policy reload on SIGHUP, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.cp_support import (
    ROOT,
    ROUTE,
    run_cli,
    running_control_plane,
    start_control_plane,
    state_env,
    write_policy,
)


def test_sessions_and_revision_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "kept.db"
    with running_control_plane(tmp_path, db=db) as cp:
        with cp.client() as http:
            assert http.post("/v1/sessions", json={"id": "kept-1", "key": "k1", "routes": [ROUTE]}).status_code == 201
            assert http.post("/v1/sessions", json={"id": "gone-1", "key": "k2", "routes": [ROUTE]}).status_code == 201
            assert http.delete("/v1/sessions/gone-1").status_code == 204
            before = http.get("/v1/sessions").json()
        created = run_cli(cp, "session", "create", "--json", "--no-wait", "--id", "kept-2", "--key", "k3",
                          "--route", "orders=10.0.0.9:80", "--ttl", "1h")
        assert created.code == 0, created.err
        before["sessions"].append(created.json())
        before["revision"] = created.json()["revision"]
        assert cp.stop() == 0
    with running_control_plane(tmp_path, db=db) as cp:
        assert f"revision {before['revision']}, 2 session(s)" in cp.ready_line
        with cp.client() as http:
            assert http.get("/v1/sessions").json() == before
            conflict = http.post("/v1/sessions", json={"key": "k1", "routes": [ROUTE]})
            assert conflict.status_code == 409 and conflict.json()["holder"] == "kept-1", "claims are reloaded"
            again = http.post("/v1/sessions", json={"id": "gone-1", "key": "k2", "routes": [ROUTE]})
            assert again.json()["revision"] == before["revision"] + 1, "the revision continues, never reused"


def test_expiry_removes_a_session(tmp_path: Path) -> None:
    with running_control_plane(tmp_path) as cp, cp.client() as http:
        created = http.post("/v1/sessions", json={"id": "short-1", "key": "k", "ttl_s": 1, "routes": [ROUTE]})
        assert created.status_code == 201
        kept = http.post("/v1/sessions", json={"id": "long-1", "key": "k2", "ttl_s": 3600, "routes": [ROUTE]})
        assert kept.status_code == 201
        deadline = time.monotonic() + 6
        while http.get("/v1/sessions/short-1").status_code == 200:
            assert time.monotonic() < deadline, "not expired 5 s after its 1 s TTL"
            time.sleep(0.05)
        assert time.time() >= created.json()["session"]["expires_at"]
        assert http.get("/v1/sessions/long-1").status_code == 200
        assert http.get("/v1/sessions").json()["revision"] == kept.json()["revision"] + 1, "the expiry is a change"
        assert "turnout_cp_sessions_expired_total 1.0" in http.get("/metrics").text
        # The claim is free again.
        assert http.post("/v1/sessions", json={"key": "k", "routes": [ROUTE]}).status_code == 201
    assert "expired 1 session(s): short-1" in cp.log()


def test_sighup_reloads_the_policy_and_keeps_it_when_invalid(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, {"max_ttl_s": 600, "default_ttl_s": 300})
    with running_control_plane(tmp_path, "--policy", str(policy)) as cp, cp.client() as http:
        def create(key: str) -> int:
            return http.post("/v1/sessions", json={"key": key, "ttl_s": 3600, "routes": [ROUTE]}).status_code

        assert create("a") == 403
        write_policy(tmp_path, {"max_ttl_s": 7200})
        cp.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while create("a") != 201:
            assert time.monotonic() < deadline, "policy not reloaded:\n" + cp.log()
            time.sleep(0.05)

        write_policy(tmp_path, {"max_ttl_s": 7200, "no_such_rule": True})
        cp.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while 'turnout_cp_policy_reloads_total{result="invalid"} 1.0' not in http.get("/metrics").text:
            assert time.monotonic() < deadline, cp.log()
            time.sleep(0.05)
        assert create("b") == 201, "the previous valid policy stays in force"
        assert http.post("/v1/sessions", json={"key": "c", "ttl_s": 7201, "routes": [ROUTE]}).status_code == 403
        assert "policy.no_such_rule: unknown policy field" in cp.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_it_cleanly(tmp_path: Path, sig: int) -> None:
    cp = start_control_plane(tmp_path)
    try:
        with cp.client() as http:
            assert http.get("/healthz").status_code == 200
            # An idle keep-alive connection must not hold up the exit.
            started = time.monotonic()
            assert cp.stop(sig) == 0
            assert time.monotonic() - started < 4
    finally:
        if cp.process.poll() is None:
            cp.process.kill()
            cp.process.wait(5)


def test_a_second_control_plane_on_the_same_db_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "shared.db"
    with running_control_plane(tmp_path, db=db):
        result = subprocess.run(
            [sys.executable, "-m", "turnout.cli", "control-plane", "--api", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
             "--db", str(db)],
            capture_output=True, text=True, cwd=ROOT, timeout=30, check=False, env=state_env(tmp_path))
        assert result.returncode == 2 and "in use by another control plane" in result.stderr, result.stderr
