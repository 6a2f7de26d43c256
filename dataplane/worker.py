"""One proxy worker process: its listeners, its shared state, drain and reload.

A worker binds every listener with SO_REUSEPORT (the kernel spreads connections across
workers), serves its own admin endpoints on a Unix socket that the supervisor queries,
drains on SIGTERM and reloads its configuration file on SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from dataplane.accesslog import AccessLog
from dataplane.admin import Response, json_response, serve_connection, text_response
from dataplane.config import ProxyConfig, load_config
from dataplane.http1.codec import make_codec
from dataplane.http2.sniff import Sniffer, server_tls
from dataplane.http2.upstream import H2Pool
from dataplane.metrics import Metrics
from dataplane.mirror import MirrorManager
from dataplane.pushlink import PushReceiver, push_socket_path
from dataplane.rules import change_snapshot, compose_snapshot, rule_limits
from dataplane.statefile import PushedState, load_state
from dataplane.upstream import Pool
from filters import RequestHead, Snapshot, ValidationError, parse_session

if TYPE_CHECKING:
    from dataplane.roles import ClientConnection, FinishedRequest
    from dataplane.tracing import RequestTracer


class WorkerState:
    """Everything a worker's connections share: one explicit object, no module globals."""

    def __init__(self, config: ProxyConfig, codec_name: str, loop: asyncio.AbstractEventLoop,
                 worker: str = "0", pushed: PushedState | None = None) -> None:
        self.loop = loop
        self.loop_time = loop.time
        self.clock = time.perf_counter  # loop.time() on uvloop ticks in whole milliseconds
        self.wall_time = time.time
        self.worker = worker
        self.codec_name = codec_name
        self.config = config
        self.limits = config.limits
        self.codec = make_codec(codec_name, config.limits.max_head_bytes)
        self.metrics = Metrics(worker)
        self.snapshot: Snapshot = config.snapshot
        # Sessions from the control plane (via the supervisor), kept apart from the bootstrap
        # file's so either can change without losing the other.
        self.pushed = pushed or PushedState()
        self.debug_headers = config.debug_headers
        self.propagate_member = b"turnout-session"
        self.pool = Pool(self)
        self.h2_pool = H2Pool(self)  # multiplexed HTTP/2 upstream connections (gRPC)
        self.mirrors = MirrorManager(self)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.ready = False
        self.access_log = AccessLog(config.access_log.path, worker) if config.access_log else None
        self.date_header = b""
        self.loaded_at = time.time()
        self.tracer: RequestTracer | None = None  # built by _apply only when the config asks for tracing
        self._tasks: set[asyncio.Task[Any]] = set()
        self._drained = asyncio.Event()
        self._apply(config)
        self._tick()

    def _apply(self, config: ProxyConfig, snapshot: Snapshot | None = None) -> None:
        if snapshot is None:
            snapshot = self._compose(config, self.pushed)
        self.config = config
        self.limits = config.limits
        self.codec = make_codec(self.codec_name, config.limits.max_head_bytes)
        self.debug_headers = config.debug_headers
        baggage = [s for s in config.snapshot.key_config.sources if s.kind == "baggage"]
        self.propagate_member = (baggage[0].names[0] if baggage else "turnout-session").encode()
        if config.tracing != (self.tracer.config if self.tracer is not None else None):
            if self.tracer is not None:
                self.tracer.shutdown()
                self.tracer = None
            if config.tracing is not None:
                from dataplane.tracing import RequestTracer  # the SDK loads only when tracing is on

                try:
                    self.tracer = RequestTracer(config.tracing, f"{config.node_id()}/{self.worker}")
                except OSError as exc:  # e.g. the console exporter's file: serve untraced rather than not at all
                    sys.stderr.write(f"turnout worker {self.worker}: tracing off, cannot open its output: {exc}\n")
        self._swap(snapshot)

    def _swap(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot  # one reference swap; requests keep the one they started with
        self.loaded_at = time.time()
        self.metrics.snapshot_loaded(snapshot.version, len(snapshot.sessions))

    @staticmethod
    def _compose(config: ProxyConfig, pushed: PushedState) -> Snapshot:
        if not pushed.sessions and not pushed.version:
            return config.snapshot
        return compose_snapshot(config.snapshot, pushed.session_list(), pushed.version or config.snapshot.version)

    def reload(self, path: str) -> bool:
        """Load the config file again; keep the current one if the new one is invalid."""
        try:
            config = load_config(path)
            snapshot = self._compose(config, self.pushed)
        except ValidationError as exc:
            self.metrics.reload("invalid")
            sys.stderr.write(f"turnout worker {self.worker}: reload refused, keeping the old config: {exc}\n")
            return False
        if [(lst.name, lst.address) for lst in config.listeners] != [
            (lst.name, lst.address) for lst in self.config.listeners
        ]:
            sys.stderr.write(f"turnout worker {self.worker}: listener changes need a restart; applying the rest\n")
        self._apply(config, snapshot)
        self.metrics.reload("ok")
        return True

    def _tick(self) -> None:
        # Once a second: the Date header and the idle-pool sweep, never per request.
        now = time.time()
        self.date_header = b"date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)).encode() + b"\r\n"
        self.pool.sweep(self.loop_time())
        self.loop.call_later(1.0, self._tick)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background coroutine, keeping a reference until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def request_finished(self, exchange: FinishedRequest) -> None:
        """Metrics, the access log and the trace span for one finished request."""
        ended_at = self.clock()
        seconds = ended_at - exchange.started_at
        self.metrics.request(exchange.service, exchange.route_kind, exchange.status, seconds)
        grpc_status = exchange.grpc_status.decode("latin-1") if exchange.grpc_status else None
        if grpc_status is not None:
            self.metrics.grpc_response(exchange.service, exchange.route_kind, grpc_status)
        if self.tracer is not None:
            self.tracer.finished(exchange, ended_at)
        if self.access_log is not None:
            plan = exchange.plan
            self.access_log.record(
                time.time(), exchange.conn.peer.decode("latin-1"), plan.method.decode("latin-1"),
                plan.target.decode("latin-1"), exchange.status, exchange.service, exchange.route_kind,
                exchange.decision.session_id, str(exchange.destination), round(seconds * 1000, 3),
                exchange.bytes_out, exchange.fallback_used, grpc_status,
            )

    def connection_gone(self) -> None:
        """A client connection closed; note when a drain has finished."""
        if self.draining and not self.connections:
            self._drained.set()

    async def drain(self, servers: list[asyncio.AbstractServer]) -> None:
        """Stop accepting, let in-flight requests finish, close by the deadline."""
        self.draining = True
        for server in servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), self.limits.drain_timeout_s)
            except TimeoutError:
                for conn in list(self.connections):
                    conn.close()
        self.pool.close_all()
        self.h2_pool.close_all()
        if self.access_log is not None:
            self.access_log.close()

    # ------------------------------------------------------------------ admin

    async def admin(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """The worker's admin endpoints (served on its Unix socket)."""
        if path == "/ready":
            return text_response(200 if self.ready and not self.draining else 503,
                                 "ready\n" if self.ready and not self.draining else "not ready\n")
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.exposition()
        if path == "/config_dump":
            return json_response(200, self.config_dump())
        if path == "/explain":
            return self.explain(query, body)
        if path == "/reload" and method == "POST":
            ok = self.reload(body.decode() or self.config_path)
            return text_response(200 if ok else 400, "reloaded\n" if ok else "reload refused\n")
        return text_response(404, "unknown admin path\n")

    config_path = ""

    def apply_pushed(self, body: bytes) -> Response:
        """A validated change of the pushed sessions, from the supervisor (``pushlink``).

        Body: ``{"version", "from_version", "upsert": [session...], "remove": [id...]}``;
        ``from_version`` null replaces the whole set. A change based on another version than
        this worker's is refused with 409, and the supervisor sends the whole set instead.
        """
        try:
            change = json.loads(body)
            version = str(change["version"])
            base = change.get("from_version")
            limits = rule_limits(self.config.snapshot)
            upserts = [parse_session(spec, "upsert", limits) for spec in change.get("upsert", [])]
            removed = [str(sid) for sid in change.get("remove", [])]
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            return text_response(400, f"invalid session change: {exc}\n")
        if base is not None and str(base) != self.pushed.version:
            return json_response(409, {"version": self.pushed.version})
        sessions = {} if base is None else dict(self.pushed.sessions)
        versions = change.get("versions") or {}
        removed = [sid for sid in removed if sid in sessions]  # only pushed sessions, never a static one
        for session in upserts:
            sessions[session.id] = (session, str(versions.get(session.id, version)))
        for sid in removed:
            del sessions[sid]
        pushed = PushedState(version, sessions, str(change.get("control_plane_id", "")))
        try:
            if base is None:
                snapshot = self._compose(self.config, pushed)
            else:
                # A change costs O(changed): the new snapshot shares every untouched table.
                snapshot = change_snapshot(self.snapshot, self.config.snapshot, upserts, removed, version)
        except ValidationError as exc:
            return text_response(400, f"refused: {exc}\n")
        self.pushed = pushed
        self._swap(snapshot)
        return json_response(200, {"version": version, "sessions": len(sessions)})

    def config_dump(self) -> dict[str, Any]:
        """Config, snapshot and runtime state as JSON."""
        config = self.config
        return {
            "worker": self.worker,
            "pid": os.getpid(),
            "codec": self.codec.name,
            "loaded_at": self.loaded_at,
            "draining": self.draining,
            "listeners": [
                {"name": lst.name, "address": str(lst.address), "mode": lst.mode, "service": lst.service,
                 "baseline": None if lst.baseline is None else str(lst.baseline),
                 "authorities": dict(lst.authorities)}
                for lst in config.listeners
            ],
            "limits": {k: getattr(config.limits, k) for k in config.limits.__dataclass_fields__},
            "debug_headers": config.debug_headers,
            "pushed_version": self.pushed.version,
            "snapshot": self.snapshot.to_dict(),
            "connections": len(self.connections),
            "upstream_pool": self.pool.stats(),
        }

    def explain(self, query: dict[str, list[str]], body: bytes) -> Response:
        """``/explain``: the routing decision for a described request, step by step."""
        spec: Any = {}
        if body:
            try:
                spec = json.loads(body)
            except ValueError:
                return text_response(400, "body must be JSON: {service, method, path, headers}\n")
            if not isinstance(spec, dict):
                return text_response(400, "body must be a JSON object\n")
        service = spec.get("service") or (query.get("service") or [""])[0]
        if not service:
            return text_response(400, "give service=NAME (query) or {\"service\": ...} (JSON body)\n")
        method = spec.get("method") or (query.get("method") or ["GET"])[0]
        target = spec.get("path") or (query.get("path") or ["/"])[0]
        pairs: list[tuple[str, str]] = []
        headers = spec.get("headers") or {}
        if isinstance(headers, dict):
            pairs.extend((str(k), str(v)) for k, v in headers.items())
        for item in query.get("header", []):
            name, _, value = item.partition(":")
            pairs.append((name.strip(), value.strip()))
        head = RequestHead.from_pairs(str(method), str(target), pairs)
        return json_response(200, self.snapshot.explain(str(service), head, time.time()))


def _persisted(config: ProxyConfig) -> PushedState | None:
    # The supervisor validated the file before writing it; one that no longer fits the
    # bootstrap file (edited since) is ignored here as it is there.
    path = config.state_path()
    if path is None:
        return None
    pushed, _ = load_state(path, rule_limits(config.snapshot))
    if pushed is None:
        return None
    try:
        WorkerState._compose(config, pushed)
    except ValidationError:
        return None
    return pushed


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so every worker can bind the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def run_worker(config_path: str, codec_name: str, index: int, admin_socket: str | None,
                     parent_pid: int = 0) -> int:
    """Serve until SIGTERM; returns the exit status."""
    loop = asyncio.get_running_loop()
    config = load_config(config_path)
    state = WorkerState(config, codec_name, loop, str(index), _persisted(config))
    state.config_path = config_path
    servers: list[asyncio.AbstractServer] = []
    for listener in config.listeners:
        sock = bind_listener(listener.address.host, listener.address.port)
        server = await loop.create_server(lambda lst=listener: Sniffer(state, lst), sock=sock,
                                          ssl=server_tls(listener))
        servers.append(server)
    admin_servers: list[asyncio.AbstractServer] = []
    if admin_socket:
        admin_servers.append(await asyncio.start_unix_server(
            lambda r, w: serve_connection(r, w, state.admin), path=admin_socket))
        # Pushed sessions: whole sets are JSON, a few times the protobuf size.
        max_frame = 4 * config.limits.control_plane_max_message_bytes
        admin_servers.append(await loop.create_unix_server(
            lambda: PushReceiver(state.apply_pushed, max_frame), path=push_socket_path(admin_socket)))
    state.ready = True
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: state.reload(config_path))
    parent = parent_pid or os.getppid()

    def watch_parent() -> None:
        if os.getppid() != parent:  # the supervisor died: nobody restarts or reloads us any more
            sys.stderr.write(f"turnout worker {index}: supervisor gone, draining\n")
            stop.set()
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)
    await stop.wait()
    await state.drain(servers)
    for admin_server in admin_servers:
        admin_server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (started by the supervisor)."""
    parser = argparse.ArgumentParser(prog="turnout-worker", description="One turnout proxy worker process.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--http", default="auto", choices=["auto", "httptools", "h11"])
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--admin-socket")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run_worker(args.config, args.http, args.index, args.admin_socket, args.parent_pid))
    return uvloop.run(run_worker(args.config, args.http, args.index, args.admin_socket, args.parent_pid))


if __name__ == "__main__":
    sys.exit(main())
