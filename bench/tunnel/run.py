"""Latency and throughput through a remocal tunnel, against a direct sandbox, in the same run.

Usage (from the repository root)::

    .venv/bin/python -m bench.tunnel.run [--rate 200] [--seconds 10] [--rounds 2] [--max-seconds 5]
                                         [--concurrency 16] [--json bench/tunnel/results.json]

It starts, on 127.0.0.1: a small uvloop HTTP/1.1 upstream (``200 ok``), the control plane, a
proxy fronting ``users`` with that upstream as baseline, ``turnout gateway`` and ``turnout
connect --local <upstream>``; then two sessions route the same upstream: key ``direct`` (a
pod destination: proxy -> upstream) and key ``tunnel`` (proxy -> gateway data port -> tunnel
-> connect -> upstream). Each round sends ``--rate`` requests a second (open loop, each
timed from when it was due, so a stall is never hidden) for ``--seconds`` with each key,
alternating; then the most requests a second through the tunnel (and direct) with
``--concurrency`` requests in flight for ``--max-seconds``. Every process is stopped at the
end. Figures are for this machine as it is: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import uvloop
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "bench-admin-token-0123456789"
GATEWAY_TOKEN = "bench-gateway-token-0123456789"
_RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# ---------------------------------------------------------------------- the upstream (its own process)


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")  # GETs without bodies
        if count and self.transport is not None:
            self.buffer = self.buffer[self.buffer.rfind(b"\r\n\r\n") + 4:]
            self.transport.write(_RESPONSE * count)


async def _serve_upstream(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------- processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(args: list[str], log: Path, ready: str, env: dict[str, str], timeout_s: float = 30) -> tuple[
        subprocess.Popen[str], str]:
    with open(log, "wb") as err:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready_now, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready_now:
            break
        line = process.stdout.readline()
        if not line:
            break
        if ready in line:
            return process, line
    process.kill()
    raise RuntimeError(f"{args[3] if len(args) > 3 else args}: not ready:\n{log.read_text()}")


def _api(url: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, method=method, data=data,
                                     headers={"authorization": "Bearer " + TOKEN, "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


# ---------------------------------------------------------------------- load


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes) -> None:
    writer.write(head)
    await reader.readuntil(b"\r\n\r\n")  # the head; the body is 2 bytes
    await reader.readexactly(2)


async def paced(port: int, key: str, rate: float, seconds: float, connections: int = 16) -> list[float]:
    """Open loop: request i is due at start + i/rate; its latency counts from then (ms)."""
    head = f"GET /bench HTTP/1.1\r\nhost: users\r\nbaggage: turnout-session={key}\r\n\r\n".encode()
    idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() ticks in whole milliseconds
    start = clock() + 0.05
    total = int(rate * seconds)

    async def one(due: float) -> None:
        conn = await idle.get()
        await _request(*conn, head)
        latencies.append((clock() - due) * 1000)
        idle.put_nowait(conn)

    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(due)))
    await asyncio.gather(*tasks)
    while not idle.empty():
        _, writer = idle.get_nowait()
        writer.close()
    return latencies


async def closed_loop(port: int, key: str, concurrency: int, seconds: float) -> float:
    """``concurrency`` requests always in flight for ``seconds``: requests a second."""
    head = f"GET /bench HTTP/1.1\r\nhost: users\r\nbaggage: turnout-session={key}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while loop.time() < deadline:
            await _request(reader, writer, head)
            done += 1
        writer.close()

    started = loop.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (loop.time() - started)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="turnout-bench-tunnel-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_STATE_HOME=str(tmp / "state"))
    env.pop("TURNOUT_TOKEN", None)
    (tmp / "admin.token").write_text(TOKEN)
    (tmp / "gateway.token").write_text(GATEWAY_TOKEN)
    py = sys.executable
    processes: list[subprocess.Popen[str]] = []
    try:
        upstream_port = _free_port()
        upstream, _ = _start([py, "-m", "bench.tunnel.run", "--upstream", str(upstream_port)], tmp / "upstream.log",
                             "ready", env)
        processes.append(upstream)
        cp, line = _start([py, "-m", "turnout.cli", "control-plane", "--api", "127.0.0.1:0", "--grpc", "127.0.0.1:0",
                           "--db", str(tmp / "s.db"), "--token-file", str(tmp / "admin.token"),
                           "--gateway-token-file", str(tmp / "gateway.token")], tmp / "cp.log", "api http", env)
        processes.append(cp)
        match = re.search(r"api (http://[0-9.:]+) grpc ([0-9.:]+)", line)
        assert match is not None
        api, grpc_target = match.groups()
        proxy_port, admin_port = _free_port(), _free_port()
        config = {"admin": {"address": f"127.0.0.1:{admin_port}"},
                  "listeners": [{"name": "users-in", "address": f"127.0.0.1:{proxy_port}", "mode": "inbound",
                                 "service": "users", "baseline": f"127.0.0.1:{upstream_port}"}],
                  "control_plane": {"address": grpc_target, "token_file": str(tmp / "admin.token"),
                                    "node_id": "bench", "state_path": None}}
        (tmp / "proxy.yaml").write_text(yaml.safe_dump(config))
        with open(tmp / "proxy.log", "wb") as log:
            proxy = subprocess.Popen([py, "-m", "dataplane.cli", "proxy", "--config", str(tmp / "proxy.yaml"),
                                      "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     text=True)
        processes.append(proxy)
        gateway, line = _start([py, "-m", "turnout.cli", "gateway", "--listen", "127.0.0.1:0", "--control-plane", api,
                                "--token-file", str(tmp / "gateway.token"), "--id", "gw-bench"], tmp / "gateway.log",
                               "tunnels on", env)
        processes.append(gateway)
        gateway_address = re.search(r"tcp ([0-9.]+:\d+)", line).group(1)  # type: ignore[union-attr]
        _api(api, "POST", "/v1/sessions", {"id": "direct", "key": "direct", "routes": [
            {"service": "users", "destination": f"127.0.0.1:{upstream_port}"}]})
        connect_env = dict(env, TURNOUT_CONTROL_PLANE=api, TURNOUT_TOKEN=TOKEN, TURNOUT_GATEWAY=gateway_address)
        # Without --json: one line per event, none per request (stdout is not read after this).
        connect, _ = _start([py, "-m", "turnout.cli", "connect", "--service", "users", "--local",
                             f"127.0.0.1:{upstream_port}", "--key", "tunnel"], tmp / "connect.log", "tunnel up",
                            connect_env)
        processes.append(connect)
        result: dict[str, Any] = uvloop.run(_measure(args, proxy_port, admin_port))
        # A tunnel given up during the run (a starved process misses its PINGs) shows in the tail.
        result["tunnel_losses"] = (tmp / "gateway.log").read_text().count(" lost (")
        return result
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT if process is processes[-1] else signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


async def _measure(args: argparse.Namespace, port: int, admin_port: int) -> dict[str, Any]:
    # Both keys must route before measuring: the tunnel session arrives by push.
    deadline = time.monotonic() + 20
    for key in ("direct", "tunnel"):
        while True:
            with contextlib.suppress(OSError):
                report = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{admin_port}/explain?service=users&header=baggage:turnout-session%3D{key}",
                    timeout=5).read())
                if report["decision"]["kind"] == "sandbox" and report["decision"].get("tunnel_connected", True):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"key {key} does not route")
            await asyncio.sleep(0.1)
    await paced(port, "tunnel", args.rate, 1.0)  # warm both paths' connections
    await paced(port, "direct", args.rate, 1.0)
    samples: dict[str, list[float]] = {"direct": [], "tunnel": []}
    for _ in range(args.rounds):
        for key in ("direct", "tunnel"):
            samples[key] += await paced(port, key, args.rate, args.seconds)
    result: dict[str, Any] = {"rate": args.rate, "seconds_per_round": args.seconds, "rounds": args.rounds,
                              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    for key, values in samples.items():
        result[key] = {"count": len(values), "p50_ms": round(statistics.median(values), 3),
                       "p99_ms": round(_percentile(values, 0.99), 3), "max_ms": round(max(values), 3)}
    result["added_p50_ms"] = round(result["tunnel"]["p50_ms"] - result["direct"]["p50_ms"], 3)
    result["added_p99_ms"] = round(result["tunnel"]["p99_ms"] - result["direct"]["p99_ms"], 3)
    result["max_rps"] = {key: round(await closed_loop(port, key, args.concurrency, args.max_seconds), 1)
                         for key in ("direct", "tunnel")}
    result["concurrency"] = args.concurrency
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tunnel.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.upstream is not None:
        uvloop.run(_serve_upstream(args.upstream))
        return 0
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
