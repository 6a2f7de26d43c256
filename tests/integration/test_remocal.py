"""Remocal on loopback: a session's sandbox is a process on "this machine", behind a tunnel.

Real processes throughout: the control plane, a proxy taking its sessions from it, ``turnout
gateway``, ``turnout connect`` (each a subprocess), recording HTTP/1.1 and grpcio servers as
the baselines and the local processes, and real clients (httpx over HTTP/1.1 and HTTP/2,
grpcio). Every process is stopped by its PID in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tests.integration.cp_support import (
    ROOT,
    TOKEN,
    ControlPlane,
    eventually,
    run_cli,
    running_control_plane,
    state_env,
    write_auth,
    write_policy,
    write_token,
    write_tokens,
)
from tests.integration.support import ProxyProcess, RecordingUpstream, free_port, inbound, running_proxy, stop_process
from tests.integration.test_grpc import SERVICE, GrpcUpstream

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef"
GATEWAY = "gateway-token-0123456789abcdef"
READY_RE = re.compile(r"tunnels on (?:tcp|tls) ([0-9.]+):(\d+).*admin http://([0-9.]+):(\d+)")


@dataclass
class Gateway:
    """``turnout gateway`` as a subprocess."""

    process: subprocess.Popen[str]
    tunnel_address: str
    admin_url: str
    log_path: Path

    def log(self) -> str:
        """What it logged."""
        return self.log_path.read_text(errors="replace")


@dataclass
class Connect:
    """``turnout connect --json`` as a subprocess, and the events it printed."""

    process: subprocess.Popen[bytes]
    events: list[dict[str, Any]] = field(default_factory=list)
    err_path: Path | None = None
    _partial: bytes = b""

    def _read(self, timeout_s: float) -> bool:
        """Read what the process wrote (raw reads: a buffered readline would hide lines from
        select); False at its end."""
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout_s)
        if not ready:
            return True
        data = os.read(stdout.fileno(), 65536)
        if not data:
            return False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self.events.extend(json.loads(line) for line in lines if line.strip())
        return True

    def wait_for(self, kind: str, timeout_s: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first event of ``kind`` (at index ``after`` or later), reading output until it comes."""
        deadline = time.monotonic() + timeout_s
        while True:
            for event in self.events[after:]:
                if event.get("event") == kind:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} event in {timeout_s} s; events {self.events}; "
                                     f"stderr {self.stderr()}")
            if not self._read(left) and not any(e.get("event") == kind for e in self.events[after:]):
                self.process.wait(5)
                raise AssertionError(f"connect exited ({self.process.returncode}) before {kind!r}; events "
                                     f"{self.events}; stderr {self.stderr()}")

    def drain(self) -> list[dict[str, Any]]:
        """Every event until the process exits (call after stopping it)."""
        while self._read(10):
            pass
        return self.events

    def stderr(self) -> str:
        """What it wrote to standard error."""
        return self.err_path.read_text(errors="replace") if self.err_path is not None else ""

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = 15) -> int:
        """Signal it and wait for its status (killed if it hangs)."""
        return stop_process(self.process, sig, timeout_s)


@dataclass
class Stack:
    """Control plane, proxy, gateway and the upstreams."""

    tmp: Path
    cp: ControlPlane
    proxy: ProxyProcess
    gateway: Gateway
    baseline: RecordingUpstream
    local: RecordingUpstream
    grpc_baseline: GrpcUpstream
    grpc_local: GrpcUpstream
    echo_port: int
    orders_baseline: RecordingUpstream
    orders_sandbox: RecordingUpstream
    orders_port: int

    def connect(self, *args: str, token: str = ALICE) -> Connect:
        """Start ``turnout connect --json`` with ``token`` (stopped by the test's ``finally``)."""
        env = state_env(self.tmp)
        env.update(TURNOUT_CONTROL_PLANE=self.cp.api_url, TURNOUT_TOKEN=token,
                   TURNOUT_GATEWAY=self.gateway.tunnel_address)
        err_path = self.tmp / f"connect-{time.monotonic_ns()}.err"
        with open(err_path, "wb") as err:
            process = subprocess.Popen([sys.executable, "-m", "turnout.cli", "connect", "--json", *args],
                                       stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        return Connect(process, err_path=err_path)

    def get(self, key: str | None, path: str = "/", http2: bool = False) -> httpx.Response:
        """One request to the users listener, with the key in baggage when given."""
        headers = {"baggage": f"turnout-session={key}"} if key else {}
        with httpx.Client(http1=not http2, http2=http2, timeout=10) as client:
            return client.get(f"{self.proxy.url}{path}", headers=headers)


@contextlib.contextmanager
def running_gateway(tmp: Path, cp: ControlPlane, *extra: str) -> Iterator[Gateway]:
    """``turnout gateway`` on free ports, stopped at the end."""
    token = write_token(tmp, "gateway.token", GATEWAY)
    log_path = tmp / f"gateway-{time.monotonic_ns()}.log"
    args = [sys.executable, "-m", "turnout.cli", "gateway", "--listen", "127.0.0.1:0", "--data-host", "127.0.0.1",
            "--control-plane", cp.api_url, "--token-file", str(token), "--admin", "127.0.0.1:0",
            "--report-interval", "1", *(extra or ("--id", "gw-test"))]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=state_env(tmp), cwd=ROOT)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20)
        line = process.stdout.readline() if ready else ""
        match = READY_RE.search(line)
        if match is None:
            raise RuntimeError(f"gateway not ready: {line!r}\n{log_path.read_text()}")
        host, port, admin_host, admin_port = match.groups()
        yield Gateway(process, f"{host}:{port}", f"http://{admin_host}:{admin_port}", log_path)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            stop_process(process, signal.SIGTERM, 10)
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole stack, once for the module."""
    tmp = tmp_path_factory.mktemp("remocal")
    tokens = write_tokens(tmp, {ALICE: {"identity": "alice", "groups": ["developers"]},
                                BOB: {"identity": "bob", "groups": ["developers"]}})
    auth = write_auth(tmp, {"tokens_file": str(tokens)})
    # Outgoing calls may reach loopback only (the "cluster" here); tunnel routes are not checked.
    policy = write_policy(tmp, {"allowed_destinations": ["127.0.0.0/8"]})
    baseline = RecordingUpstream("baseline")
    orders_baseline = RecordingUpstream("orders-baseline")
    orders_sandbox = RecordingUpstream("orders-sandbox")
    local = RecordingUpstream("local")
    grpc_baseline = GrpcUpstream("baseline")
    grpc_local = GrpcUpstream("local")
    try:
        with running_control_plane(tmp, "--auth", str(auth), "--policy", str(policy), "--gateway-token-file",
                                   str(write_token(tmp, "gw-cp.token", GATEWAY))) as cp:
            proxy_token = write_token(tmp, "proxy.token", TOKEN)
            echo_port = free_port()
            orders_port = free_port()
            config = {
                "routing": {"debug_headers": True},
                "listeners": [inbound("users-in", free_port(), "users", baseline.address),
                              inbound("echo-in", echo_port, "echo", grpc_baseline.address),
                              inbound("orders-in", orders_port, "orders", orders_baseline.address)],
                "control_plane": {"address": cp.grpc_target, "node_id": "node-1", "cluster": "test",
                                  "token_file": str(proxy_token), "state_path": str(tmp / "node-1.state.json")},
                "limits": {"control_plane_initial_fetch_timeout_s": 2.0, "control_plane_reconnect_base_s": 0.1,
                           "control_plane_reconnect_max_s": 0.5, "upstream_connect_timeout_s": 2.0},
            }
            with running_proxy(config, tmp) as proxy, running_gateway(tmp, cp) as gateway:
                eventually(lambda: cp.proxies().get("node-1", {}).get("connected"))
                yield Stack(tmp, cp, proxy, gateway, baseline, local, grpc_baseline, grpc_local, echo_port,
                            orders_baseline, orders_sandbox, orders_port)
    finally:
        baseline.stop()
        local.stop()
        grpc_baseline.stop()
        grpc_local.stop()
        orders_baseline.stop()
        orders_sandbox.stop()


@contextlib.contextmanager
def connected(stack: Stack, *args: str, token: str = ALICE) -> Iterator[tuple[Connect, dict[str, Any]]]:
    """A ``turnout connect`` whose tunnel is up (its session event), stopped at the end."""
    connect = stack.connect(*args, token=token)
    try:
        session = connect.wait_for("session")
        connect.wait_for("connected")
        yield connect, session
    finally:
        with contextlib.suppress(Exception):
            connect.stop()
        if connect.process.poll() is None:
            connect.process.kill()
            connect.process.wait(5)
        if connect.process.stdout is not None:
            connect.process.stdout.close()


def _served_by(response: httpx.Response) -> str:
    return str(response.headers.get("x-upstream"))


def _routed(stack: Stack, key: str, label: str = "local") -> bool:
    return _served_by(stack.get(key)) == label


def test_http1_and_http2_requests_with_the_key_reach_the_local_process(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-http") as (_, event):
        session_id = event["session"]["id"]
        assert event["session"]["routes"][0]["destination"] == "tunnel"
        eventually(lambda: _routed(stack, "k-http"))
        response = stack.get("k-http", "/api/users?x=1")
        assert response.status_code == 200 and _served_by(response) == "local"
        assert response.headers["x-turnout-route"] == session_id
        assert stack.local.last().target == "/api/users?x=1"
        assert "turnout-session=k-http" in str(stack.local.last().header("baggage"))
        h2 = stack.get("k-http", "/h2", http2=True)
        assert h2.http_version == "HTTP/2" and _served_by(h2) == "local"
        assert stack.local.last().target == "/h2"
        post = httpx.post(stack.proxy.url + "/upload", content=b"x" * 300_000,
                          headers={"baggage": "turnout-session=k-http"}, timeout=10)
        assert _served_by(post) == "local" and stack.local.last().body == b"x" * 300_000
        # Without the key, and with another key: baseline.
        assert _served_by(stack.get(None)) == "baseline"
        assert _served_by(stack.get("someone-else")) == "baseline"
        # The control plane shows the tunnel on the session.
        status, body = stack.cp.request("GET", "/v1/sessions/" + session_id, token=ALICE)
        assert status == 200 and body["tunnel"]["gateway"] == "gw-test"
        assert body["tunnel"]["identity"] == "alice"
        tunnel_id = body["tunnel"]["id"]
        # Seeing it: session get, status, explain, the gateway's /tunnels and /metrics.
        got = run_cli(stack.cp, "session", "get", session_id, token=ALICE)
        assert got.code == 0 and "TUNNEL" in got.out and tunnel_id in got.out and "gw-test" in got.out, got
        listed = run_cli(stack.cp, "status", token=ALICE)
        assert listed.code == 0 and session_id in listed.out and tunnel_id in listed.out, listed
        report = json.loads(stack.proxy.admin_get("/explain?service=users&header=baggage:turnout-session%3Dk-http")[1])
        assert report["decision"]["tunnel"] == f"{tunnel_id} on gateway gw-test"
        assert report["decision"]["tunnel_connected"] is True
        tunnels = httpx.get(stack.gateway.admin_url + "/tunnels", timeout=5).json()["tunnels"]
        assert [(t["id"], t["session"]) for t in tunnels] == [(tunnel_id, session_id)]
        assert tunnels[0]["requests"] >= 4
        metrics = httpx.get(stack.gateway.admin_url + "/metrics", timeout=5).text
        lines = [line for line in metrics.splitlines() if line.startswith("turnout_gateway_tunnel_requests_total{")]
        assert len(lines) == 1 and f'tunnel="{tunnel_id}"' in lines[0] and f'session="{session_id}"' in lines[0]


def test_grpc_unary_and_server_streaming_over_the_tunnel(stack: Stack) -> None:
    with connected(stack, "--service", "echo", "--local", stack.grpc_local.address, "--key", "k-grpc"):
        channel = grpc.insecure_channel(f"127.0.0.1:{stack.echo_port}")
        try:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")
            metadata = (("baggage", "turnout-session=k-grpc"),)
            eventually(lambda: unary(b"hi", metadata=metadata, timeout=5) == b"local:hi")
            assert unary(b"hi", timeout=5) == b"baseline:hi"
            stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
            assert list(stream(b"5", metadata=metadata, timeout=5)) == [b"local:%d" % i for i in range(5)]
            _, call = unary.with_call(b"x", metadata=metadata, timeout=5)
            assert dict(call.trailing_metadata())["x-served-by"] == "local"
        finally:
            channel.close()


def test_a_cut_link_falls_back_within_a_second_and_the_tunnel_comes_back(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-cut") as (connect, _):
        eventually(lambda: _routed(stack, "k-cut"))
        connects = len([e for e in connect.events if e["event"] == "connected"])
        # SIGSTOP: the machine neither answers PINGs nor closes anything, like a cut cable.
        connect.process.send_signal(signal.SIGSTOP)
        cut_at = time.monotonic()
        try:
            eventually(lambda: _routed(stack, "k-cut", "baseline"), timeout_s=3, interval_s=0.02)
            fell_back_s = time.monotonic() - cut_at
        finally:
            connect.process.send_signal(signal.SIGCONT)
        assert fell_back_s < 1.0, f"fallback took {fell_back_s:.3f} s"
        response = stack.get("k-cut")
        assert _served_by(response) == "baseline"
        # The machine notices its own link is dead and redials; routing resumes by itself.
        connect.wait_for("disconnected")
        after = len(connect.events)
        connect.wait_for("connected", after=after)
        assert len([e for e in connect.events if e["event"] == "connected"]) == connects + 1
        eventually(lambda: _routed(stack, "k-cut"))
    assert "tunnel" in stack.gateway.log() and "lost" in stack.gateway.log()


def test_killed_connect_with_fallback_error_answers_503_and_grpc_14(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-err",
                   "--fallback", "error", "--keep") as (connect, event):
        session_id = event["session"]["id"]
        eventually(lambda: _routed(stack, "k-err"))
        connect.process.send_signal(signal.SIGKILL)
        connect.process.wait(5)
        killed_at = time.monotonic()
        eventually(lambda: stack.get("k-err").status_code == 503, timeout_s=3, interval_s=0.02)
        assert time.monotonic() - killed_at < 1.0
        # Once the control plane's push arrives, the cause names the tunnel.
        eventually(lambda: "tunnel_disconnected" in stack.get("k-err").headers.get("x-turnout-error", ""))
        response = stack.get("k-err")
        assert response.status_code == 503
        assert response.headers["x-turnout-error"] == f"tunnel_disconnected; session={session_id}"
        assert "local process disconnected" in response.text and session_id in response.text
        # explain names the tunnel and says it is not connected.
        report = json.loads(stack.proxy.admin_get(
            "/explain?service=users&header=baggage:turnout-session%3Dk-err")[1])
        assert report["decision"]["tunnel_connected"] is False
    grpc_session = ""
    try:
        with connected(stack, "--service", "echo", "--local", stack.grpc_local.address, "--key", "k-gerr",
                       "--fallback", "error", "--keep") as (connect, event):
            grpc_session = event["session"]["id"]
        channel = grpc.insecure_channel(f"127.0.0.1:{stack.echo_port}")
        try:
            unary = channel.unary_unary(f"/{SERVICE}/Unary")

            def refused() -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as caught:
                    unary(b"hi", metadata=(("baggage", "turnout-session=k-gerr"),), timeout=5)
                return caught.value

            eventually(lambda: "local process disconnected" in str(refused().details()))
            error = refused()
            assert error.code() == grpc.StatusCode.UNAVAILABLE and grpc_session in str(error.details())
        finally:
            channel.close()
    finally:
        for sid in (session_id, grpc_session):
            if sid:
                stack.cp.request("DELETE", "/v1/sessions/" + str(sid), token=ALICE)


def test_another_identity_cannot_attach_to_the_session(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-owned") as (_, event):
        session_id = event["session"]["id"]
        bob = stack.connect("--service", "users", "--local", stack.local.address, "--session", session_id,
                            token=BOB)
        try:
            code = bob.process.wait(20)
        finally:
            if bob.process.poll() is None:
                bob.process.kill()
        assert code == 1
        err = bob.stderr()
        assert "owned by 'alice'" in err, err
        assert "Traceback" not in err
        _status, body = stack.cp.request("GET", f"/v1/audit?session={session_id}")
        refusals = [e for e in body["entries"] if e["action"] == "refuse" and e["identity"] == "bob"]
        assert refusals and refusals[-1]["detail"]["owner"] == "alice"
        # alice's tunnel is untouched.
        assert _routed(stack, "k-owned")


def test_the_session_is_deleted_on_exit_and_kept_with_keep(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-gone") as (connect, ev):
        session_id = ev["session"]["id"]
        assert connect.stop(signal.SIGINT) == 0
        events = connect.drain()
        assert any(e["event"] == "deleted" for e in events)
    assert stack.cp.request("GET", "/v1/sessions/" + session_id)[0] == 404
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-kept",
                   "--keep") as (connect, ev):
        kept = ev["session"]["id"]
        assert connect.stop(signal.SIGTERM) == 0
    try:
        assert stack.cp.request("GET", "/v1/sessions/" + kept)[0] == 200
    finally:
        stack.cp.request("DELETE", "/v1/sessions/" + kept)


def test_connect_runs_a_command_and_exits_with_its_status(stack: Stack) -> None:
    seen = stack.tmp / "command-saw"
    script = (f"import os, sys; open({str(seen)!r}, 'w').write(os.environ['TURNOUT_KEY']); "
              "print('to stderr with --json', flush=True); sys.exit(7)")
    connect = stack.connect("--service", "users", "--local", stack.local.address, "--key", "k-cmd", "--",
                            sys.executable, "-c", script)
    try:
        assert connect.process.wait(30) == 7
        events = connect.drain()
    finally:
        if connect.process.poll() is None:
            connect.process.kill()
    assert seen.read_text() == "k-cmd"
    assert "to stderr with --json" in connect.stderr()
    kinds = [e["event"] for e in events if "event" in e]
    assert "command_exit" in kinds and "deleted" in kinds and kinds[-1] == "exit"
    session_id = next(e for e in events if e.get("event") == "session")["session"]["id"]
    assert stack.cp.request("GET", "/v1/sessions/" + session_id)[0] == 404


def test_connect_errors_are_one_line(stack: Stack) -> None:
    env = state_env(stack.tmp)
    env.update(TURNOUT_CONTROL_PLANE=stack.cp.api_url, TURNOUT_TOKEN=ALICE)
    for args, expected in (
        (["--service", "users", "--local", "nohost"], "--local"),
        (["--service", "users", "--local", "127.0.0.1:1", "--gateway", "x"], "--gateway"),
    ):
        done = subprocess.run([sys.executable, "-m", "turnout.cli", "connect", *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=30, check=False)
        assert done.returncode == 2, done
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    env["TURNOUT_CONTROL_PLANE"] = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "turnout.cli", "connect", "--service", "users", "--local",
                           "127.0.0.1:1"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30, check=False)
    assert done.returncode == 3 and "connection refused" in done.stderr and "Traceback" not in done.stderr


def test_mirror_sends_copies_to_the_local_process_and_baseline_answers(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-mirror", "--mode",
                   "mirror"):
        def copied() -> bool:
            response = stack.get("k-mirror", "/mirrored")
            assert _served_by(response) == "baseline", "a mirror never answers"
            return any(r.target == "/mirrored" for r in stack.local.requests)

        eventually(copied)


def test_steal_with_a_match_takes_only_the_matching_requests(stack: Stack) -> None:
    match = json.dumps({"header": {"name": "x-user", "exact": "alice"}})
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-match", "--match",
                   match):
        headers = {"baggage": "turnout-session=k-match"}

        def served(user: str) -> str:
            return _served_by(httpx.get(stack.proxy.url, headers={**headers, "x-user": user}, timeout=10))

        eventually(lambda: served("alice") == "local")
        assert served("bob") == "baseline"


OUTGOING_SCRIPT = """
import json, os, socket, sys, time

proxy_host, proxy_port = os.environ["HTTP_PROXY"][len("http://"):].rsplit(":", 1)
orders = sys.argv[2]
results = {}


def exchange(data, then=b""):
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=10) as s:
        s.sendall(data)
        got = b""
        if then:
            while b"\\r\\n\\r\\n" not in got:
                got += s.recv(65536)
            s.sendall(then)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got.decode("latin-1")
            got += chunk


deadline = time.monotonic() + 20
while True:  # the tunnel may still be coming up: 502 until it is
    plain = exchange(f"GET http://{orders}/from-local HTTP/1.1\\r\\nHost: {orders}\\r\\n\\r\\n".encode())
    if " 502 " not in plain.split("\\r\\n")[0] or time.monotonic() > deadline:
        break
    time.sleep(0.1)
results["plain"] = plain
results["connect"] = exchange(f"CONNECT {orders} HTTP/1.1\\r\\n\\r\\n".encode(),
                              f"GET /via-connect HTTP/1.1\\r\\nHost: {orders}\\r\\nbaggage: turnout-session=k-out"
                              "\\r\\nconnection: close\\r\\n\\r\\n".encode())
results["refused"] = exchange(b"CONNECT 10.255.255.1:80 HTTP/1.1\\r\\n\\r\\n")
open(sys.argv[1], "w").write(json.dumps(results))
"""


def test_outgoing_calls_leave_from_the_cluster_with_the_key_and_route_inside_the_session(stack: Stack) -> None:
    # One session forks users (to this machine) and orders (to a sandbox in the "cluster").
    status, body = stack.cp.request("POST", "/v1/sessions", {"id": "s-out", "key": "k-out", "routes": [
        {"service": "users", "destination": "tunnel"},
        {"service": "orders", "destination": stack.orders_sandbox.address}]}, token=ALICE)
    assert status == 201, body
    script = stack.tmp / "outgoing.py"
    script.write_text(OUTGOING_SCRIPT)
    results_path = stack.tmp / "outgoing.json"
    orders = f"127.0.0.1:{stack.orders_port}"
    connect = stack.connect("--service", "users", "--local", stack.local.address, "--session", "s-out", "--",
                            sys.executable, str(script), str(results_path), orders)
    try:
        assert connect.process.wait(60) == 0, connect.stderr()
    finally:
        if connect.process.poll() is None:
            connect.process.kill()
            connect.process.wait(5)
        stack.cp.request("DELETE", "/v1/sessions/s-out", token=ALICE)
    results = json.loads(results_path.read_text())
    # An absolute-form request: sent from the gateway, the key added to baggage, routed by the
    # proxy in front of orders to the session's orders sandbox.
    assert results["plain"].startswith("HTTP/1.1 200"), results["plain"]
    assert "x-upstream: orders-sandbox" in results["plain"]
    received = next(r for r in stack.orders_sandbox.requests if r.target == "/from-local")
    assert received.header("baggage") == "turnout-session=k-out"
    # CONNECT (what gRPC clients do through grpc_proxy): bytes as they are; the program propagates the key.
    assert "x-upstream: orders-sandbox" in results["connect"], results["connect"]
    assert any(r.target == "/via-connect" for r in stack.orders_sandbox.requests)
    # Outside what alice's policy allows: refused, naming the rule.
    assert results["refused"].startswith("HTTP/1.1 403"), results["refused"]
    assert "allowed_destinations" in results["refused"]
    assert not [r for r in stack.orders_baseline.requests if r.target in ("/from-local", "/via-connect")]


def test_a_json_reader_that_falls_behind_never_stalls_the_tunnel(stack: Stack) -> None:
    with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-slow") as (connect, _ev):
        eventually(lambda: _routed(stack, "k-slow"))
        # 150 requests with long targets make ~170 kB of request events: more than a pipe holds
        # unread (64 kB).
        with httpx.Client(timeout=10) as client:
            served = [client.get(stack.proxy.url + "/burst?" + "p" * 1000,
                                 headers={"baggage": "turnout-session=k-slow"})
                      .headers.get("x-upstream") for _ in range(150)]
        assert served == ["local"] * 150
        assert connect.process.poll() is None
        connect.process.send_signal(signal.SIGINT)
        events = connect.drain()  # the reader catches up; connect writes everything, then exits
        assert connect.process.wait(15) == 0
    requests = [e for e in events if e["event"] == "request" and e["target"].startswith("/burst")]
    (exit_event,) = [e for e in events if e["event"] == "exit"]
    assert len(requests) + exit_event["dropped_request_events"] == 150
    assert not [e for e in events if e["event"] == "disconnected"], "the tunnel never stalled"


def test_the_tunnel_over_tls(stack: Stack) -> None:
    cert, key = stack.tmp / "gw-cert.pem", stack.tmp / "gw-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True,
                   timeout=30)
    with running_gateway(stack.tmp, stack.cp, "--id", "gw-tls", "--tls-cert", str(cert), "--tls-key",
                         str(key)) as gateway:
        plain = stack.connect("--service", "users", "--local", stack.local.address, "--key", "k-plain",
                              "--gateway", gateway.tunnel_address)
        try:
            error = plain.wait_for("error")  # cleartext to a TLS port: no answer it can use; it keeps retrying
            assert "--gateway-tls" in error["message"], error
            assert plain.process.poll() is None
        finally:
            plain.stop()
        with connected(stack, "--service", "users", "--local", stack.local.address, "--key", "k-tls", "--gateway",
                       gateway.tunnel_address, "--gateway-tls", "--gateway-ca-file", str(cert)) as (_, event):
            eventually(lambda: _routed(stack, "k-tls"))
            _status, body = stack.cp.request("GET", "/v1/sessions/" + event["session"]["id"], token=ALICE)
            assert body["tunnel"]["gateway"] == "gw-tls"
            assert _served_by(stack.get("k-tls", "/over-tls")) == "local"


def test_a_terminal_gets_the_what_and_live_counts(stack: Stack) -> None:
    import pty

    master, slave = pty.openpty()
    env = state_env(stack.tmp)
    env.update(TURNOUT_CONTROL_PLANE=stack.cp.api_url, TURNOUT_TOKEN=ALICE,
               TURNOUT_GATEWAY=stack.gateway.tunnel_address)
    process = subprocess.Popen([sys.executable, "-m", "turnout.cli", "connect", "--service", "users", "--local",
                                stack.local.address, "--key", "k-tty"], stdout=slave, stderr=subprocess.DEVNULL,
                               env=env, cwd=ROOT)
    os.close(slave)
    seen = b""

    def read_until(text: bytes, timeout_s: float = 20) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout_s
        while text not in seen:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # EIO: the terminal's other end closed
                    return

    try:
        read_until(b"curl -H 'baggage: turnout-session=k-tty'")  # the hint follows the 'tunnel up' line
        assert b"created session" in seen and b"tunnel up" in seen
        eventually(lambda: _routed(stack, "k-tty"))
        read_until(b"errors 0  last 200")
        process.send_signal(signal.SIGINT)
        read_until(b"done:")
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(master)
    assert re.search(rb"\r\x1b\[K\[connected\] requests [1-9]\d*  errors 0  last 200", seen), seen
    assert b"deleted session" in seen


GRPC_PROGRAM = """
import json, sys, time
import grpc
out, target = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 30
while True:  # grpc_proxy is connect's local proxy; the tunnel may still be coming up
    try:
        with grpc.insecure_channel(target) as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            reply = unary(b"hi", metadata=(("baggage", "turnout-session=k-grpc-out"),), timeout=5)
        break
    except grpc.RpcError as exc:
        if time.monotonic() > deadline:
            reply = repr(exc).encode()
            break
        time.sleep(0.2)
open(out, "w").write(json.dumps({"reply": reply.decode()}))
time.sleep(float(sys.argv[3]))  # time for the test to look at the gateway while the tunnel is up
"""


def test_a_grpc_client_calls_through_grpc_proxy(stack: Stack) -> None:
    status, body = stack.cp.request("POST", "/v1/sessions", {"id": "s-grpc-out", "key": "k-grpc-out", "routes": [
        {"service": "users", "destination": "tunnel"},
        {"service": "echo", "destination": stack.grpc_local.address}]}, token=ALICE)
    assert status == 201, body
    script, out = stack.tmp / "grpc_program.py", stack.tmp / "grpc_program.json"
    script.write_text(GRPC_PROGRAM)
    env_keep = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ""  # on loopback the "cluster" is 127.0.0.1 too
    try:
        with connected(stack, "--service", "users", "--local", stack.local.address, "--session", "s-grpc-out", "--",
                       sys.executable, str(script), str(out), f"127.0.0.1:{stack.echo_port}", "30") as (_connect, _):
            eventually(out.exists, timeout_s=40)
            tunnels = httpx.get(stack.gateway.admin_url + "/tunnels", timeout=5).json()["tunnels"]
    finally:
        for name in ("NO_PROXY", "no_proxy"):
            os.environ.pop(name, None)
        if env_keep is not None:
            os.environ["NO_PROXY"] = env_keep
        stack.cp.request("DELETE", "/v1/sessions/s-grpc-out", token=ALICE)
    assert json.loads(out.read_text()) == {"reply": "local:hi"}, "routed inside the session, to its echo sandbox"
    assert any(t["session"] == "s-grpc-out" and t["outgoing_calls"] >= 1 for t in tunnels), tunnels
