"""A worker process (``turnout proxy --workers N`` with N > 1): one ``Proxy`` on its own loop.

The supervisor binds the listening sockets and passes them down (``--listen-fds``); every
worker accepts on the same sockets. The worker takes its configuration, and every change of
it or of the pushed sessions, over the push link (``pushlink.py``) — it never reads the
configuration file — and answers the supervisor's admin requests on a Unix socket. SIGTERM
drains it; it also drains when the supervisor is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys

from dataplane.admin import Response, WorkerAdmin, serve_connection, text_response
from dataplane.config import parse_config
from dataplane.process.logs import setup_logging
from dataplane.process.pushlink import PushReceiver, SessionChange, push_socket_path
from dataplane.proxy import Proxy, StaleBase
from dataplane.rules import rule_limits
from filters import ValidationError

log = logging.getLogger("turnout.worker")

# Whole session sets are JSON, a few times the protobuf size of a push (32 MiB by default).
_MAX_MESSAGE_BYTES = 4 * 32 * 1024 * 1024


class WorkerProcess:
    """What a worker process holds: its proxy once configured, and how it answers messages."""

    def __init__(self, loop: asyncio.AbstractEventLoop, codec: str, index: int,
                 sockets: list[socket.socket]) -> None:
        self.loop = loop
        self.codec = codec
        self.index = index
        self.sockets = sockets
        self.proxy: Proxy | None = None

    async def message(self, frame: bytes) -> Response:
        """One message from the supervisor."""
        try:
            message = json.loads(frame)
            kind = message["kind"]
        except (ValueError, KeyError, TypeError) as exc:
            return text_response(400, f"invalid message: {exc}\n")
        try:
            if kind == "config":
                return await self._config(message["config"])
            if kind == "sessions":
                return self._sessions(message)
        except ValidationError as exc:
            return text_response(400, f"refused: {exc}\n")
        return text_response(400, f"unknown message kind {kind!r}\n")

    async def _config(self, source: object) -> Response:
        if not isinstance(source, dict):
            return text_response(400, "config must be a mapping\n")
        config = parse_config(source)
        if self.proxy is None:
            self.proxy = Proxy(config, self.codec, self.loop, str(self.index))
            await self.proxy.serve(self.sockets)
            return text_response(200, "serving\n")
        self.proxy.apply_config(config)
        return text_response(200, "reloaded\n")

    def _sessions(self, message: dict[str, object]) -> Response:
        proxy = self.proxy
        if proxy is None:
            return text_response(409, "not configured yet\n")
        try:
            change = SessionChange(message, rule_limits(proxy.runtime.config.snapshot))
        except (ValueError, KeyError, TypeError) as exc:
            return text_response(400, f"invalid session change: {exc}\n")
        try:
            proxy.apply_sessions(change.version, change.from_version, change.upserted, change.removed,
                                 change.versions, change.control_plane_id)
        except StaleBase as exc:
            return 409, "application/json", json.dumps({"version": exc.version}).encode()
        return 200, "application/json", json.dumps({"version": change.version}).encode()

    async def admin(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """The worker's admin endpoints (on its Unix socket, for the supervisor)."""
        if self.proxy is None:
            return text_response(503, "not configured yet\n")
        return await WorkerAdmin(self.proxy).handle(method, path, query, body)


async def run_worker(codec: str, index: int, admin_socket: str, listen_fds: list[int], parent_pid: int) -> int:
    """Serve until SIGTERM (or the supervisor is gone); returns the exit status."""
    loop = asyncio.get_running_loop()
    sockets = [socket.socket(fileno=fd) for fd in listen_fds]
    worker = WorkerProcess(loop, codec, index, sockets)
    admin = await asyncio.start_unix_server(lambda r, w: serve_connection(r, w, worker.admin), path=admin_socket)
    link = await loop.create_unix_server(lambda: PushReceiver(worker.message, _MAX_MESSAGE_BYTES),
                                         path=push_socket_path(admin_socket))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor reloads, then sends the config

    def watch_parent() -> None:
        if os.getppid() != parent_pid:  # the supervisor died: nobody restarts or reloads us any more
            log.warning("worker %d: supervisor gone, draining", index)
            stop.set()
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)
    await stop.wait()
    if worker.proxy is not None:
        await worker.proxy.drain()
    admin.close()
    link.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor)."""
    parser = argparse.ArgumentParser(prog="turnout-worker", description="One turnout proxy worker process.")
    parser.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"])
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--admin-socket", required=True)
    parser.add_argument("--listen-fds", default="", help="comma-separated listening socket fds, in listener order")
    parser.add_argument("--parent-pid", type=int, required=True, help="drain when this process is gone")
    parser.add_argument("--json", action="store_true", help="log one JSON object per line")
    args = parser.parse_args(argv)
    setup_logging(as_json=args.json)
    fds = [int(fd) for fd in args.listen_fds.split(",") if fd]
    import uvloop

    return uvloop.run(run_worker(args.http, args.index, args.admin_socket, fds, args.parent_pid))


if __name__ == "__main__":
    sys.exit(main())
