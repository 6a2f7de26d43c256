"""End to end: the real control plane pushing sessions to real proxies over real gRPC.

Two proxies (one incremental, one state-of-the-world) front the service ``users`` in
front of a recording baseline and sandbox; sessions are created through the control
plane's HTTP API and the tests check where real requests go.
"""

from __future__ import annotations

import functools
import http.client
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cp_support import ControlPlane, eventually, running_control_plane, start_control_plane
from tests.integration.support import (
    ProxyProcess,
    RecordingUpstream,
    free_port,
    inbound,
    running_proxy,
    start_proxy,
)


def proxy_config(cp_grpc: str, node_id: str, baseline: str, tmp: Path, protocol: str = "delta",
                 token_file: Path | None = None, static: list[dict[str, Any]] | None = None,
                 **control_plane: Any) -> dict[str, Any]:
    """A proxy fronting ``users`` that takes its sessions from the control plane."""
    cp: dict[str, Any] = {"address": cp_grpc, "protocol": protocol, "node_id": node_id, "cluster": "test",
                          "state_path": str(tmp / f"{node_id}.state.json")}
    if token_file is not None:
        cp["token_file"] = str(token_file)
    cp.update(control_plane)
    return {
        "routing": {"debug_headers": True},
        "listeners": [inbound("users-in", free_port(), "users", baseline)],
        "control_plane": cp,
        "sessions": static or [],
        "limits": {"control_plane_initial_fetch_timeout_s": 2.0, "control_plane_reconnect_base_s": 0.1,
                   "control_plane_reconnect_max_s": 0.5, "upstream_connect_timeout_s": 2.0},
    }


def token_file(tmp: Path, cp: ControlPlane) -> Path:
    path = tmp / "proxy.token"
    path.write_text(str(cp.token) + "\n")
    return path


def served_by(proxy: ProxyProcess, key: str | None = None) -> str:
    """Which upstream answered a request through ``proxy`` (with ``key`` in baggage)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        headers = {} if key is None else {"baggage": "turnout-session=" + key}
        conn.request("GET", "/who", headers=headers)
        resp = conn.getresponse()
        resp.read()
        return str(resp.getheader("x-upstream") or resp.status)
    finally:
        conn.close()


def routes(proxy: ProxyProcess, key: str, upstream: str) -> Callable[[], bool]:
    """A check for ``eventually``: requests with ``key`` reach ``upstream``."""
    return lambda: served_by(proxy, key) == upstream


def session(sid: str, key: str, destination: str, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "key": key, "owner": "tests", "ttl_s": 600,
            "routes": [{"service": "users", "destination": destination}], **extra}


@dataclass
class Fleet:
    """A control plane, two proxies and the upstreams."""

    cp: ControlPlane
    delta: ProxyProcess
    sotw: ProxyProcess
    baseline: RecordingUpstream
    sandbox: RecordingUpstream


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    static = [{"id": "static-1", "key": "static", "routes": [{"service": "users", "destination": sandbox.address}]}]
    try:
        with running_control_plane(tmp) as cp:
            tokens = token_file(tmp, cp)
            delta_config = proxy_config(cp.grpc_target, "proxy-delta", baseline.address, tmp, "delta", tokens, static)
            sotw_config = proxy_config(cp.grpc_target, "proxy-sotw", baseline.address, tmp, "sotw", tokens, static)
            with running_proxy(delta_config, tmp) as delta, running_proxy(sotw_config, tmp) as sotw:
                yield Fleet(cp, delta, sotw, baseline, sandbox)
    finally:
        baseline.stop()
        sandbox.stop()


def test_the_proxies_hold_their_streams_without_loading_grpc(fleet: Fleet) -> None:
    # grpcio costs a process about 13.6 MB; the proxy's channel is turnout's own client.
    def connected(proxy: ProxyProcess) -> bool:
        return bool(json.loads(proxy.admin_get("/config_dump")[1])["control_plane"]["state"] == "connected")

    for proxy in (fleet.delta, fleet.sotw):
        eventually(functools.partial(connected, proxy))
        assert "cygrpc" not in Path(f"/proc/{proxy.process.pid}/maps").read_text()
    assert "cygrpc" in Path(f"/proc/{fleet.cp.process.pid}/maps").read_text()  # the check sees grpcio where it is


def test_create_routes_on_every_proxy_and_delete_returns_to_baseline(fleet: Fleet) -> None:
    proxies = (fleet.delta, fleet.sotw)
    for proxy in proxies:
        assert served_by(proxy, "k-create") == "baseline"
    fleet.cp.create(session("create-1", "k-create", fleet.sandbox.address))
    for proxy in proxies:
        eventually(routes(proxy, "k-create", "sandbox"))
        assert served_by(proxy) == "baseline"  # no key: untouched
        assert served_by(proxy, "k-other") == "baseline"
    fleet.cp.delete("create-1")
    for proxy in proxies:
        eventually(routes(proxy, "k-create", "baseline"))


def test_expiry_returns_to_baseline(fleet: Fleet) -> None:
    fleet.cp.create(session("short", "k-short", fleet.sandbox.address, ttl_s=1.5))
    eventually(lambda: served_by(fleet.delta, "k-short") == "sandbox", timeout_s=1.4)
    eventually(lambda: all(served_by(p, "k-short") == "baseline" for p in (fleet.delta, fleet.sotw)))
    status, _ = fleet.cp.request("GET", "/v1/sessions/short")
    assert status == 404  # the control plane removed it too, and pushed the removal
    eventually(lambda: all(p["in_sync"] and p["sessions"] == 0 for p in fleet.cp.proxies().values()))


def test_both_protocols_converge_and_report_their_versions(fleet: Fleet) -> None:
    for i in range(5):
        fleet.cp.create(session(f"conv-{i}", f"k-conv-{i}", fleet.sandbox.address))
    fleet.cp.delete("conv-2")
    revision = fleet.cp.request("GET", "/v1/sessions")[1]["revision"]

    def synced() -> bool:
        proxies = fleet.cp.proxies()
        return all(proxies[n]["in_sync"] and int(proxies[n]["acked_version"]) >= revision
                   for n in ("proxy-delta", "proxy-sotw"))

    eventually(synced)
    proxies = fleet.cp.proxies()
    assert proxies["proxy-delta"]["protocol"] == "delta" and proxies["proxy-sotw"]["protocol"] == "sotw"
    assert proxies["proxy-delta"]["services"] == ["users"] and proxies["proxy-delta"]["cluster"] == "test"

    def pushed(proxy: ProxyProcess) -> list[dict[str, Any]]:
        dump = json.loads(proxy.admin_get("/config_dump")[1])
        assert dump["control_plane"]["state"] == "connected"
        return [s for s in dump["config"]["snapshot"]["sessions"] if s["id"] != "static-1"]

    assert pushed(fleet.delta) == pushed(fleet.sotw)
    assert sorted(s["id"] for s in pushed(fleet.delta)) == ["conv-0", "conv-1", "conv-3", "conv-4"]
    metrics = fleet.delta.admin_get("/metrics")[1]
    assert 'turnout_control_plane_connected{worker="supervisor"} 1.0' in metrics
    for i in (0, 1, 3, 4):
        fleet.cp.delete(f"conv-{i}")


def test_a_push_the_proxy_refuses_is_nacked_and_the_old_snapshot_stays(fleet: Fleet) -> None:
    fleet.cp.create(session("keeper", "k-keeper", fleet.sandbox.address))
    eventually(lambda: served_by(fleet.delta, "k-keeper") == "sandbox")
    # The control plane accepts it, but both proxies hold a static session with this key.
    clash = session("clash", "static", fleet.baseline.address)
    fleet.cp.create(clash)
    fleet.cp.create(session("after-clash", "k-after", fleet.sandbox.address))

    def nacked() -> dict[str, Any]:
        record = fleet.cp.proxies()["proxy-delta"]
        return record if record["last_nack"] else {}

    record = eventually(nacked)
    assert "already claimed by session 'static-1'" in record["last_nack"]["message"]
    assert record["in_sync"] is False
    for proxy in (fleet.delta, fleet.sotw):
        assert served_by(proxy, "k-keeper") == "sandbox"  # the old snapshot, whole
        assert served_by(proxy, "static") == "sandbox"  # still the static route
        dump = json.loads(proxy.admin_get("/config_dump")[1])
        assert "already claimed" in dump["control_plane"]["last_nack"]["message"]
        metrics = proxy.admin_get("/metrics")[1]
        assert 'turnout_control_plane_updates_total{worker="supervisor",result="nack"}' in metrics
    # Delta isolates the refused session: what came after it is live. State of the world
    # refuses every set that holds it, so the sotw proxy waits for the clash to go.
    eventually(routes(fleet.delta, "k-after", "sandbox"))
    assert served_by(fleet.sotw, "k-after") == "baseline"
    assert fleet.cp.proxies()["proxy-delta"]["rejected"] == ["clash"]
    fleet.cp.delete("clash")
    eventually(lambda: all(p["in_sync"] for p in fleet.cp.proxies().values()))
    eventually(routes(fleet.sotw, "k-after", "sandbox"))
    fleet.cp.delete("keeper")
    fleet.cp.delete("after-clash")


def test_zero_failed_requests_across_20_pushes(fleet: Fleet) -> None:
    stop = threading.Event()
    results: list[str] = []
    errors: list[str] = []

    def load(key: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", fleet.delta.port, timeout=5)
        try:
            while not stop.is_set() and len(results) < 200_000:
                try:
                    conn.request("GET", "/load", headers={"baggage": "turnout-session=" + key})
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        errors.append(f"status {resp.status}")
                    results.append(str(resp.getheader("x-upstream")))
                except (OSError, http.client.HTTPException) as exc:
                    errors.append(repr(exc))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", fleet.delta.port, timeout=5)
        finally:
            conn.close()

    threads = [threading.Thread(target=load, args=(k,)) for k in ("k-load", "k-load", "k-none")]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            fleet.cp.create(session("load", "k-load", fleet.sandbox.address))
            time.sleep(0.1)
            fleet.cp.delete("load")
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:5]
    assert len(results) > 100
    assert set(results) == {"baseline", "sandbox"}  # routed while live, baseline between
    proxies = fleet.cp.proxies()
    assert proxies["proxy-delta"]["last_nack"] is None


def test_control_plane_down_proxies_keep_routing_and_restart_from_the_state_file(tmp_path: Path) -> None:
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    grpc_address = f"127.0.0.1:{free_port()}"
    db = tmp_path / "sessions.db"
    cp = start_control_plane(tmp_path, db=db, grpc=grpc_address)
    proxy = None
    try:
        tokens = token_file(tmp_path, cp)
        config = proxy_config(grpc_address, "survivor", baseline.address, tmp_path, "delta", tokens)
        proxy = start_proxy(config, tmp_path)
        cp.create(session("lasting", "k-lasting", sandbox.address))
        eventually(routes(proxy, "k-lasting", "sandbox"))

        cp.stop(signal.SIGKILL)  # no goodbye
        eventually(lambda: "disconnected" in proxy.admin_get("/ready")[1])  # type: ignore[union-attr]
        status, body = proxy.admin_get("/ready")
        assert status == 200 and "last good set" in body
        assert served_by(proxy, "k-lasting") == "sandbox"

        proxy.stop()  # restart the proxy while the control plane is still down
        proxy = start_proxy(config, tmp_path)  # ready after the 2 s initial-fetch timeout
        assert served_by(proxy, "k-lasting") == "sandbox"
        status, body = proxy.admin_get("/ready")
        assert status == 200 and "version" in body
        dump = json.loads(proxy.admin_get("/config_dump")[1])
        assert dump["control_plane"]["initial_fetch"] == "timed_out"
        assert dump["control_plane"]["state"] != "connected"

        cp = start_control_plane(tmp_path, db=db, grpc=grpc_address)  # back, same database
        eventually(lambda: cp.proxies().get("survivor", {}).get("in_sync"))
        cp.delete("lasting")
        eventually(routes(proxy, "k-lasting", "baseline"))
    finally:
        if proxy is not None:
            proxy.stop()
        cp.stop()
        baseline.stop()
        sandbox.stop()


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_a_proxy_without_valid_credentials_gets_nothing(tmp_path: Path, token: str | None) -> None:
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    try:
        with running_control_plane(tmp_path) as cp:
            cp.create(session("secret", "k-secret", sandbox.address))
            bad = None
            if token is not None:
                bad = tmp_path / "bad.token"
                bad.write_text(token)
            config = proxy_config(cp.grpc_target, "intruder", baseline.address, tmp_path, "delta", bad)
            with running_proxy(config, tmp_path) as proxy:  # ready once the initial fetch times out
                status, body = proxy.admin_get("/ready")
                assert status == 200
                assert "UNAUTHENTICATED" in body and "no pushed sessions" in body
                assert served_by(proxy, "k-secret") == "baseline"
                assert "intruder" not in cp.proxies()
                dump = json.loads(proxy.admin_get("/config_dump")[1])
                assert dump["control_plane"]["initial_fetch"] == "timed_out"
    finally:
        baseline.stop()
        sandbox.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is needed to make a test certificate")
def test_the_push_stream_over_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cp.crt", tmp_path / "cp.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=cp.test",
                    "-addext", "subjectAltName=DNS:cp.test,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    try:
        with running_control_plane(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), ca_file=cert) as cp:
            assert cp.api_url.startswith("https://")
            tokens = token_file(tmp_path, cp)
            config = proxy_config(cp.grpc_target, "tls-proxy", baseline.address, tmp_path, "delta", tokens,
                                  tls={"ca_file": str(cert), "server_name": "cp.test"})
            with running_proxy(config, tmp_path) as proxy:
                dump = json.loads(proxy.admin_get("/config_dump")[1])
                assert dump["control_plane"]["state"] == "connected", dump["control_plane"]
                cp.create(session("over-tls", "k-tls", sandbox.address))
                eventually(lambda: served_by(proxy, "k-tls") == "sandbox")
            # The same proxy without the CA does not trust the control plane.
            config = proxy_config(cp.grpc_target, "no-ca", baseline.address, tmp_path, "delta", tokens, tls=True)
            with running_proxy(config, tmp_path) as proxy:
                assert served_by(proxy, "k-tls") == "baseline"
                assert "no-ca" not in cp.proxies()
    finally:
        baseline.stop()
        sandbox.stop()
