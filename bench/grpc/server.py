"""The gRPC upstream for bench/grpc: one unary method answering fixed bytes that name the server.

``python -m bench.grpc.server --baseline-port A --sandbox-port B`` serves ``/bench.Bench/Echo``
on two ports from one grpcio asyncio server process (run.py pins it to cpu0): the baseline
port answers ``reply_for("baseline")``, the sandbox port ``reply_for("sandbox")``, so a
client can tell where a call was routed — by the text, or, for a client that only counts
bytes (h2load), by the length: the two replies differ by 4 bytes. No ``.proto``: a generic handler with identity
(de)serializers, so requests and replies are raw bytes. Prints ``ready`` once both listen;
stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio

SERVICE = "bench.Bench"
METHOD = "Echo"
PATH = f"/{SERVICE}/{METHOD}"
MESSAGE_BYTES = 100  # the request message (the clients send this many bytes)
REPLY_BYTES = {"baseline": 100, "sandbox": 104}


def reply_for(label: str) -> bytes:
    """The reply naming the server that sent it, REPLY_BYTES[label] long."""
    head = ("ok from " + label + " ").encode()
    return head + b"x" * (REPLY_BYTES[label] - len(head))


def handler(label: str) -> grpc.GenericRpcHandler:
    """``/bench.Bench/Echo`` answering the fixed reply of ``label`` whatever the request."""
    reply = reply_for(label)

    async def echo(request: bytes, context: Any) -> bytes:
        return reply

    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(echo)})


async def serve(ports: dict[str, int]) -> None:
    """Serve every (label, port) until SIGTERM or SIGINT."""
    servers = []
    for label, port in ports.items():
        # One server per port so each answers with its own reply; SO_REUSEPORT off so a port
        # still held by an earlier run fails the start instead of sharing it.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((handler(label),))
        if server.add_insecure_port(f"127.0.0.1:{port}") != port:
            raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
        await server.start()
        servers.append(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await asyncio.gather(*(server.stop(grace=1.0) for server in servers))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.grpc.server", description=__doc__.splitlines()[0])
    p.add_argument("--baseline-port", type=int, required=True)
    p.add_argument("--sandbox-port", type=int, required=True)
    args = p.parse_args(argv)
    asyncio.run(serve({"baseline": args.baseline_port, "sandbox": args.sandbox_port}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
