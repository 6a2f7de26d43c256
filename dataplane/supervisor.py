"""The supervisor: starts N worker processes, restarts crashed ones, serves the admin port.

Workers share each listening port through SO_REUSEPORT. The supervisor never touches
proxied traffic; it answers ``/healthz`` itself and builds ``/ready``, ``/metrics``,
``/config_dump`` and ``/explain`` from the workers' admin sockets. SIGTERM drains the
workers; SIGHUP validates the file and, if it is valid, has every worker reload it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from dataplane.admin import Response, fetch_unix, json_response, serve_connection, text_response
from dataplane.channel import ConfigChannel, Update
from dataplane.config import ProxyConfig, load_config
from dataplane.metrics import merge_expositions
from dataplane.pushlink import PushLink, push_socket_path
from dataplane.rules import compose_snapshot
from dataplane.statefile import PushedState
from filters import Session, ValidationError

# A worker that dies within this long of starting is crash-looping: back off before the
# next start (doubling up to the cap) instead of spinning.
_CRASH_WINDOW_S = 2.0
_MAX_BACKOFF_S = 10.0


@dataclass
class WorkerProcess:
    """One worker and how to reach its admin socket."""

    index: int
    admin_socket: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    history: list[int] = field(default_factory=list)
    pushed_version: str | None = None  # the pushed-session version it confirmed last; None: unknown
    ready: bool = False  # answered /ready since it last started: pushed sessions can be sent
    link: PushLink | None = None  # the kept-open connection pushed sessions go through


def _change_body(state: PushedState, from_version: str | None, upserted: tuple[Session, ...],
                 removed: tuple[str, ...]) -> bytes:
    """A worker's ``POST /sessions`` body: a change from ``from_version`` (None: the whole set)."""
    return json.dumps({
        "version": state.version,
        "from_version": from_version,
        "control_plane_id": state.control_plane_id,
        "upsert": [s.to_dict() for s in upserted],
        "versions": {s.id: state.sessions[s.id][1] for s in upserted},
        "remove": list(removed),
    }, separators=(",", ":")).encode()


class Supervisor:
    """Owns the worker processes and the admin listener."""

    def __init__(self, config_path: str, config: ProxyConfig, workers: int, codec: str) -> None:
        self.config_path = config_path
        self.config = config
        self.codec = codec
        self.stopping = False
        self.reloads = {"ok": 0, "invalid": 0}
        self._runtime = tempfile.mkdtemp(prefix="turnout-")
        self.workers = [WorkerProcess(i, os.path.join(self._runtime, f"worker-{i}.sock")) for i in range(workers)]
        self._stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self.channel: ConfigChannel | None = None
        if config.control_plane is not None:
            self.channel = ConfigChannel(config, self._distribute)
            self.channel.load_persisted()

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; returns the exit status."""
        loop = asyncio.get_running_loop()
        admin = None
        if self.config.admin is not None:
            try:
                admin = await asyncio.start_server(lambda r, w: serve_connection(r, w, self.admin),
                                                   self.config.admin.host, self.config.admin.port)
            except OSError as exc:
                sys.stderr.write(f"turnout: cannot listen on the admin address {self.config.admin}: {exc.strerror}\n")
                return 1
        for worker in self.workers:
            await self._start(worker)
        channel_task = None
        if self.channel is not None:
            channel_task = loop.create_task(self.channel.run())
            self._watchers.append(loop.create_task(self.channel.wait_initial()))
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if await self._wait_ready(10.0):
            sys.stderr.write(f"turnout: {len(self.workers)} worker(s) ready; "
                             + ", ".join(f"{lst.name} on {lst.address}" for lst in self.config.listeners)
                             + (f"; admin on {self.config.admin}" if self.config.admin else "") + "\n")
        await self._stop.wait()
        self.stopping = True
        if channel_task is not None and self.channel is not None:
            channel_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel_task
            await self.channel.flush()
        await self._shutdown()
        if admin is not None:
            admin.close()
        shutil.rmtree(self._runtime, ignore_errors=True)
        return 0

    async def _start(self, worker: WorkerProcess) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.admin_socket)
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dataplane.worker", "--config", self.config_path, "--http", self.codec,
            "--index", str(worker.index), "--admin-socket", worker.admin_socket, "--parent-pid", str(os.getpid()),
        )
        worker.started_at = time.monotonic()
        worker.pushed_version = None
        worker.ready = False
        if worker.link is not None:
            worker.link.close()  # the new process listens on a new socket
            worker.link = None
        loop = asyncio.get_running_loop()
        self._watchers.append(loop.create_task(self._watch(worker)))
        if self.channel is not None:
            self._watchers.append(loop.create_task(self._sync_when_ready(worker)))

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
        sys.stderr.write(f"turnout: worker {worker.index} (pid {process.pid}) exited with {code}; "
                         f"restarting in {worker.backoff_s:.2f}s\n")
        await asyncio.sleep(worker.backoff_s)
        if not self.stopping:
            await self._start(worker)

    # ------------------------------------------------------------------ pushed sessions

    async def _distribute(self, update: Update) -> None:
        """Hand a validated push to every worker (the channel ACKs when this returns)."""
        state = update.state
        change = _change_body(state, update.previous_version, update.upserted, update.removed)
        await asyncio.gather(*(self._send_change(w, change) for w in self.workers))

    async def _send_change(self, worker: WorkerProcess, change: bytes) -> None:
        assert self.channel is not None
        state = self.channel.state
        if not worker.ready or worker.process is None or worker.process.returncode is not None:
            return  # a (re)starting worker is synced when it is ready
        timeout_s = self.config.limits.control_plane_apply_timeout_s
        if worker.link is None:
            worker.link = PushLink(push_socket_path(worker.admin_socket))
        answer = await worker.link.send(change, timeout_s)
        if answer[0] == 409:
            # The worker is on another version (restarted, or missed one): send the whole set.
            whole = _change_body(state, None, tuple(s for s, _ in state.sessions.values()), ())
            answer = await worker.link.send(whole, timeout_s)
        if answer[0] == 200:
            worker.pushed_version = state.version
        else:
            worker.pushed_version = None
            sys.stderr.write(f"turnout: worker {worker.index} did not apply sessions version {state.version}: "
                             f"{answer[2].decode(errors='replace').strip()}\n")

    async def _sync_when_ready(self, worker: WorkerProcess) -> None:
        # A (re)started worker loaded the state file; a no-op change from the current version
        # checks that it has it, and the 409 path sends the whole set when it does not.
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not self.stopping:
            if (await self._ask(worker, "GET", "/ready"))[0] == 200:
                worker.ready = True
                break
            await asyncio.sleep(0.05)
        channel = self.channel
        if channel is None or self.stopping or not channel.state.version:
            return
        state = channel.state
        await self._send_change(worker, _change_body(state, state.version, (), ()))

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

    async def _ask_all(self, method: str, target: str) -> list[Response]:
        return list(await asyncio.gather(*(self._ask(w, method, target) for w in self.workers)))

    def reload(self) -> None:
        """SIGHUP: validate the file; only a valid one is handed to the workers."""
        try:
            config = load_config(self.config_path)
            if self.channel is not None and self.channel.state.sessions:
                state = self.channel.state
                compose_snapshot(config.snapshot, state.session_list(), state.version)
        except ValidationError as exc:
            self.reloads["invalid"] += 1
            sys.stderr.write(f"turnout: reload refused, workers keep the running config:\n  {exc}\n")
            return
        self.config = config
        if self.channel is not None:
            self.channel.set_config(config)
        self.reloads["ok"] += 1
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGHUP)

    async def _shutdown(self) -> None:
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

    async def admin(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Response:
        """Public admin endpoints."""
        if path == "/healthz":
            return text_response(200, "ok\n")
        if path == "/ready":
            if self.stopping:
                return text_response(503, "draining\n")
            answers = await self._ask_all("GET", "/ready")
            lines = [f"worker {w.index}: {a[2].decode().strip()}" for w, a in zip(self.workers, answers, strict=True)]
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
            for worker in self.workers:
                answer = await self._ask(worker, "POST" if body else "GET", target, body)
                if answer[0] != 503:
                    return answer
            return text_response(503, "no worker reachable\n")
        return text_response(404, "unknown admin path; try /ready /healthz /metrics /config_dump /explain\n")
