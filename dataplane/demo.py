"""``turnout demo``: labelled upstreams, the proxy in front of them, and requests that show
each routing case.

It starts a baseline, a sandbox and a mirror-target upstream (each answers with its own
label), writes a bootstrap file with demo sessions, runs ``turnout proxy`` on it, sends
one request per routing case through the proxy and prints where each went. Then it
prints curl lines and the admin URLs and keeps everything running until Ctrl-C (or exits
at once with ``--once``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

import yaml

# Preferred ports, so the printed curl lines are stable; a busy port is replaced by a free one.
_PORTS = {"proxy": 15001, "admin": 9901, "baseline": 18080, "sandbox": 18081, "mirror": 18082}


def demo_config(ports: dict[str, int]) -> dict[str, Any]:
    """The demo's bootstrap configuration."""
    return {
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


async def run_demo_async(out: TextIO, once: bool) -> int:
    """Start everything, show the routing cases, wait for Ctrl-C (or not, with ``once``)."""
    loop = asyncio.get_running_loop()
    ports = _pick_ports()
    seen: dict[str, list[str]] = {"baseline": [], "sandbox": [], "mirror": []}
    servers = [await loop.create_server(lambda n=name: _Labelled(n, seen[n]), "127.0.0.1", ports[name])  # type: ignore[misc]
               for name in ("baseline", "sandbox", "mirror")]
    tmp = Path(tempfile.mkdtemp(prefix="turnout-demo-"))
    config_path = tmp / "turnout.yaml"
    config_path.write_text(yaml.safe_dump(demo_config(ports), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log_path = tmp / "proxy.log"
    with open(log_path, "wb") as log:
        proxy = await asyncio.create_subprocess_exec(sys.executable, "-m", "dataplane.cli", "proxy", "--config",
                                                     str(config_path), env=env, stdout=log, stderr=log)
    try:
        if not await _wait_ready(ports["admin"], proxy):
            out.write("turnout demo: the proxy did not become ready:\n" + log_path.read_text(errors="replace"))
            return 1
        out.write(f"turnout demo: proxy on 127.0.0.1:{ports['proxy']} fronting service 'users'\n"
                  f"  baseline 127.0.0.1:{ports['baseline']}, sandbox 127.0.0.1:{ports['sandbox']}, "
                  f"mirror target 127.0.0.1:{ports['mirror']}\n  config {config_path}, proxy log {log_path}\n\n")
        rows = [("REQUEST", "STATUS", "SERVED BY", "ROUTE", "WHY")]
        for method, target, headers, why in DEMO_REQUESTS:
            status, served, route = await _request(ports["proxy"], method, target, headers)
            shown = " ".join([method, target, *(f"[{k}: {v}]" for k, v in headers)])
            rows.append((shown, str(status), served, route, why))
        await asyncio.sleep(0.2)  # let the mirrored copy land
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            out.write("  ".join(c.ljust(widths[i]) for i, c in enumerate(row[:4])) + "  " + row[4] + "\n")
        out.write(f"\nThe mirror target received {len(seen['mirror'])} copy(ies): {seen['mirror']}\n")
        p, a = ports["proxy"], ports["admin"]
        out.write(
            "\nTry it:\n"
            f"  curl -i http://127.0.0.1:{p}/api/users\n"
            f"  curl -i -H 'baggage: turnout-session=abc123' http://127.0.0.1:{p}/api/users\n"
            f"  curl -i -H 'baggage: turnout-session=agent7' -d '{{}}' http://127.0.0.1:{p}/api/users\n"
            "Admin:\n"
            f"  http://127.0.0.1:{a}/ready  /healthz  /metrics  /config_dump\n"
            f"  http://127.0.0.1:{a}/explain?service=users&header=baggage:turnout-session%3Dabc123\n"
        )
        if once:
            return 0
        out.write("\nRunning; press Ctrl-C to stop everything.\n")
        out.flush()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        return 0
    finally:
        if proxy.returncode is None:
            proxy.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proxy.wait(), 30)
            except TimeoutError:
                proxy.kill()
                await proxy.wait()
        for server in servers:
            server.close()
        shutil.rmtree(tmp, ignore_errors=True)
        out.write("turnout demo: stopped\n")
        out.flush()


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


def run_demo(out: TextIO, once: bool = False) -> int:
    """Entry point of ``turnout demo``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run_demo_async(out, once))
    return int(uvloop.run(run_demo_async(out, once)))

