"""In-process HTTP/1.1 proxy harness: the real per-request Python path, no sockets.

Usage (from the repository root)::

    .venv/bin/python -m bench.http1.harness                      # µs of CPU per request
    .venv/bin/python -m bench.http1.harness --requests 300000 --rounds 7
    .venv/bin/python -m bench.http1.harness --profile cprofile   # top functions by own time
    .venv/bin/python -m bench.http1.harness --callgrind          # instructions per request
    .venv/bin/python -m bench.http1.harness --show               # the bytes each side sees
    .venv/bin/python -m bench.http1.harness --codec h11

It builds a real ``Proxy`` (its router, upstreams and runtime) from the same rules as
``bench/http1/turnout.yaml`` (one inbound listener for service ``bench``; session ``bench``
routes baggage ``turnout-session=bench`` to the sandbox), opens ``--connections`` client
connections (``H1Server``) and pools as many upstream connections (``H1Client``) per
destination, all on fake transports. Each request: the client's head goes into
``H1Server.data_received``; the head the proxy writes upstream is answered with an
nginx-like 100-byte Content-Length response through ``H1Client.data_received``;
the client's response is checked on the first requests. Connections are used round robin,
keep-alive, so the pool, the timers and the metrics run as under wrk.

The event loop is created but never run: nothing on this path awaits. CPU time is
``time.process_time``; the fake transports' own cost is measured alone and reported, not
subtracted. ``--callgrind`` runs the harness twice under ``valgrind --tool=callgrind``
(N and 2N requests) and reports the difference per request, which is repeatable while
other jobs load the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from dataplane.config import parse_config_text
from dataplane.http1.client import H1Client
from dataplane.http1.server import H1Server
from dataplane.proxy import Proxy

BASELINE_PORT = 18080
SANDBOX_PORT = 18081
CONFIG = f"""
routing:
  baggage_keys: [turnout-session]
listeners:
  - name: bench
    address: 127.0.0.1:15001
    mode: inbound
    service: bench
    baseline: 127.0.0.1:{BASELINE_PORT}
sessions:
  - id: bench
    key: bench
    routes:
      - service: bench
        destination: 127.0.0.1:{SANDBOX_PORT}
limits:
  upstream_max_idle_per_destination: 1024
"""

# What a browser-ish client or an instrumented service sends: a handful of common fields.
REQUEST = (
    b"GET /api/users/42?fields=name,email HTTP/1.1\r\n"
    b"Host: users.default.svc.cluster.local:8080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n"
    b"Accept: application/json, text/plain, */*\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
    b"%s"
    b"\r\n"
)
ROUTED = b"baggage: userId=42,turnout-session=bench\r\n"
# What wrk sends (bench/http1/run.py): the request line, Host, and -H lines.
WRK_REQUEST = b"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:15001\r\n%s\r\n"
WRK_ROUTED = b"baggage: turnout-session=bench\r\n"
BODY = b"x" * 99 + b"\n"
# nginx 1.22 `return 200 "..."` with server_tokens off, as the bench upstream answers.
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx\r\n"
    b"Date: Sun, 29 Nov 2026 20:37:21 GMT\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 100\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n" + BODY
)


class FakeTransport:
    """Just enough of an asyncio transport for the proxy; keeps the last write."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.last: Any = None
        self.closing = False
        self.on_write: Any = None

    def write(self, data: bytes) -> None:
        self.last = data
        if self.on_write is not None:
            self.on_write()

    def writelines(self, parts: Any) -> None:
        self.last = parts
        if self.on_write is not None:
            self.on_write()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


class Harness:
    """A proxy with client connections and a warm upstream pool, all fake."""

    def __init__(self, codec: str, connections: int) -> None:
        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        config = parse_config_text(CONFIG, "harness")
        self.proxy = proxy = Proxy(config, codec, self.loop, "0")
        listener = config.listeners[0]
        self.clients: list[tuple[H1Server, FakeTransport]] = []
        for i in range(connections):
            down = H1Server(proxy.router, proxy.connections, listener)
            transport = FakeTransport((f"10.0.0.{i % 250 + 1}", 40000 + i))
            down.connection_made(transport)  # type: ignore[arg-type]
            self.clients.append((down, transport))
        # The upstream whose transport was written to last: the one to answer.
        self.pending: H1Client | None = None
        upstreams = proxy.upstreams
        runtime = proxy.runtime
        for port in (BASELINE_PORT, SANDBOX_PORT):
            destination = config.snapshot.sessions[0].routes[0].destination
            assert destination is not None
            address = type(destination)(destination.host, port)
            for _ in range(connections):
                conn = H1Client(upstreams, address, runtime.limits, runtime.codec)
                up_transport = FakeTransport(("127.0.0.1", port))
                up_transport.on_write = self._marker(conn)
                conn.connection_made(up_transport)  # type: ignore[arg-type]
                upstreams.h1.add(conn)
                upstreams.release(conn)

    def _marker(self, conn: H1Client) -> Any:
        def wrote() -> None:
            self.pending = conn
        return wrote

    def one(self, down: H1Server, request: bytes) -> H1Client:
        """One request through the proxy; returns the upstream connection it used."""
        down.data_received(request)
        up = self.pending
        assert up is not None, "the proxy sent nothing upstream"
        self.pending = None
        up.data_received(RESPONSE)
        return up

    def run(self, request: bytes, count: int) -> None:
        """``count`` requests, round robin over the client connections."""
        clients = [down for down, _ in self.clients]
        n = len(clients)
        one = self.one
        for i in range(count):
            one(clients[i % n], request)

    def check(self, request: bytes, routed: bool) -> tuple[bytes, bytes]:
        """One request with every check; returns (upstream head, client response)."""
        down, client = self.clients[0]
        up = self.one(down, request)
        assert up.transport is not None
        head = up.transport.last  # type: ignore[attr-defined]
        expected_port = SANDBOX_PORT if routed else BASELINE_PORT
        assert up.address.port == expected_port, (up.address, routed)
        out = client.last
        response = b"".join(out) if isinstance(out, (list, tuple)) else out
        assert response.startswith(b"HTTP/1.1 200 OK\r\n"), response
        assert response.endswith(b"\r\n\r\n" + BODY), response
        assert not client.closing and down.phase == 0, "keep-alive connection was not kept"
        return head, response


def fake_overhead_us(count: int) -> float:
    """CPU µs per request of the fake transports and the loop driving them, alone."""
    transport = FakeTransport(("127.0.0.1", 1))
    holder: list[Any] = [None]

    def wrote() -> None:
        holder[0] = transport

    transport.on_write = wrote
    start = time.process_time()
    for _ in range(count):
        transport.write(REQUEST)
        holder[0] = None
        transport.writelines([RESPONSE])
    return (time.process_time() - start) / count * 1e6


def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    """µs per request for each case, one list entry per round."""
    harness = Harness(args.codec, args.connections)
    cases = {
        "unrouted": REQUEST % b"",
        "routed": REQUEST % ROUTED,
        "wrk-unrouted": WRK_REQUEST % b"",
        "wrk-routed": WRK_REQUEST % WRK_ROUTED,
    }
    if args.cases:
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
    for name, request in cases.items():
        harness.check(request, "routed" in name and "unrouted" not in name)
        harness.run(request, min(args.requests, 20000))  # warm up
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, request in cases.items():
            start = time.process_time()
            harness.run(request, args.requests)
            results[name].append((time.process_time() - start) / args.requests * 1e6)
    return results


def show(args: argparse.Namespace) -> None:
    """Print what the upstream and the client receive for each case."""
    harness = Harness(args.codec, 1)
    for name, request, routed in (("unrouted", REQUEST % b"", False), ("routed", REQUEST % ROUTED, True),
                                  ("wrk-routed", WRK_REQUEST % WRK_ROUTED, True)):
        head, response = harness.check(request, routed)
        print(f"--- {name}: upstream receives")
        print(head.decode("latin-1"))
        print(f"--- {name}: client receives")
        print(response.decode("latin-1"))


def profile(args: argparse.Namespace) -> None:
    """cProfile the routed and unrouted cases; print the top entries by own time."""
    import cProfile
    import pstats

    harness = Harness(args.codec, args.connections)
    for request in (REQUEST % b"", REQUEST % ROUTED):
        harness.run(request, 2000)
    profiler = cProfile.Profile()
    profiler.enable()
    harness.run(REQUEST % b"", args.requests)
    harness.run(REQUEST % ROUTED, args.requests)
    profiler.disable()
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)


def callgrind(args: argparse.Namespace) -> None:
    """Instructions per request: two valgrind runs, N and 2N requests, differenced."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    count = args.requests
    totals: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (count, 2 * count):
            out = Path(tmp) / f"cg.{n}"
            argv = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                    "bench.http1.harness", "--inner", str(n), "--codec", args.codec, "--case", args.case,
                    "--connections", str(args.connections)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
            match = re.search(r"Collected : (\d+)", proc.stderr)
            if proc.returncode != 0 or match is None:
                sys.exit("callgrind run failed:\n" + proc.stderr[-3000:])
            totals[n] = int(match.group(1))
    per_request = (totals[2 * count] - totals[count]) / count
    print(f"{args.case} ({args.codec}): {per_request:,.0f} instructions per request "
          f"(callgrind, {count} vs {2 * count} requests)")


def inner(args: argparse.Namespace) -> None:
    """The body of one callgrind run: set up, then ``--inner`` requests of one case."""
    harness = Harness(args.codec, args.connections)
    request = {"routed": REQUEST % ROUTED, "unrouted": REQUEST % b"", "wrk-routed": WRK_REQUEST % WRK_ROUTED,
               "wrk-unrouted": WRK_REQUEST % b""}[args.case]
    harness.run(request, 2000)
    harness.run(request, args.inner)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.http1.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="requests per case per round (default 100000)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per case (default 5); the median counts")
    p.add_argument("--connections", type=int, default=64, help="client connections, round robin (default 64)")
    p.add_argument("--codec", default="httptools", choices=["httptools", "h11"])
    p.add_argument("--cases", default="", help="comma-separated subset of unrouted,routed,wrk-unrouted,wrk-routed")
    p.add_argument("--profile", choices=["cprofile"], help="profile instead of timing")
    p.add_argument("--top", type=int, default=30, help="profile entries to print")
    p.add_argument("--callgrind", action="store_true", help="instructions per request under valgrind")
    p.add_argument("--case", default="routed", help="the case for --callgrind")
    p.add_argument("--show", action="store_true", help="print the bytes each side receives")
    p.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner is not None:
        inner(args)
        return 0
    if args.show:
        show(args)
        return 0
    if args.profile:
        profile(args)
        return 0
    if args.callgrind:
        if args.requests == 100_000:
            args.requests = 5000  # callgrind runs ~50x slower
        callgrind(args)
        return 0
    results = measure(args)
    overhead = fake_overhead_us(args.requests)
    print(f"codec {args.codec}, {args.connections} connections, {args.requests} requests x {args.rounds} rounds, "
          f"python {sys.version.split()[0]}, pid {os.getpid()}")
    for name, values in results.items():
        print(f"{name:>13}: {statistics.median(values):6.2f} µs/request median "
              f"(min {min(values):.2f}, max {max(values):.2f})")
    print(f"{'fakes alone':>13}: {overhead:6.2f} µs/request (included above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
