"""The supervisor: binds the listeners, runs the proxy, serves the admin port, talks to the
control plane.

It binds every listening socket once, without SO_REUSEPORT, so a second proxy given the
same address fails to start instead of silently taking part of the traffic. With one
worker (a sidecar's usual shape) the proxy runs in this process: one process, one event
loop. With more, it starts worker processes that inherit the sockets, sends each the
configuration it validated and every pushed change over a push link, restarts crashed ones,
and builds ``/ready``, ``/metrics``, ``/config_dump`` and ``/explain`` from their admin
sockets. SIGTERM drains; SIGHUP validates the file again and, only if it is valid, hands
it to the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

from dataplane.admin import Response, fetch_unix, json_response, serve_connection, text_response
from dataplane.config import ProxyConfig, load_config
from dataplane.process.pushlink import PushLink, config_message, push_socket_path, sessions_message
from dataplane.rules import compose_snapshot
from filters import ValidationError

if TYPE_CHECKING:
    from dataplane.admin import WorkerAdmin
    from dataplane.process.channel import ConfigChannel, Update
    from dataplane.proxy import Proxy

log = logging.getLogger("turnout.supervisor")

# A worker that dies within this long of starting is crash-looping: back off before the
# next start (doubling up to the cap) instead of spinning.
_CRASH_WINDOW_S = 2.0
_MAX_BACKOFF_S = 10.0
# A new worker process has this long to listen on its push link.
_WORKER_START_S = 10.0


class BindError(Exception):
    """A listener's address cannot be bound (in use, not local, not permitted)."""


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound once (no SO_REUSEPORT: a second proxy must not share it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts while old connections time out
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


@dataclass
class WorkerProcess:
    """One worker process and how to reach it."""

    index: int
    admin_socket: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    history: list[int] = field(default_factory=list)
    pushed_version: str | None = None  # the pushed-session version it confirmed last; None: unknown
    ready: bool = False  # configured and serving since it last started
    link: PushLink | None = None


class Supervisor:
    """Owns the listening sockets, the proxy (or its worker processes) and the admin listener."""

    def __init__(self, config_path: str, config: ProxyConfig, workers: int, codec: str,
                 json_logs: bool = False) -> None:
        self.config_path = config_path
        self.json_logs = json_logs
        self.config = config
        self.codec = codec
        self.stopping = False
        self.reloads = {"ok": 0, "invalid": 0}
        self.workers: list[WorkerProcess] = []
        self.local: Proxy | None = None  # the proxy itself, when it runs in this process
        self._local_admin: WorkerAdmin | None = None
        self._worker_count = workers
        self._runtime_dir = ""
        self._sockets: list[socket.socket] = []
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self.channel: ConfigChannel | None = None
        if config.control_plane is not None:
            from dataplane.process.channel import ConfigChannel  # gRPC only when a control plane is set

            self.channel = ConfigChannel(config, self._distribute)
            self.channel.load_persisted()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        try:
            self._sockets = [bind_listener(lst.address.host, lst.address.port) for lst in self.config.listeners]
        except BindError as exc:
            log.error("%s (is another proxy running on it?)", exc)
            self._close_sockets()
            return 1
        admin = None
        if self.config.admin is not None:
            try:
                admin = await asyncio.start_server(lambda r, w: serve_connection(r, w, self.admin),
                                                   self.config.admin.host, self.config.admin.port)
            except OSError as exc:
                log.error("cannot listen on the admin address %s: %s", self.config.admin, exc.strerror)
                self._close_sockets()
                return 1
        if self._worker_count == 1:
            await self._start_local(loop)
        else:
            self._runtime_dir = tempfile.mkdtemp(prefix="turnout-")
            self.workers = [WorkerProcess(i, os.path.join(self._runtime_dir, f"worker-{i}.sock"))
                            for i in range(self._worker_count)]
            for worker in self.workers:
                await self._start(worker)
        channel_task = None
        if self.channel is not None:
            channel_task = loop.create_task(self.channel.run())
            self._watchers.append(loop.create_task(self.channel.wait_initial()))
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if await self._wait_ready(_WORKER_START_S):
            listeners = ", ".join(f"{lst.name} on {lst.address}" for lst in self.config.listeners)
            log.info("ready: %d worker(s)%s; %s%s", self._worker_count,
                     " in this process" if self.local is not None else "", listeners,
                     f"; admin on {self.config.admin}" if self.config.admin else "")
        await self._stop.wait()
        self.stopping = True
        log.info("stopping: draining in-flight requests")
        if channel_task is not None and self.channel is not None:
            channel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel_task
            await self.channel.flush()
        await self._shutdown()
        if admin is not None:
            admin.close()
        self._close_sockets()
        if self._runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
        log.info("stopped")
        return 0

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    # ------------------------------------------------------------------ one process

    async def _start_local(self, loop: asyncio.AbstractEventLoop) -> None:
        from dataplane.admin import WorkerAdmin
        from dataplane.proxy import Proxy

        pushed = self.channel.state if self.channel is not None else None
        self.local = Proxy(self.config, self.codec, loop, "0", pushed)
        self._local_admin = WorkerAdmin(self.local)
        await self.local.serve(self._sockets)

    # ------------------------------------------------------------------ worker processes

    async def _start(self, worker: WorkerProcess) -> None:
        for path in (worker.admin_socket, push_socket_path(worker.admin_socket)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        fds = [sock.fileno() for sock in self._sockets]
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dataplane.process.worker", "--http", self.codec, "--index", str(worker.index),
            "--admin-socket", worker.admin_socket, "--parent-pid", str(os.getpid()),
            "--listen-fds", ",".join(map(str, fds)), *(["--json"] if self.json_logs else []), pass_fds=fds,
        )
        worker.started_at = time.monotonic()
        worker.pushed_version = None
        worker.ready = False
        if worker.link is not None:
            worker.link.close()  # the new process listens on a new socket
        worker.link = PushLink(push_socket_path(worker.admin_socket))
        loop = asyncio.get_running_loop()
        self._watchers.append(loop.create_task(self._watch(worker)))
        self._watchers.append(loop.create_task(self._configure(worker)))

    async def _configure(self, worker: WorkerProcess) -> None:
        """Send a new worker the validated config, then the pushed sessions."""
        assert worker.link is not None
        await worker.link.connect(_WORKER_START_S)
        answer = await worker.link.send(config_message(self.config.source), _WORKER_START_S)
        if answer[0] != 200:
            log.error("worker %d refused its configuration: %s", worker.index,
                      answer[2].decode(errors="replace").strip())
            return
        worker.ready = True
        channel = self.channel
        if channel is not None and channel.state.version:
            state = channel.state
            await self._send_change(worker, sessions_message(state, None, tuple(s for s, _ in state.sessions.values()),
                                                             ()))

    async def _watch(self, worker: WorkerProcess) -> None:
        process = worker.process
        assert process is not None
        code = await process.wait()
        if self.stopping:
            return
        worker.history.append(code)
        worker.restarts += 1
        lived = time.monotonic() - worker.started_at
        worker.backoff_s = 0.0 if lived > _CRASH_WINDOW_S else min(_MAX_BACKOFF_S, max(0.25, worker.backoff_s * 2))
        log.warning("worker %d (pid %d) exited with %d; restarting in %.2fs", worker.index, process.pid, code,
                    worker.backoff_s)
        await asyncio.sleep(worker.backoff_s)
        if not self.stopping:
            await self._start(worker)

    async def _send_change(self, worker: WorkerProcess, change: bytes) -> None:
        assert self.channel is not None
        state = self.channel.state
        if not worker.ready or worker.link is None or worker.process is None or worker.process.returncode is not None:
            return  # a (re)starting worker gets the whole set once it is configured
        timeout_s = self.config.limits.control_plane_apply_timeout_s
        answer = await worker.link.send(change, timeout_s)
        if answer[0] == 409:
            # The worker is on another version (restarted, or missed one): send the whole set.
            whole = sessions_message(state, None, tuple(s for s, _ in state.sessions.values()), ())
            answer = await worker.link.send(whole, timeout_s)
        if answer[0] == 200:
            worker.pushed_version = state.version
        else:
            worker.pushed_version = None
            log.error("worker %d did not apply sessions version %s: %s", worker.index, state.version,
                      answer[2].decode(errors="replace").strip())

    # ------------------------------------------------------------------ changes

    async def _distribute(self, update: Update) -> None:
        """Hand a validated push to the proxy (the channel ACKs when this returns)."""
        state = update.state
        if self.local is not None:
            self.local.apply_sessions(state.version, update.previous_version, update.upserted, update.removed,
                                      {s.id: state.sessions[s.id][1] for s in update.upserted},
                                      state.control_plane_id)
            return
        change = sessions_message(state, update.previous_version, update.upserted, update.removed)
        await asyncio.gather(*(self._send_change(w, change) for w in self.workers))

    def reload(self) -> None:
        """SIGHUP: validate the file; only a valid one is handed to the proxy."""
        try:
            config = load_config(self.config_path)
            if self.channel is not None and self.channel.state.sessions:
                state = self.channel.state
                compose_snapshot(config.snapshot, state.session_list(), state.version)
        except ValidationError as exc:
            self.reloads["invalid"] += 1
            log.error("reload refused, the proxy keeps the running config:\n  %s", exc)
            return
        self.config = config
        if self.channel is not None:
            self.channel.set_config(config)
        self.reloads["ok"] += 1
        log.info("reload: %s is valid; applying it", self.config_path)
        if self.local is not None:
            self.local.apply_config(config)
            return
        message = config_message(config.source)
        for worker in self.workers:
            if worker.ready and worker.link is not None:
                asyncio.get_running_loop().create_task(self._send_config(worker, message))

    async def _send_config(self, worker: WorkerProcess, message: bytes) -> None:
        assert worker.link is not None
        answer = await worker.link.send(message, self.config.limits.control_plane_apply_timeout_s)
        if answer[0] != 200:
            log.error("worker %d did not apply the reloaded config: %s", worker.index,
                      answer[2].decode(errors="replace").strip())

    # ------------------------------------------------------------------ shutdown

    async def _shutdown(self) -> None:
        if self.local is not None:
            await self.local.drain()
            return
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = self.config.limits.drain_timeout_s + 5.0
        procs = [w.process for w in self.workers if w.process is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), deadline)
        except TimeoutError:
            for p in procs:
                if p.returncode is None:
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))
        for task in self._watchers:
            task.cancel()

    # ------------------------------------------------------------------ admin

    async def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self._stop.is_set():
            if all(r[0] == 200 for r in await self._ask_all("GET", "/ready")):
                return True
            await asyncio.sleep(0.05)
        return False

    async def _ask(self, worker: WorkerProcess, method: str, target: str, body: bytes = b"",
                   timeout_s: float = 5.0) -> Response:
        try:
            return await fetch_unix(worker.admin_socket, method, target, body, timeout_s)
        except (OSError, TimeoutError) as exc:
            return 503, "text/plain", f"worker {worker.index} unreachable: {exc}\n".encode()

    async def _ask_all(self, method: str, target: str, body: bytes = b"") -> list[Response]:
        if self._local_admin is not None:
            path, _, query = target.partition("?")
            return [await self._local_admin.handle(method, path, _parse_query(query), body)]
        return list(await asyncio.gather(*(self._ask(w, method, target, body) for w in self.workers)))

    async def admin(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """Public admin endpoints."""
        if path == "/healthz":
            return text_response(200, "ok\n")
        if path == "/ready":
            if self.stopping:
                return text_response(503, "draining\n")
            answers = await self._ask_all("GET", "/ready")
            names = [f"worker {w.index}" for w in self.workers] or ["proxy"]
            lines = [f"{name}: {a[2].decode().strip()}" for name, a in zip(names, answers, strict=True)]
            ok = all(a[0] == 200 for a in answers)
            if self.channel is not None:
                # Ready once the first push is applied, or the initial-fetch timeout passed:
                # a control plane that is down must not take every proxy out of service.
                initial = self.channel.status.initial_fetch
                ok = ok and initial != "pending"
                lines.append(self.channel.status.summary() + ("" if initial != "pending" else
                                                              " (waiting for the initial fetch)"))
            return text_response(200 if ok else 503, ("ready\n" if ok else "not ready\n") + "\n".join(lines) + "\n")
        if path == "/metrics":
            from dataplane.metrics import merge_expositions

            answers = await self._ask_all("GET", "/metrics")
            own = (b"# HELP turnout_config_reloads_total Configuration reloads by result\n"
                   b"# TYPE turnout_config_reloads_total counter\n"
                   + b"".join(b'turnout_config_reloads_total{result="%s",worker="supervisor"} %d.0\n'
                              % (result.encode(), n) for result, n in self.reloads.items()))
            if self.channel is not None:
                own += self.channel.exposition()
            return (200, "text/plain; version=0.0.4; charset=utf-8",
                    merge_expositions([*(a[2] for a in answers if a[0] == 200), own]))
        if path == "/config_dump":
            answers = await self._ask_all("GET", "/config_dump")
            first = next((json.loads(a[2]) for a in answers if a[0] == 200), None)
            if self.local is not None:
                workers = [{"index": 0, "pid": os.getpid(), "restarts": 0, "up": answers[0][0] == 200,
                            "pushed_version": self.local.pushed.version, "in_process": True}]
            else:
                workers = [
                    {"index": w.index, "pid": None if w.process is None else w.process.pid, "restarts": w.restarts,
                     "up": a[0] == 200, "pushed_version": w.pushed_version}
                    for w, a in zip(self.workers, answers, strict=True)
                ]
            return json_response(200 if first else 503, {
                "config": first, "workers": workers, "reloads": self.reloads, "codec": self.codec,
                "control_plane": None if self.channel is None else self.channel.status.to_dict()})
        if path == "/explain":
            target = path + ("?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, vs in query.items()
                                            for v in vs) if query else "")
            method = "POST" if body else "GET"
            if self._local_admin is not None:
                return await self._local_admin.handle(method, path, query, body)
            for worker in self.workers:
                answer = await self._ask(worker, method, target, body)
                if answer[0] != 503:
                    return answer
            return text_response(503, "no worker reachable\n")
        return text_response(404, "unknown admin path; try /ready /healthz /metrics /config_dump /explain\n")


def _parse_query(query: str) -> dict[str, list[str]]:
    from urllib.parse import parse_qsl

    out: dict[str, list[str]] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        out.setdefault(k, []).append(v)
    return out
