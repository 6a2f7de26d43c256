"""Remocal across hosts: a "laptop" that only dials out, a node, and services on other hosts.

    client ns 10.200.1.2 ──veth── 10.200.1.1 ┐
                                             │ node ns: turnout proxy (outbound listener 10.200.1.1:15002 for
    laptop ns 10.200.4.2 ──veth── 10.200.4.1 ┤  users and echo, inbound 10.200.1.1:15003 for orders), control
                                             │  plane (API on 10.200.4.1:18080), gateway (tunnels on
    services ns 10.200.2.2 ──veth── 10.200.2.1 ┘  10.200.4.1:18090)

The services host runs users' baseline (HTTP, :8080), echo's baseline (gRPC, :50051) and the
second service, orders (baseline :8081, sandbox :8082). The laptop runs its local processes on
its own loopback and reaches the node's 10.200.4.1 only: nothing forwards between the node's
links, so the laptop cannot reach the services host and nobody can open a connection to the
laptop's processes. The node never dials the laptop: ``turnout connect`` dials out.

Checked: a request with the key reaches the local process over HTTP/1.1, HTTP/2 and gRPC (unary
and server streaming); the local process's outgoing call to orders leaves from the cluster with
the key added to ``baggage`` and is routed inside the session (to orders' sandbox); cutting the
laptop's link falls back to baseline within 1 s; the tunnel comes back by itself and routing
resumes; another identity cannot attach to the session. Needs root and iproute2 (skipped, with
the reason, otherwise); every namespace and process is removed in a ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.support import ROOT
from tests.integration.test_netns import Topology, _ip, _unavailable, _wait

NODE_CLIENT_IP, NODE_LAPTOP_IP, NODE_SERVICES_IP = "10.200.1.1", "10.200.4.1", "10.200.2.1"
CLIENT_IP, LAPTOP_IP, SERVICES_IP = "10.200.1.2", "10.200.4.2", "10.200.2.2"
EGRESS = f"{NODE_CLIENT_IP}:15002"  # the node proxy's outbound listener
ORDERS = f"{NODE_CLIENT_IP}:15003"  # orders' address in the cluster: the node proxy's inbound listener
API = f"http://{NODE_LAPTOP_IP}:18080"
GATEWAY = f"{NODE_LAPTOP_IP}:18090"
USERS = f"{SERVICES_IP}:8080"
ECHO = f"{SERVICES_IP}:50051"
ALICE, BOB = "alice-" + secrets.token_hex(8), "bob-" + secrets.token_hex(8)
PROXY_TOKEN, GATEWAY_TOKEN = secrets.token_hex(16), secrets.token_hex(16)

# An HTTP/1.1 server answering its label, with the baggage it received.
HTTP_SERVER = """
import http.server, sys
label, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = label.encode()
        self.send_response(200)
        self.send_header("x-upstream", label)
        self.send_header("x-baggage", self.headers.get("baggage", ""))
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((host, port), Handler).serve_forever()
"""

# The local process: answers "local"; on /call it calls orders through the HTTP proxy that
# turnout connect gave it (HTTP_PROXY), without propagating any baggage itself.
LOCAL_SERVER = """
import http.server, json, sys, urllib.request
orders = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/call":
            with urllib.request.urlopen(f"http://{orders}/orders/7", timeout=10) as reply:
                body = json.dumps({"body": reply.read().decode(), "baggage": reply.headers.get("x-baggage", "")})
        else:
            body = "local"
        data = body.encode()
        self.send_response(200)
        self.send_header("x-upstream", "local")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8080), Handler).serve_forever()
"""

GRPC_SERVER = """
import sys
from concurrent.futures import ThreadPoolExecutor
import grpc
label, address = sys.argv[1].encode(), sys.argv[2]
def unary(request, context):
    return label + b":" + request
def stream(request, context):
    for i in range(int(request)):
        yield label + b":%d" % i
server = grpc.server(ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(stream)}),))
server.add_insecure_port(address)
server.start()
server.wait_for_termination()
"""

# Requests from the client host, each a JSON object; prints one JSON result per request.
CLIENT = """
import http.client, json, sys
import grpc, httpx
egress, users, echo = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = egress.rsplit(":", 1)
out = []
for check in json.loads(sys.argv[4]):
    kind, baggage, path = check["kind"], check.get("baggage", ""), check.get("path", "/")
    try:
        if kind == "h1":
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("GET", f"http://{users}{path}", headers={"baggage": baggage} if baggage else {})
            resp = conn.getresponse()
            out.append({"status": resp.status, "body": resp.read().decode(), "version": "1.1",
                        "upstream": resp.getheader("x-upstream", "")})
        elif kind == "h2":
            headers = {"host": users, **({"baggage": baggage} if baggage else {})}
            with httpx.Client(http1=False, http2=True, timeout=10) as client:
                resp = client.get(f"http://{egress}{path}", headers=headers)
            out.append({"status": resp.status_code, "body": resp.text, "version": resp.http_version,
                        "upstream": resp.headers.get("x-upstream", "")})
        else:
            channel = grpc.insecure_channel(egress, options=[("grpc.default_authority", echo)])
            metadata = (("baggage", baggage),) if baggage else ()
            if kind == "grpc_unary":
                body = channel.unary_unary("/test.Echo/Unary")(b"hi", metadata=metadata, timeout=10).decode()
            else:
                body = ",".join(r.decode() for r in channel.unary_stream("/test.Echo/ServerStream")(
                    b"3", metadata=metadata, timeout=10))
            channel.close()
            out.append({"status": 0, "body": body})
    except Exception as exc:
        out.append({"error": f"{type(exc).__name__}: {exc}"})
print(json.dumps(out))
"""

# From the client host: after the first answer from the local process, prints "ready"; then
# polls every 20 ms and prints the monotonic time of the first answer from baseline.
POLLER = """
import http.client, sys, time
egress, users, baggage = sys.argv[1], sys.argv[2], sys.argv[3]
host, port = egress.rsplit(":", 1)
def get():
    conn = http.client.HTTPConnection(host, int(port), timeout=3)
    try:
        conn.request("GET", f"http://{users}/poll", headers={"baggage": baggage})
        return conn.getresponse().read().decode()
    except Exception as exc:
        return type(exc).__name__
    finally:
        conn.close()
deadline = time.monotonic() + 20
while get() != "local" and time.monotonic() < deadline:
    time.sleep(0.05)
print("ready", flush=True)
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    body = get()
    if body == "baseline":
        print("baseline", time.monotonic(), flush=True)
        break
    time.sleep(0.02)
else:
    print("never", flush=True)
"""


class Hosts(Topology):
    """test_netns's topology with other hosts: a laptop and a services host beside the client."""

    ROLES = ("node", "client", "laptop", "services")

    def build(self) -> None:
        """Four namespaces; the node has one link to each of the others and forwards nothing."""
        for role in self.ROLES:
            _ip("netns", "add", self.ns(role))
            self.namespaces.append(self.ns(role))
            _ip("-n", self.ns(role), "link", "set", "lo", "up")
        for role, node_ip, far_ip in (("client", NODE_CLIENT_IP, CLIENT_IP), ("laptop", NODE_LAPTOP_IP, LAPTOP_IP),
                                      ("services", NODE_SERVICES_IP, SERVICES_IP)):
            node_end, far_end = self.link(role), f"t{self.tag}{role[0]}f"
            _ip("link", "add", node_end, "netns", self.ns("node"), "type", "veth", "peer", "name", far_end,
                "netns", self.ns(role))
            _ip("-n", self.ns("node"), "addr", "add", f"{node_ip}/24", "dev", node_end)
            _ip("-n", self.ns(role), "addr", "add", f"{far_ip}/24", "dev", far_end)
            _ip("-n", self.ns("node"), "link", "set", node_end, "up")
            _ip("-n", self.ns(role), "link", "set", far_end, "up")

    def env(self, **extra: str) -> dict[str, str]:
        """A turnout process's environment: this checkout, a private state directory."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TURNOUT_") and "proxy" not in k.lower()}
        env.update(PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(self.tmp / "state"), **extra)
        return env

    def spawn(self, role: str, args: list[str], log_name: str, **env: str) -> subprocess.Popen[bytes]:
        """A long-running process inside a namespace, its output in a log file."""
        with open(self.tmp / log_name, "wb") as log:
            process = subprocess.Popen(["ip", "netns", "exec", self.ns(role), *args], stdout=log,
                                       stderr=subprocess.STDOUT, env=self.env(**env), cwd=ROOT)
        self.processes.append(process)
        return process

    def run(self, role: str, args: list[str], timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        """A command inside a namespace, to completion."""
        return subprocess.run(["ip", "netns", "exec", self.ns(role), *args], capture_output=True, text=True,
                              env=self.env(**env), cwd=ROOT, timeout=timeout_s, check=False)

    def requests(self, *checks: dict[str, str]) -> list[dict[str, Any]]:
        """Requests from the client host through the node's proxy."""
        result = self.run("client", [sys.executable, "-c", CLIENT, EGRESS, USERS, ECHO, json.dumps(list(checks))])
        assert result.returncode == 0, result.stderr
        replies: list[dict[str, Any]] = json.loads(result.stdout)
        return replies


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """The four hosts, torn down even when the test fails."""
    unavailable = _unavailable()
    if unavailable is not None:
        pytest.skip(reason="network namespaces unavailable: " + unavailable)
    topo = Hosts(tmp_path)
    try:
        topo.build()
        yield topo
    finally:
        topo.close()


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _start_cluster(hosts: Hosts) -> list[Path]:
    """Services, control plane, node proxy and gateway; returns their logs once all are up."""
    tmp = hosts.tmp
    tokens = _write(tmp / "tokens.yaml", {"tokens": [
        {"identity": name, "groups": ["developers"], "sha256": hashlib.sha256(token.encode()).hexdigest()}
        for name, token in (("alice", ALICE), ("bob", BOB))]})
    auth = _write(tmp / "auth.yaml", {"tokens_file": str(tokens)})
    proxy_token = _write(tmp / "proxy.token", PROXY_TOKEN + "\n")
    gateway_token = _write(tmp / "gateway.token", GATEWAY_TOKEN + "\n")
    config = _write(tmp / "turnout.yaml", {
        "routing": {"debug_headers": True},
        "listeners": [
            {"name": "egress", "address": EGRESS, "mode": "outbound", "authorities": {USERS: "users", ECHO: "echo"}},
            {"name": "orders-in", "address": ORDERS, "mode": "inbound", "service": "orders",
             "baseline": f"{SERVICES_IP}:8081"}],
        "control_plane": {"address": "127.0.0.1:18000", "token_file": str(proxy_token), "node_id": "node-1",
                          "state_path": None},
        "limits": {"upstream_connect_timeout_s": 2.0, "drain_timeout_s": 2.0, "control_plane_reconnect_base_s": 0.1,
                   "control_plane_reconnect_max_s": 0.5},
    })
    hosts.spawn("services", [sys.executable, "-c", HTTP_SERVER, "baseline", SERVICES_IP, "8080"], "users.log")
    hosts.spawn("services", [sys.executable, "-c", HTTP_SERVER, "orders-baseline", SERVICES_IP, "8081"],
                "orders-baseline.log")
    hosts.spawn("services", [sys.executable, "-c", HTTP_SERVER, "orders-sandbox", SERVICES_IP, "8082"],
                "orders-sandbox.log")
    hosts.spawn("services", [sys.executable, "-c", GRPC_SERVER, "baseline", ECHO], "echo.log")
    hosts.spawn("node", [sys.executable, "-m", "turnout.cli", "control-plane", "--api", API.removeprefix("http://"),
                         "--grpc", "127.0.0.1:18000", "--db", str(tmp / "sessions.db"), "--auth", str(auth),
                         "--proxy-token-file", str(proxy_token), "--gateway-token-file", str(gateway_token),
                         "--id", "cp-1"], "control-plane.log")
    logs = [tmp / name for name in ("control-plane.log", "proxy.log", "gateway.log", "users.log", "echo.log")]
    _wait(lambda: " grpc 127.0.0.1:18000" in (tmp / "control-plane.log").read_text(), "control plane ready", logs)
    hosts.spawn("node", [sys.executable, "-m", "turnout.cli", "proxy", "--config", str(config)], "proxy.log")
    hosts.spawn("node", [sys.executable, "-m", "turnout.cli", "gateway", "--listen", GATEWAY, "--data-host",
                         "127.0.0.1", "--control-plane", API, "--token-file", str(gateway_token), "--id", "gw-1"],
                "gateway.log")
    _wait(lambda: "tunnels on tcp" in (tmp / "gateway.log").read_text(), "gateway ready", logs)
    _wait(lambda: hosts.requests({"kind": "h1"})[0].get("upstream") == "baseline", "baseline through the node", logs)
    return logs


def _connect(hosts: Hosts, token: str, log_name: str, *args: str) -> subprocess.Popen[bytes]:
    return hosts.spawn("laptop", [sys.executable, "-m", "turnout.cli", "connect", "--json", *args], log_name,
                       TURNOUT_CONTROL_PLANE=API, TURNOUT_TOKEN=token, TURNOUT_GATEWAY=GATEWAY)


def test_a_laptop_that_only_dials_out_takes_its_sessions_traffic(hosts: Hosts) -> None:
    logs = _start_cluster(hosts)
    turnout = [sys.executable, "-m", "turnout.cli"]

    # The laptop reaches the node's address for it, and nothing behind the node.
    unreachable = hosts.run("laptop", [sys.executable, "-c", "import socket; socket.create_connection(("
                                       f"'{SERVICES_IP}', 8080), timeout=2)"])
    assert unreachable.returncode != 0 and "unreachable" in unreachable.stderr.lower(), unreachable.stderr

    # alice's session: users from her laptop, orders on its sandbox in the cluster.
    created = hosts.run("laptop", [*turnout, "session", "create", "--id", "s1", "--key", "k1", "--route",
                                   "users=tunnel", "--route", f"orders={SERVICES_IP}:8082", "--no-wait"],
                        TURNOUT_CONTROL_PLANE=API, TURNOUT_TOKEN=ALICE)
    assert created.returncode == 0, created.stderr
    users = _connect(hosts, ALICE, "connect-users.log", "--session", "s1", "--service", "users", "--local",
                     "127.0.0.1:8080", "--", sys.executable, "-c", LOCAL_SERVER, ORDERS)
    hosts.spawn("laptop", [sys.executable, "-c", GRPC_SERVER, "local", "127.0.0.1:50051"], "local-echo.log")
    _connect(hosts, ALICE, "connect-echo.log", "--service", "echo", "--local", "127.0.0.1:50051", "--key", "kg")
    logs += [hosts.tmp / "connect-users.log", hosts.tmp / "connect-echo.log"]
    _wait(lambda: hosts.requests({"kind": "h1", "baggage": "turnout-session=k1"})[0].get("upstream") == "local",
          "users through the tunnel", logs)
    _wait(lambda: hosts.requests({"kind": "grpc_unary", "baggage": "turnout-session=kg"})[0].get("body")
          == "local:hi", "echo through the tunnel", logs)

    # Nobody in the cluster can open a connection to the laptop's processes.
    for port in (8080, 50051):
        refused = hosts.run("node", [sys.executable, "-c", "import socket; socket.create_connection(("
                                     f"'{LAPTOP_IP}', {port}), timeout=2)"])
        assert refused.returncode != 0 and "refused" in refused.stderr.lower(), refused.stderr

    # HTTP/1.1, HTTP/2 and gRPC over the tunnel; no key, baseline.
    h1, h2, unary, stream, plain, plain_grpc = hosts.requests(
        {"kind": "h1", "baggage": "userId=7,turnout-session=k1"}, {"kind": "h2", "baggage": "turnout-session=k1"},
        {"kind": "grpc_unary", "baggage": "turnout-session=kg"},
        {"kind": "grpc_stream", "baggage": "turnout-session=kg"}, {"kind": "h1"}, {"kind": "grpc_unary"})
    assert (h1["status"], h1["body"]) == (200, "local"), h1
    assert (h2["status"], h2["body"], h2["version"]) == (200, "local", "HTTP/2"), h2
    assert unary["body"] == "local:hi" and stream["body"] == "local:0,local:1,local:2", (unary, stream)
    assert plain["body"] == "baseline" and plain_grpc["body"] == "baseline:hi", (plain, plain_grpc)

    # The local process calls orders without propagating baggage: the call leaves from the
    # cluster with the session's key added, and the node proxy routes it inside the session.
    (call,) = hosts.requests({"kind": "h1", "baggage": "turnout-session=k1", "path": "/call"})
    assert call["status"] == 200, call
    orders = json.loads(call["body"])
    assert orders["body"] == "orders-sandbox" and "turnout-session=k1" in orders["baggage"], orders

    # bob cannot attach to alice's session.
    bob = hosts.run("laptop", [*turnout, "connect", "--session", "s1", "--service", "users", "--local",
                               "127.0.0.1:8080"], TURNOUT_CONTROL_PLANE=API, TURNOUT_TOKEN=BOB, TURNOUT_GATEWAY=GATEWAY)
    assert bob.returncode == 1 and "alice" in bob.stderr, (bob.returncode, bob.stderr)

    # The laptop's link is cut: baseline answers within a second.
    poller = subprocess.Popen(["ip", "netns", "exec", hosts.ns("client"), sys.executable, "-c", POLLER, EGRESS, USERS,
                               "turnout-session=k1"], stdout=subprocess.PIPE, text=True, env=hosts.env(), cwd=ROOT)
    hosts.processes.append(poller)
    assert poller.stdout is not None
    assert poller.stdout.readline().strip() == "ready"
    cut_at = time.monotonic()
    _ip("-n", hosts.ns("node"), "link", "set", hosts.link("laptop"), "down")
    seen = poller.stdout.readline().split()
    gateway_log = (hosts.tmp / "gateway.log").read_text()
    assert seen and seen[0] == "baseline", f"no fallback after the cut: {seen}\n{gateway_log}"
    fell_back_s = float(seen[1]) - cut_at
    assert fell_back_s < 1.0, f"baseline answered {fell_back_s:.3f} s after the cut"
    poller.wait(10)

    # The link is back: connect redials by itself and the session routes to the laptop again.
    _ip("-n", hosts.ns("node"), "link", "set", hosts.link("laptop"), "up")
    _wait(lambda: hosts.requests({"kind": "h1", "baggage": "turnout-session=k1"})[0].get("upstream") == "local",
          "users through the tunnel after the link is back", logs, timeout_s=40)
    assert users.poll() is None, (hosts.tmp / "connect-users.log").read_text()
    print(f"fallback {fell_back_s * 1000:.0f} ms after the cut")
