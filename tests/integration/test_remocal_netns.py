"""Remocal across network namespaces: a "laptop" that only reaches the cluster's node, never the reverse.

    client ns 10.200.1.2 ──── 10.200.1.1  node ns  10.200.2.1 ──── 10.200.2.2 baseline ns (users)
                              (proxy: egress, orders-in;  10.200.3.1 ──── 10.200.3.2 orders ns (orders :8080,
                               control plane, gateway)                              orders sandbox :8081)
    laptop ns 10.200.4.2 ──── 10.200.4.1 (the gateway's tunnel port and the control plane's API only)

The node does not forward between its links (a new namespace never does), and no namespace has
a route to the laptop's network: the cluster cannot reach the laptop, the laptop reaches only
the node's 10.200.4.1. On the laptop, ``turnout connect`` serves a session for ``users`` from a
local process, and runs a program that calls the ``orders`` service through its HTTP proxy.
Checked: a request with the key from the client host reaches the laptop's process; the
program's call to orders arrives with the key in baggage and is routed inside the session (to
the orders sandbox); cutting the laptop's link gives the fallback within a second; the tunnel
comes back by itself and routing resumes; another identity cannot attach. (HTTP/2 and gRPC
over the tunnel are covered on loopback, tests/integration/test_remocal.py.) Needs root and
iproute2; skipped otherwise. Every namespace and process is removed in a finally.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.support import ROOT
from tests.integration.test_netns import NODE_IP, Topology, _ip, _unavailable, _wait

LAPTOP_SIDE = "10.200.4.1"
ORDERS_IP = "10.200.3.2"
ALICE, BOB, ADMIN, GATEWAY = "alice-netns-token-0123", "bob-netns-token-0123", "admin-netns-token-01", "gw-netns-01"

# A server that answers its label and echoes the baggage it got.
SERVER = """
import http.server, sys
label, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = label.encode()
        self.send_response(200)
        self.send_header("x-upstream", label)
        self.send_header("x-baggage", self.headers.get("baggage", "-"))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
"""

# The laptop's program: one call to orders through HTTP_PROXY once the tunnel is up, then wait.
PROGRAM = """
import json, os, sys, time, urllib.request
out, url = sys.argv[1], sys.argv[2]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["HTTP_PROXY"]}))
deadline = time.monotonic() + 60
while True:
    try:
        with opener.open(url, timeout=5) as resp:
            result = {"status": resp.status, "upstream": resp.headers.get("x-upstream"),
                      "baggage": resp.headers.get("x-baggage")}
            break
    except Exception as exc:  # the tunnel is still coming up
        if time.monotonic() > deadline:
            result = {"error": str(exc)}
            break
        time.sleep(0.2)
open(out, "w").write(json.dumps(result))
time.sleep(600)
"""


class RemocalTopology(Topology):
    """The four hosts of test_netns, plus a laptop linked to the node only."""

    def build(self) -> None:
        super().build()
        _ip("netns", "add", self.ns("laptop"))
        self.namespaces.append(self.ns("laptop"))
        _ip("-n", self.ns("laptop"), "link", "set", "lo", "up")
        node_end, far_end = self.link("laptop"), f"t{self.tag}lf"
        _ip("link", "add", node_end, "netns", self.ns("node"), "type", "veth", "peer", "name", far_end,
            "netns", self.ns("laptop"))
        _ip("-n", self.ns("node"), "addr", "add", f"{LAPTOP_SIDE}/24", "dev", node_end)
        _ip("-n", self.ns("laptop"), "addr", "add", "10.200.4.2/24", "dev", far_end)
        _ip("-n", self.ns("node"), "link", "set", node_end, "up")
        _ip("-n", self.ns("laptop"), "link", "set", far_end, "up")


@pytest.fixture
def topology(tmp_path: Path) -> Iterator[RemocalTopology]:
    """The five hosts, torn down even when the test fails."""
    unavailable = _unavailable()
    if unavailable is not None:
        pytest.skip(reason="network namespaces unavailable: " + unavailable)
    topo = RemocalTopology(tmp_path)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


def _reaches(topo: RemocalTopology, role: str, host: str, port: int) -> bool:
    """Whether a TCP connection from ``role``'s host to host:port gets anywhere (refused counts as reached)."""
    probe = ("import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)\n"
             "except ConnectionRefusedError:\n    sys.exit(0)\nexcept OSError:\n    sys.exit(1)\n")
    done = subprocess.run(["ip", "netns", "exec", topo.ns(role), sys.executable, "-c", probe, host, str(port)],
                          capture_output=True, timeout=20, check=False)
    return done.returncode == 0


def _events(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_laptop_serves_a_session_through_the_gateway(topology: RemocalTopology) -> None:
    topo = topology
    tmp = topo.tmp
    for name, token in (("admin.token", ADMIN), ("gateway.token", GATEWAY)):
        (tmp / name).write_text(token + "\n")
    (tmp / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"identity": who, "groups": ["developers"], "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for who, token in (("alice", ALICE), ("bob", BOB))]}))
    (tmp / "auth.yaml").write_text(yaml.safe_dump({"tokens_file": str(tmp / "tokens.yaml")}))
    config = {
        "routing": {"debug_headers": True},
        "listeners": [{"name": "egress", "address": f"{NODE_IP}:15002", "mode": "outbound",
                       "authorities": {"10.200.2.2:8080": "users"}},
                      {"name": "orders-in", "address": f"{NODE_IP}:15003", "mode": "inbound", "service": "orders",
                       "baseline": f"{ORDERS_IP}:8080"}],
        "control_plane": {"address": "127.0.0.1:18000", "token_file": str(tmp / "admin.token"), "node_id": "node-1",
                          "state_path": None},
        "limits": {"upstream_connect_timeout_s": 2.0, "drain_timeout_s": 2.0},
    }
    (tmp / "turnout.yaml").write_text(yaml.safe_dump(config))
    topo.spawn("baseline", [sys.executable, "-c", SERVER, "baseline", "10.200.2.2", "8080"], "baseline.log")
    topo.spawn("sandbox", [sys.executable, "-c", SERVER, "orders", ORDERS_IP, "8080"], "orders.log")
    topo.spawn("sandbox", [sys.executable, "-c", SERVER, "orders-sandbox", ORDERS_IP, "8081"], "orders-sandbox.log")
    topo.spawn("laptop", [sys.executable, "-c", SERVER, "local", "127.0.0.1", "9000"], "local.log")
    topo.spawn("node", [sys.executable, "-m", "turnout.cli", "control-plane", "--api", "0.0.0.0:18080", "--grpc",
                        "127.0.0.1:18000", "--db", str(tmp / "sessions.db"), "--token-file", str(tmp / "admin.token"),
                        "--auth", str(tmp / "auth.yaml"), "--gateway-token-file", str(tmp / "gateway.token")],
               "control-plane.log")
    logs = [tmp / n for n in ("control-plane.log", "proxy.log", "gateway.log", "connect.out", "connect.err")]
    _wait(lambda: " grpc 127.0.0.1:18000" in (tmp / "control-plane.log").read_text(), "control plane ready", logs)
    topo.spawn("node", [sys.executable, "-m", "dataplane.cli", "proxy", "--config", str(tmp / "turnout.yaml")],
               "proxy.log")
    topo.spawn("node", [sys.executable, "-m", "turnout.cli", "gateway", "--listen", f"{LAPTOP_SIDE}:18090",
                        "--data-host", "127.0.0.1", "--control-plane", "http://127.0.0.1:18080", "--token-file",
                        str(tmp / "gateway.token"), "--id", "gw-node", "--report-interval", "1"], "gateway.log")
    _wait(lambda: topo.request()["headers"].get("x-upstream") == "baseline", "baseline through the node", logs)
    # The laptop reaches no cluster host but the node's laptop side (its edge, like a LoadBalancer),
    # and no host behind the node has a route to the laptop.
    assert not _reaches(topo, "laptop", "10.200.2.2", 8080) and not _reaches(topo, "laptop", NODE_IP, 15002)
    assert not _reaches(topo, "baseline", "10.200.4.2", 9000) and not _reaches(topo, "sandbox", "10.200.4.2", 9000)

    # The session (alice's): users from her laptop, orders to a sandbox in the cluster.
    def laptop(*args: str, token: str, out: str, err: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), TURNOUT_CONTROL_PLANE=f"http://{LAPTOP_SIDE}:18080",
                   TURNOUT_TOKEN=token, TURNOUT_GATEWAY=f"{LAPTOP_SIDE}:18090")
        with open(tmp / out, "wb") as stdout, open(tmp / err, "wb") as stderr:
            process = subprocess.Popen(["ip", "netns", "exec", topo.ns("laptop"), sys.executable, "-m",
                                        "turnout.cli", *args], stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        topo.processes.append(process)
        return process

    create = laptop("session", "create", "--id", "lap-1", "--key", "lap", "--route", "users=tunnel", "--route",
                    f"orders={ORDERS_IP}:8081", "--no-wait", token=ALICE, out="create.out", err="create.err")
    assert create.wait(30) == 0, (tmp / "create.err").read_text()
    program = tmp / "program.py"
    program.write_text(PROGRAM)
    result = tmp / "program.json"
    connect = laptop("connect", "--json", "--service", "users", "--local", "127.0.0.1:9000", "--session", "lap-1",
                     "--", sys.executable, str(program), str(result), f"http://{NODE_IP}:15003/orders",
                     token=ALICE, out="connect.out", err="connect.err")
    _wait(lambda: any(e["event"] == "connected" for e in _events(tmp / "connect.out")), "the tunnel is up", logs)
    _wait(lambda: topo.request("turnout-session=lap")["body"] == "local", "the laptop serves the session", logs)
    assert topo.request()["body"] == "baseline"

    # The laptop's program called orders: from inside the cluster, the key added, routed in the session.
    called = _wait(lambda: json.loads(result.read_text()) if result.exists() else None, "the program's call", logs)
    assert called == {"status": 200, "upstream": "orders-sandbox", "baggage": "turnout-session=lap"}, called

    # Cut the laptop's link: the fallback within a second.
    _ip("-n", topo.ns("node"), "link", "set", topo.link("laptop"), "down")
    cut = time.monotonic()
    _wait(lambda: topo.request("turnout-session=lap")["body"] == "baseline", "the fallback", logs, timeout_s=5)
    assert time.monotonic() - cut < 1.0 + 0.5, "the fallback took longer than a second (+ one request's time)"

    # The link is back: the tunnel comes back by itself.
    _ip("-n", topo.ns("node"), "link", "set", topo.link("laptop"), "up")
    _wait(lambda: topo.request("turnout-session=lap")["body"] == "local", "routing resumes", logs, timeout_s=30)

    # bob cannot attach a tunnel to alice's session.
    bob = laptop("connect", "--service", "users", "--local", "127.0.0.1:9000", "--session", "lap-1", token=BOB,
                 out="bob.out", err="bob.err")
    assert bob.wait(30) == 1
    assert "owned by 'alice'" in (tmp / "bob.err").read_text()
    assert topo.request("turnout-session=lap")["body"] == "local", "alice's tunnel is untouched"
    assert connect.poll() is None, (tmp / "connect.err").read_text()
