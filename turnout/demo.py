"""``turnout demo``: labelled upstreams, the control plane, the proxy, and requests that
show each routing case.

It starts a baseline, a sandbox and a mirror-target upstream (each answers with its own
label), ``turnout control-plane`` with a fresh token, and ``turnout proxy`` with static demo
sessions and a connection to that control plane. It sends one request per routing case
through the proxy and prints where each went; then it runs the ``turnout session create``
line that makes a new key route to the sandbox, shows the next request going there, and
prints that line, curl lines and the admin URLs. Everything keeps running until Ctrl-C
(or stops at once with ``--once``). The demo starts its processes as commands; it imports
neither the control plane nor the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

# Preferred ports, so the printed lines are stable; a busy port is replaced by a free one.
# The control plane's API takes the session commands' default address.
_PORTS = {"proxy": 15001, "admin": 9901, "baseline": 18181, "sandbox": 18182, "mirror": 18183,
          "cp_api": 18080, "cp_grpc": 18000}
LIVE_KEY = "live42"


def demo_config(ports: dict[str, int], runtime: Path | None = None) -> dict[str, Any]:
    """The demo's bootstrap configuration (with the control plane when ``runtime`` is given)."""
    config: dict[str, Any] = {
        "admin": {"address": f"127.0.0.1:{ports['admin']}"},
        "routing": {
            "debug_headers": True,
            "key_sources": [
                {"from": "baggage", "names": ["turnout-session", "sd-routing-key", "mirrord-session"]},
                {"from": "query", "names": ["turnout-session"]},
                {"from": "cookie", "names": ["turnout-session"]},
            ],
        },
        "listeners": [{"name": "users-in", "address": f"127.0.0.1:{ports['proxy']}", "mode": "inbound",
                       "service": "users", "baseline": f"127.0.0.1:{ports['baseline']}"}],
        "sessions": [
            {"id": "fix-123", "key": "abc123", "owner": "alice@example.com", "ttl_s": 7200,
             "routes": [{"service": "users", "destination": f"127.0.0.1:{ports['sandbox']}"}]},
            {"id": "agent-7", "key": "agent7", "owner": "ci-agent",
             "routes": [{"service": "users", "destination": f"127.0.0.1:{ports['mirror']}", "mode": "mirror"}]},
            {"id": "bob-writes", "priority": 10,
             "routes": [{"service": "users", "destination": f"127.0.0.1:{ports['sandbox']}",
                         "match": {"all_of": [{"header": {"name": "x-user", "exact": "bob"}},
                                              {"method": ["POST", "PUT"]}]}}]},
            {"id": "carol-mirrord",
             "routes": [{"service": "users", "destination": f"127.0.0.1:{ports['sandbox']}",
                         "match": {"http_filter": {"header_filter": "^x-dev: carol"}}}]},
        ],
    }
    if runtime is not None:
        config["control_plane"] = {"address": f"127.0.0.1:{ports['cp_grpc']}", "token_file": str(runtime / "token"),
                                   "node_id": "demo-proxy", "cluster": "demo",
                                   "state_path": str(runtime / "proxy-state.json")}
    return config


# (method, target, headers, what it shows)
DEMO_REQUESTS: list[tuple[str, str, list[tuple[str, str]], str]] = [
    ("GET", "/api/users", [], "no routing key"),
    ("GET", "/api/users", [("baggage", "userId=42,turnout-session=abc123")], "key in W3C baggage"),
    ("GET", "/api/users", [("baggage", "sd-routing-key=abc123")], "Signadot-style member name"),
    ("GET", "/api/users?turnout-session=abc123", [], "key from a shared preview link"),
    ("GET", "/api/users", [("cookie", "theme=dark; turnout-session=abc123")], "key from a cookie"),
    ("POST", "/api/users", [("baggage", "turnout-session=agent7")], "mirror: baseline answers"),
    ("POST", "/api/users", [("x-user", "bob")], "filter-only session"),
    ("GET", "/api/users", [("x-user", "bob")], "filter needs POST or PUT"),
    ("GET", "/", [("X-Dev", "Carol")], "mirrord header_filter"),
    ("GET", "/", [("baggage", "turnout-session=nope")], "unknown key"),
]


def _pick_ports() -> dict[str, int]:
    ports = {}
    for name, preferred in _PORTS.items():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                ports[name] = preferred
            except OSError:
                s.bind(("127.0.0.1", 0))
                ports[name] = s.getsockname()[1]
    return ports


class _Labelled(asyncio.Protocol):
    """A tiny upstream: answers every request with its label and what it received."""

    def __init__(self, label: str, seen: list[str]) -> None:
        self.label = label
        self.seen = seen
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buf = rest[length:]
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.seen.append(request_line)
            body = f"hello from {self.label}: {request_line}\n".encode()
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n"
                                 b"x-served-by: %s\r\n\r\n%s" % (len(body), self.label.encode(), body))


async def _request(port: int, method: str, target: str, headers: list[tuple[str, str]]) -> tuple[int, str, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"demo": true}' if method in ("POST", "PUT") else b""
    lines = [f"{method} {target} HTTP/1.1", "host: users", "connection: close", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
    return int(head[0].split()[1]), fields.get("x-served-by", "-"), fields.get("x-turnout-route", "-")


async def run_demo_async(out: TextIO, once: bool, as_json: bool = False) -> int:
    """Start everything, show the routing cases, wait for Ctrl-C (or not, with ``once``)."""
    loop = asyncio.get_running_loop()
    ports = _pick_ports()
    seen: dict[str, list[str]] = {"baseline": [], "sandbox": [], "mirror": []}
    servers = [await loop.create_server(lambda n=name: _Labelled(n, seen[n]), "127.0.0.1", ports[name])  # type: ignore[misc]
               for name in ("baseline", "sandbox", "mirror")]
    tmp = Path(tempfile.mkdtemp(prefix="turnout-demo-"))
    token_file = tmp / "token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    config_path = tmp / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(ports, tmp), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    children: list[asyncio.subprocess.Process] = []
    cp_log, proxy_log = tmp / "control-plane.log", tmp / "proxy.log"
    cp_url = f"http://127.0.0.1:{ports['cp_api']}"
    try:
        control_plane = await _spawn(children, env, cp_log, "control-plane", "--api", f"127.0.0.1:{ports['cp_api']}",
                                     "--grpc", f"127.0.0.1:{ports['cp_grpc']}", "--db", str(tmp / "sessions.db"),
                                     "--token-file", str(token_file), "--id", "demo")
        if not await _wait_log(cp_log, "api http", control_plane):
            out.write("turnout demo: the control plane did not start:\n" + cp_log.read_text(errors="replace"))
            return 1
        proxy = await _spawn(children, env, proxy_log, "proxy", "--config", str(config_path))
        if not await _wait_ready(ports["admin"], proxy):
            out.write("turnout demo: the proxy did not become ready:\n" + proxy_log.read_text(errors="replace"))
            return 1
        if not as_json:
            out.write(f"turnout demo: proxy on 127.0.0.1:{ports['proxy']} fronting service 'users'\n"
                      f"  baseline 127.0.0.1:{ports['baseline']}, sandbox 127.0.0.1:{ports['sandbox']}, "
                      f"mirror target 127.0.0.1:{ports['mirror']}\n"
                      f"  control plane {cp_url} (gRPC 127.0.0.1:{ports['cp_grpc']}), token in {token_file}\n"
                      f"  config {config_path}, logs in {tmp}\n\n")
        rows = [("REQUEST", "STATUS", "SERVED BY", "ROUTE", "WHY")]
        for method, target, headers, why in DEMO_REQUESTS:
            status, served, route = await _request(ports["proxy"], method, target, headers)
            shown = " ".join([method, target, *(f"[{k}: {v}]" for k, v in headers)])
            rows.append((shown, str(status), served, route, why))
        await asyncio.sleep(0.2)  # let the mirrored copy land
        if as_json:
            for row in rows[1:]:
                _json_row(out, row)
        else:
            _table(out, rows)
            out.write(f"\nThe mirror target received {len(seen['mirror'])} copy(ies): {seen['mirror']}\n")
        if not await _live_session(out, env, ports, cp_url, token_file, as_json):
            return 1
        p, a = ports["proxy"], ports["admin"]
        turnout = _turnout_command()
        if as_json:
            out.write(json.dumps({"proxy": f"127.0.0.1:{p}", "admin": f"127.0.0.1:{a}", "control_plane": cp_url,
                                  "token_file": str(token_file), "mirror_copies": len(seen["mirror"]),
                                  "turnout": turnout}) + "\n")
        else:
            out.write(
                "\nTry it:\n"
                f"  curl -i http://127.0.0.1:{p}/api/users\n"
                f"  curl -i -H 'baggage: turnout-session=abc123' http://127.0.0.1:{p}/api/users\n"
                f"  curl -i -H 'baggage: turnout-session={LIVE_KEY}' http://127.0.0.1:{p}/api/users\n"
                f"  curl -i -H 'baggage: turnout-session=agent7' -d '{{}}' http://127.0.0.1:{p}/api/users\n"
                "Sessions (the control plane pushes each change to the proxy):\n"
                f"  export TURNOUT_CONTROL_PLANE={cp_url} TURNOUT_TOKEN=$(cat {token_file})\n"
                f"  {turnout} session list; {turnout} status\n"
                f"  {turnout} session create --key mine --route users=127.0.0.1:{ports['sandbox']} --ttl 30m\n"
                f"  {turnout} session delete live-1\n"
                f"  {turnout} explain --admin 127.0.0.1:{a} --service users -H 'baggage: turnout-session=abc123'\n"
                "Admin:\n"
                f"  http://127.0.0.1:{a}/ready  /healthz  /metrics  /config_dump\n"
                f"  http://127.0.0.1:{a}/explain?service=users&header=baggage:turnout-session%3Dabc123\n"
            )
            if turnout != "turnout":
                out.write("  (turnout is not on your PATH: `source .venv/bin/activate` puts it there)\n")
        if once:
            return 0
        if not as_json:
            out.write("\nRunning; press Ctrl-C to stop everything.\n")
        out.flush()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        return 0
    finally:
        for child in reversed(children):
            await _stop(child)
        for server in servers:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if not as_json:
            out.write("turnout demo: stopped\n")
        out.flush()


async def _live_session(out: TextIO, env: dict[str, str], ports: dict[str, int], cp_url: str,
                        token_file: Path, as_json: bool) -> bool:
    """Create a session through the control plane and show the proxy routing it."""
    args = ["session", "create", "--id", "live-1", "--key", LIVE_KEY, "--route", f"users=127.0.0.1:{ports['sandbox']}",
            "--ttl", "1h", "--owner", "demo", "--control-plane", cp_url, "--token-file", str(token_file)]
    if not as_json:
        out.write("\nA session from the control plane: the demo runs\n  turnout " + " ".join(args) + "\n")
    create = await asyncio.create_subprocess_exec(sys.executable, "-m", "turnout.cli", *args, env=env,
                                                  stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    printed, _ = await asyncio.wait_for(create.communicate(), 30)
    created = time.monotonic()
    if create.returncode != 0:
        out.write("turnout demo: session create failed:\n" + printed.decode(errors="replace"))
        return False
    if not as_json:
        out.write("".join("  | " + line + "\n" for line in printed.decode(errors="replace").splitlines()))
    headers = [("baggage", "turnout-session=" + LIVE_KEY)]
    served, route, status = "-", "-", 0
    while time.monotonic() - created < 10:
        status, served, route = await _request(ports["proxy"], "GET", "/api/users", headers)
        if served == "sandbox":
            break
        await asyncio.sleep(0.01)
    elapsed_ms = (time.monotonic() - created) * 1000
    row = (f"GET /api/users [baggage: turnout-session={LIVE_KEY}]", str(status), served, route,
           f"pushed by the control plane; routed {elapsed_ms:.0f} ms after the create returned")
    if as_json:
        _json_row(out, row)
    else:
        _table(out, [("REQUEST", "STATUS", "SERVED BY", "ROUTE", "WHY"), row])
    return served == "sandbox"


def _json_row(out: TextIO, row: tuple[str, str, str, str, str]) -> None:
    out.write(json.dumps(dict(zip(("request", "status", "served_by", "route", "why"), row, strict=True))) + "\n")


def _turnout_command() -> str:
    """``turnout`` when it is on PATH, else the path of the one running this demo."""
    if shutil.which("turnout"):
        return "turnout"
    beside = Path(sys.executable).parent / "turnout"
    return str(beside) if beside.exists() else "turnout"


def _table(out: TextIO, rows: list[tuple[str, str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        out.write("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:4])) + "  " + row[4] + "\n")


async def _spawn(children: list[asyncio.subprocess.Process], env: dict[str, str], log_path: Path,
                 *args: str) -> asyncio.subprocess.Process:
    with open(log_path, "wb") as log:
        child = await asyncio.create_subprocess_exec(sys.executable, "-m", "turnout.cli", *args, env=env, stdout=log,
                                                     stderr=log)
    children.append(child)
    return child


async def _stop(child: asyncio.subprocess.Process) -> None:
    if child.returncode is None:
        child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), 30)
        except TimeoutError:
            child.kill()
            await child.wait()


async def _wait_log(path: Path, text: str, child: asyncio.subprocess.Process) -> bool:
    for _ in range(400):  # 20 s
        if child.returncode is not None:
            return False
        if text in path.read_text(errors="replace"):
            return True
        await asyncio.sleep(0.05)
    return False


async def _wait_ready(admin_port: int, proxy: asyncio.subprocess.Process) -> bool:
    for _ in range(400):  # 20 s
        if proxy.returncode is not None:
            return False
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
            writer.write(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
            data = await reader.read()
            writer.close()
            if data.startswith(b"HTTP/1.1 200"):
                return True
        await asyncio.sleep(0.05)
    return False


def explain_config() -> dict[str, Any]:
    """The demo sessions, for ``turnout explain --demo``."""
    return demo_config(dict(_PORTS))


def run_demo(out: TextIO, once: bool = False, as_json: bool = False) -> int:
    """Entry point of ``turnout demo``."""
    import uvloop

    return int(uvloop.run(run_demo_async(out, once, as_json)))

