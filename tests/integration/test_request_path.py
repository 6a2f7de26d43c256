"""What a new user hits on the request path, through real proxies, real upstreams and real
clients: the protocol spoken upstream by default, protocol mismatches named as such,
fallbacks that say so, a sandbox that never answers costing its timeout once (outlier
detection), one proxy per listening address, one process per sidecar, explain against a
running proxy, and the proxy's log lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cp_support import eventually, running_control_plane
from tests.integration.support import (
    ROOT,
    RecordingUpstream,
    free_port,
    inbound,
    parse_responses,
    raw_exchange,
    running_proxy,
    start_proxy,
)
from tests.integration.test_config_channel import proxy_config, served_by, session, token_file
from tests.integration.test_http2 import H2Client, H2Upstream


class SilentUpstream:
    """Accepts connections and reads requests, and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)  # held open, never answered

    def stop(self) -> None:
        """Close the listener and every connection."""
        self._stopped = True
        self.sock.close()
        for conn in self._conns:
            conn.close()
        self._thread.join(2)


def get(port: int, path: str = "/", *headers: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request; (status, headers by lower-case name, body)."""
    extra = "".join(h + "\r\n" for h in headers)
    reply = raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: users\r\n{extra}Connection: close\r\n\r\n".encode())
    (response,) = parse_responses(reply)
    return response.status, {k: v for k, v in response.headers}, response.body


@pytest.fixture
def h1_apps() -> Iterator[tuple[RecordingUpstream, RecordingUpstream]]:
    baseline, sandbox = RecordingUpstream("baseline"), RecordingUpstream("sandbox")
    yield baseline, sandbox
    baseline.stop()
    sandbox.stop()


# ------------------------------------------------------------------ protocols


def test_an_http2_client_in_front_of_an_http1_app_works_with_no_configuration(
        tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    baseline, sandbox = h1_apps
    config = {"routing": {"debug_headers": True},
              "listeners": [inbound("in", free_port(), "users", baseline.address)],
              "sessions": [{"id": "s1", "key": "k1", "routes": [{"service": "users", "destination": sandbox.address,
                                                                 "fallback": "error"}]}]}
    with running_proxy(config, tmp_path) as proxy:
        c = H2Client(proxy.port)
        try:
            plain, _ = c.response(c.request("/plain"))
            routed, _ = c.response(c.request("/routed", extra=[("baggage", "turnout-session=k1")]))
        finally:
            c.close()
    assert plain[b":status"] == b"200" and baseline.last().http_version == "1.1"
    # The route says nothing: it follows its listener (HTTP/1.1), never a silent fallback.
    assert routed[b":status"] == b"200" and routed[b"x-turnout-route"] == b"s1"
    assert sandbox.last().target == "/routed" and sandbox.last().http_version == "1.1"


def test_a_protocol_mismatch_is_named_as_such(tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]
                                              ) -> None:
    baseline, sandbox = h1_apps
    h2_only = H2Upstream("h2-only")
    try:
        config = {"routing": {"debug_headers": True},
                  "listeners": [inbound("in", free_port(), "users", baseline.address)],
                  "sessions": [
                      {"id": "says-h2", "key": "h2", "routes": [{"service": "users", "destination": sandbox.address,
                                                                 "upstream_protocol": "http2", "fallback": "error"}]},
                      {"id": "is-h2", "key": "h1", "routes": [{"service": "users", "destination": h2_only.address,
                                                               "fallback": "error"}]},
                      {"id": "falls", "key": "fb", "routes": [{"service": "users", "destination": sandbox.address,
                                                               "upstream_protocol": "http2"}]}]}
        with running_proxy(config, tmp_path) as proxy:
            status, headers, body = get(proxy.port, "/", "baggage: turnout-session=h2")
            assert status == 502 and headers["x-turnout-error"] == "upstream_protocol_mismatch; session=says-h2"
            assert b"answered in HTTP/1.1; set upstream_protocol: http1" in body
            status, headers, body = get(proxy.port, "/", "baggage: turnout-session=h1")
            assert status == 502 and headers["x-turnout-error"] == "upstream_protocol_mismatch; session=is-h2"
            assert b"answered in HTTP/2; set upstream_protocol: http2" in body
            status, headers, _ = get(proxy.port, "/", "baggage: turnout-session=fb")
            assert status == 200 and headers["x-upstream"] == "baseline"
            assert headers["x-turnout-fallback"] == "falls; cause=upstream_protocol_mismatch"
            _, metrics = proxy.admin_get("/metrics")
            assert 'turnout_fallbacks_total{cause="upstream_protocol_mismatch",service="users",worker="0"} 1.0' \
                in metrics
            assert 'cause="connect_failed"' not in metrics
    finally:
        h2_only.stop()


def test_x_forwarded_proto_is_https_on_a_tls_listener_for_both_protocols(
        tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    from tests.integration.test_http2 import make_certificate

    baseline, _ = h1_apps
    cert, key = make_certificate(tmp_path)
    port = free_port()
    config = {"listeners": [{**inbound("in", port, "users", baseline.address),
                             "tls": {"cert_file": cert, "key_file": key}}]}
    with running_proxy(config, tmp_path):
        for flag in ("--http1.1", "--http2"):
            subprocess.run(["curl", "-sk", flag, f"https://127.0.0.1:{port}/tls"], check=True, timeout=10,
                           capture_output=True)
    assert [r.header("x-forwarded-proto") for r in baseline.requests] == ["https", "https"]


# ------------------------------------------------------------------ outlier detection


def test_a_sandbox_that_never_answers_costs_its_timeout_once(tmp_path: Path,
                                                            h1_apps: tuple[RecordingUpstream, RecordingUpstream]
                                                            ) -> None:
    baseline, _ = h1_apps
    silent = SilentUpstream()
    try:
        config = {"routing": {"debug_headers": True},
                  "listeners": [inbound("in", free_port(), "users", baseline.address)],
                  "limits": {"upstream_response_timeout_s": 1.0},
                  "sessions": [{"id": "hung", "key": "k", "routes": [{"service": "users",
                                                                      "destination": silent.address}]}]}
        with running_proxy(config, tmp_path) as proxy:
            started = time.monotonic()
            status, headers, _ = get(proxy.port, "/", "baggage: turnout-session=k")
            first = time.monotonic() - started
            assert status == 200 and headers["x-upstream"] == "baseline" and 1.0 <= first < 3.0
            assert headers["x-turnout-fallback"] == "hung; cause=upstream_timeout"
            started = time.monotonic()
            status, headers, _ = get(proxy.port, "/", "baggage: turnout-session=k")
            assert time.monotonic() - started < 0.5  # ejected: the fallback applies at once
            assert status == 200 and headers["x-turnout-fallback"] == "hung; cause=sandbox_ejected"
            assert silent.accepted == 1
            _, metrics = proxy.admin_get("/metrics")
            assert 'turnout_outlier_ejections_total{service="users",worker="0"} 1.0' in metrics
            _, dump = proxy.admin_get("/config_dump")
            (outlier,) = json.loads(dump)["config"]["upstreams"]["outliers"]
            assert outlier["destination"] == silent.address and outlier["ejected_for_s"] > 0
            _, explained = proxy.admin_get("/explain?service=users&header=baggage:turnout-session%3Dk")
            report = json.loads(explained)
            assert report["decision"]["ejected"]["last_cause"] == "upstream_timeout"
            assert "baseline answers" in report["outlier"]
    finally:
        silent.stop()


# ------------------------------------------------------------------ processes


def test_a_second_proxy_on_the_same_address_fails_to_start(tmp_path: Path,
                                                          h1_apps: tuple[RecordingUpstream, RecordingUpstream]
                                                          ) -> None:
    baseline, sandbox = h1_apps
    port = free_port()
    with running_proxy({"listeners": [inbound("users-in", port, "users", baseline.address)]}, tmp_path) as first:
        second = start_proxy({"listeners": [inbound("orders-in", port, "orders", sandbox.address)]}, tmp_path,
                             wait_ready=False)
        try:
            code = second.process.wait(20)
        finally:
            second.stop(signal.SIGKILL)
        assert code == 1
        assert f"cannot listen on 127.0.0.1:{port}" in second.log() and "in use" in second.log()
        for _ in range(6):  # every request still reaches the first proxy's service
            assert get(first.port)[1]["x-upstream"] == "baseline"
    assert not sandbox.requests


def test_one_worker_is_one_process(tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    baseline, _ = h1_apps
    with running_proxy({"listeners": [inbound("in", free_port(), "users", baseline.address)]}, tmp_path) as proxy:
        assert get(proxy.port)[0] == 200
        _, dump = proxy.admin_get("/config_dump")
        (worker,) = json.loads(dump)["workers"]
        assert worker["pid"] == proxy.process.pid and worker["in_process"] is True
        children = Path(f"/proc/{proxy.process.pid}/task/{proxy.process.pid}/children").read_text().split()
        assert children == []


def test_worker_processes_take_their_config_from_the_supervisor(
        tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    baseline, _ = h1_apps
    with running_proxy({"listeners": [inbound("in", free_port(), "users", baseline.address)]}, tmp_path,
                       workers=2) as proxy:
        proxy.config_path.unlink()  # nothing can read it any more
        _, dump = proxy.admin_get("/config_dump")
        victim = json.loads(dump)["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            workers = json.loads(proxy.admin_get("/config_dump")[1])["workers"]
            return bool(workers[0]["pid"] != victim and workers[0]["up"] and workers[0]["restarts"] == 1)
        eventually(restarted, 15)
        for _ in range(10):  # both workers serve, the restarted one with the config it was sent
            assert get(proxy.port)[0] == 200
    assert "cannot read" not in proxy.log()


def test_log_lines_carry_timestamps_and_reload_and_drain_are_logged(
        tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    baseline, _ = h1_apps
    proxy = start_proxy({"listeners": [inbound("in", free_port(), "users", baseline.address)]}, tmp_path)
    try:
        proxy.process.send_signal(signal.SIGHUP)
        eventually(lambda: "reload:" in proxy.log(), 10)
    finally:
        assert proxy.stop() == 0
    lines = [line for line in proxy.log().splitlines() if line]
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z turnout\[\d+\] (INFO|WARNING|ERROR) ")
    assert lines and all(stamp.match(line) for line in lines), lines
    text = "\n".join(lines)
    assert "ready: 1 worker(s) in this process" in text
    assert "configuration reloaded" in text
    assert "draining 0 connection(s)" in text and "drained" in text


# ------------------------------------------------------------------ explain and the state file


def test_explain_asks_the_running_proxy_so_pushed_sessions_count(
        tmp_path: Path, h1_apps: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    baseline, sandbox = h1_apps
    with running_control_plane(tmp_path) as cp:
        config = proxy_config(cp.grpc_target, "explain-node", baseline.address, tmp_path,
                              token_file=token_file(tmp_path, cp))
        config["admin"] = {"address": f"127.0.0.1:{free_port()}"}
        del config["control_plane"]["state_path"]  # the default one, which the proxy names
        env_state = tmp_path / "state-home"
        os.environ["TURNOUT_STATE_DIR"] = str(env_state)
        try:
            proxy = start_proxy(config, tmp_path)
        finally:
            del os.environ["TURNOUT_STATE_DIR"]
        try:
            assert cp.request("POST", "/v1/sessions", session("pushed", "kp", sandbox.address))[0] == 201
            eventually(lambda: served_by(proxy, "kp") == "sandbox")
            admin = config["admin"]["address"]
            args = ["explain", "--service", "users", "-H", "baggage: turnout-session=kp"]
            line = _turnout(*args, "--admin", admin)
            assert line.returncode == 0, line.stderr
            assert line.stdout.count("\n") == 1
            assert f"-> sandbox {sandbox.address} (session pushed" in line.stdout and "upstream http1" in line.stdout
            steps = json.loads(_turnout(*args, "--admin", admin, "--json").stdout)
            assert steps["decision"]["session"] == "pushed" and steps["key"]["value"] == "kp"
            unreachable = _turnout(*args, "--admin", f"127.0.0.1:{free_port()}")
            assert unreachable.returncode == 1 and "cannot reach the proxy's admin address" in unreachable.stderr
            assert "Traceback" not in unreachable.stderr
        finally:
            proxy.stop()
        expected = env_state / "explain-node.state.json"
        assert f"state file: {expected} (the default; control_plane.state_path changes it)" in proxy.log()
        assert expected.exists()


def _turnout(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turnout.cli", *args], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)

