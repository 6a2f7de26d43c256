"""The floor under a Python proxy on this machine: a uvloop byte relay with no HTTP at all.

Usage (from the repository root; an upstream such as bench/http1's nginx on UPSTREAM_PORT)::

    taskset -c 1 .venv/bin/python -m bench.http1.relay LISTEN_PORT UPSTREAM_PORT [SPIN_US]
    taskset -c 0 wrk -t1 -c64 -d8s http://127.0.0.1:LISTEN_PORT/

Each client connection gets its own upstream connection and bytes are copied both ways,
one write per read: the same two reads and two writes per request as turnout, and nothing
else. ``SPIN_US`` burns that many microseconds of Python per client read, to show what a
microsecond of per-request Python costs in throughput here (on this 2-core VM the cost grows
faster than the microseconds: the idler the other CPU, the dearer each cross-CPU wake-up).
"""

from __future__ import annotations

import asyncio
import sys
import time

import uvloop


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int, spin_s: float) -> None:
        self.upstream_port = upstream_port
        self.spin_s = spin_s
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.held: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        _, self.upstream = await asyncio.get_running_loop().create_connection(
            lambda: _Upstream(self), "127.0.0.1", self.upstream_port)
        assert self.upstream.transport is not None
        for data in self.held:
            self.upstream.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.spin_s:
            until = time.perf_counter() + self.spin_s
            while time.perf_counter() < until:
                pass
        if self.upstream is None or self.upstream.transport is None:
            self.held.append(data)
        else:
            self.upstream.transport.write(data)


async def _serve(listen_port: int, upstream_port: int, spin_s: float) -> None:
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(upstream_port, spin_s), "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    """Relay until interrupted."""
    if len(argv) not in (2, 3):
        sys.stderr.write(__doc__ or "")
        return 2
    spin_s = float(argv[2]) * 1e-6 if len(argv) == 3 else 0.0
    try:
        uvloop.run(_serve(int(argv[0]), int(argv[1]), spin_s))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
