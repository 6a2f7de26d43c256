"""Multi-host routing without a cluster: network namespaces joined by veth pairs.

    client ns 10.200.1.2 ──veth── 10.200.1.1  node ns  10.200.2.1 ──veth── 10.200.2.2 baseline ns
                                  (turnout,   10.200.3.1 ──veth── 10.200.3.2 sandbox ns
                                   outbound)

The node runs turnout in outbound (node) mode; the client uses it as its HTTP proxy for the
baseline's address. A session's key routes the request across hosts to the sandbox; cutting
the sandbox host's link gives the documented fallback: ``fallback: baseline`` is served by
baseline, ``fallback: error`` answers 503 with ``x-turnout-error``. A second test runs the
control plane on the node too and creates and deletes a session from the client host, as a CI
job or an agent would. Needs root and iproute2; skipped, with the reason, otherwise. Every
namespace and process is removed in a finally. Addresses are private and exist only inside
the namespaces this test creates.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.support import ROOT

SERVER = """
import http.server, sys
label, host, port, keep_alive = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "keep-alive"
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = label.encode()
        self.send_response(200)
        self.send_header("x-upstream", label)
        self.send_header("content-length", str(len(body)))
        if not keep_alive:
            self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
"""

# One request through the proxy (absolute-form target, as an HTTP proxy client sends it).
CLIENT = """
import http.client, json, sys
proxy, url, baggage = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = proxy.rsplit(":", 1)
conn = http.client.HTTPConnection(host, int(port), timeout=5)
conn.request("GET", url, headers={"baggage": baggage} if baggage else {})
resp = conn.getresponse()
print(json.dumps({"status": resp.status, "headers": {k.lower(): v for k, v in resp.getheaders()},
                  "body": resp.read().decode("latin-1")}))
"""

NODE_IP = "10.200.1.1"
BASELINE_IP, SANDBOX_IP = "10.200.2.2", "10.200.3.2"
PROXY = f"{NODE_IP}:15002"
BASELINE_URL = f"http://{BASELINE_IP}:8080/api/users"


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the ip command)"
    probe = f"tprobe{secrets.token_hex(3)}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace here: {result.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=10)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


class Topology:
    """Namespaces, links and processes of one test run; ``close`` removes all of them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.tag = secrets.token_hex(2)  # names unique to this run: interface names hold 15 characters
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []

    def ns(self, role: str) -> str:
        """The namespace name for a role."""
        return f"turnout-{self.tag}-{role}"

    def build(self) -> None:
        """Four namespaces; the node has one link to each of the others."""
        for role in ("node", "client", "baseline", "sandbox"):
            _ip("netns", "add", self.ns(role))
            self.namespaces.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
        for role, subnet in (("client", 1), ("baseline", 2), ("sandbox", 3)):
            node_end, far_end = self.link(role), f"t{self.tag}{role[0]}f"
            _ip("link", "add", node_end, "netns", self.ns("node"), "type", "veth", "peer", "name", far_end,
                "netns", self.ns(role))
            _ip("-n", self.ns("node"), "addr", "add", f"10.200.{subnet}.1/24", "dev", node_end)
            _ip("-n", self.ns(role), "addr", "add", f"10.200.{subnet}.2/24", "dev", far_end)
            _ip("-n", self.ns("node"), "link", "set", node_end, "up")
            _ip("-n", self.ns(role), "link", "set", far_end, "up")

    def link(self, role: str) -> str:
        """The node's end of the link to ``role``'s host."""
        return f"t{self.tag}{role[0]}n"

    def spawn(self, role: str, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        """A process inside a namespace, its output in a log file."""
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.tmp / log_name, "wb") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.processes.append(process)
        return process

    def request(self, baggage: str = "") -> dict[str, Any]:
        """One request from the client host through the node's proxy to the baseline's address."""
        result = subprocess.run(["ip", "netns", "exec", self.ns("client"), sys.executable, "-c", CLIENT, PROXY,
                                 BASELINE_URL, baggage], capture_output=True, text=True, timeout=20, check=False)
        assert result.returncode == 0, result.stderr
        reply: dict[str, Any] = json.loads(result.stdout)
        return reply

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and delete every namespace."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for name in self.namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[Topology]:
    """The four hosts, torn down even when the test fails."""
    unavailable = _unavailable()
    if unavailable is not None:
        pytest.skip(reason="network namespaces unavailable: " + unavailable)
    topo = Topology(tmp_path)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


def _wait(check: Any, what: str, logs: list[Path], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError, ValueError):
            last = check()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: still {last!r} after {timeout_s} s\n" +
                         "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in logs if p.exists()))


def test_session_routes_across_hosts_and_a_cut_link_falls_back(topology: Topology) -> None:
    topo = topology
    sandbox = f"{SANDBOX_IP}:8080"
    config = {
        "listeners": [{"name": "egress", "address": f"{NODE_IP}:15002", "mode": "outbound",
                       "authorities": {f"{BASELINE_IP}:8080": "users"}}],
        "limits": {"upstream_connect_timeout_s": 2.0, "drain_timeout_s": 2.0},
        "sessions": [
            {"id": "fix-1", "key": "abc", "routes": [
                {"service": "users", "destination": sandbox, "fallback": "baseline"}]},
            {"id": "strict-1", "key": "strict", "routes": [
                {"service": "users", "destination": sandbox, "fallback": "error"}]},
        ],
    }
    config_path = topo.tmp / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config))
    topo.spawn("baseline", [sys.executable, "-c", SERVER, "baseline", BASELINE_IP, "8080", "keep-alive"],
               "baseline.log")
    # The sandbox closes each connection after its answer, so every sandbox request connects
    # anew and meets the cut link. (A request written to a pooled connection whose peer
    # vanished silently has been sent: it can only end at upstream_response_timeout_s with a
    # 504, never be retried on baseline, because turnout cannot know whether it was acted on.)
    topo.spawn("sandbox", [sys.executable, "-c", SERVER, "sandbox", SANDBOX_IP, "8080", "close"], "sandbox.log")
    proxy = topo.spawn("node", [sys.executable, "-m", "dataplane.cli", "proxy", "--config", str(config_path)],
                       "proxy.log")
    logs = [topo.tmp / name for name in ("proxy.log", "baseline.log", "sandbox.log")]

    # Both servers up and the proxy serving: a request without a key reaches baseline.
    _wait(lambda: topo.request()["headers"].get("x-upstream") == "baseline", "baseline through the node", logs)
    _wait(lambda: topo.request("turnout-session=abc")["body"] == "sandbox", "sandbox through the node", logs)

    keyed = topo.request("userId=7,turnout-session=abc")
    assert (keyed["status"], keyed["body"]) == (200, "sandbox")
    strict = topo.request("turnout-session=strict")
    assert (strict["status"], strict["body"]) == (200, "sandbox")
    other = topo.request("turnout-session=unknown")
    assert (other["status"], other["body"]) == (200, "baseline")

    # The sandbox host drops off the network.
    _ip("-n", topo.ns("node"), "link", "set", topo.link("sandbox"), "down")
    started = time.monotonic()
    fallback = topo.request("turnout-session=abc")
    assert (fallback["status"], fallback["body"]) == (200, "baseline"), fallback
    error = topo.request("turnout-session=strict")
    assert error["status"] == 503, error
    assert "strict-1" in error["headers"]["x-turnout-error"]
    assert time.monotonic() - started < 10, "an unreachable sandbox must not wait for long timeouts"
    assert topo.request()["body"] == "baseline"

    # The link is back: the session routes to the sandbox again.
    _ip("-n", topo.ns("node"), "link", "set", topo.link("sandbox"), "up")
    _wait(lambda: topo.request("turnout-session=abc")["body"] == "sandbox", "sandbox after the link is back", logs)
    assert proxy.poll() is None, (topo.tmp / "proxy.log").read_text()


def test_session_created_from_the_client_host_reaches_the_node(topology: Topology) -> None:
    """What a CI job or an agent does: create a session over the network, use its key, delete it."""
    topo = topology
    token = topo.tmp / "token"
    token.write_text(secrets.token_hex(16) + "\n")
    api = f"http://{NODE_IP}:18080"
    config = {
        "listeners": [{"name": "egress", "address": f"{NODE_IP}:15002", "mode": "outbound",
                       "authorities": {f"{BASELINE_IP}:8080": "users"}}],
        "control_plane": {"address": "127.0.0.1:18000", "token_file": str(token), "node_id": "node-1",
                          "state_path": None},
        "limits": {"upstream_connect_timeout_s": 2.0, "drain_timeout_s": 2.0},
    }
    config_path = topo.tmp / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(config))
    topo.spawn("baseline", [sys.executable, "-c", SERVER, "baseline", BASELINE_IP, "8080", "keep-alive"],
               "baseline.log")
    topo.spawn("sandbox", [sys.executable, "-c", SERVER, "sandbox", SANDBOX_IP, "8080", "keep-alive"],
               "sandbox.log")
    topo.spawn("node", [sys.executable, "-m", "turnout.cli", "control-plane", "--api", f"{NODE_IP}:18080",
                        "--grpc", "127.0.0.1:18000", "--db", str(topo.tmp / "sessions.db"), "--token-file",
                        str(token)], "control-plane.log")
    logs = [topo.tmp / name for name in ("proxy.log", "control-plane.log", "baseline.log", "sandbox.log")]
    # The proxy starts once the control plane listens: otherwise its reconnect backoff (full
    # jitter, doubling) could push the first stream past this test's patience on a busy machine.
    _wait(lambda: " grpc 127.0.0.1:18000" in (topo.tmp / "control-plane.log").read_text(), "control plane ready",
          logs)
    topo.spawn("node", [sys.executable, "-m", "dataplane.cli", "proxy", "--config", str(config_path)], "proxy.log")
    _wait(lambda: topo.request()["headers"].get("x-upstream") == "baseline", "baseline through the node", logs)

    def session(*args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), TURNOUT_CONTROL_PLANE=api)
        return subprocess.run(["ip", "netns", "exec", topo.ns("client"), sys.executable, "-m", "turnout.cli",
                               "session", *args, "--token-file", str(token)], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=30, check=False)

    def create() -> subprocess.CompletedProcess[str] | None:
        result = session("create", "--id", "ci-1", "--key", "ci42", "--route", f"users={SANDBOX_IP}:8080",
                         "--ttl", "10m", "--owner", "ci")
        return None if result.returncode == 3 else result  # 3: control plane not listening yet

    created = _wait(create, "session create from the client host", logs)
    assert created.returncode == 0, created.stderr
    _wait(lambda: topo.request("turnout-session=ci42")["body"] == "sandbox", "the pushed session routes", logs)
    assert topo.request()["body"] == "baseline"
    deleted = session("delete", "ci-1")
    assert deleted.returncode == 0, deleted.stderr
    _wait(lambda: topo.request("turnout-session=ci42")["body"] == "baseline", "the deleted session is gone", logs)
