"""One event loop's proxy: its listeners, router, upstreams and connections, and the
runtime they serve with.

``Proxy`` owns the pieces and who may change them: a new bootstrap config or a change of the
pushed sessions becomes a new ``Runtime``, built aside (validated once, by the same
functions the supervisor validated it with) and swapped in by one reference; requests in
flight keep the one they started with. It serves on listening sockets it is given (bound
once by the supervisor, so a second proxy on the same address cannot start) and drains on
request. A worker process (``process/worker.py``) or, with one worker, the supervisor
itself runs one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dataplane.connections import Connections
from dataplane.listen import Sniffer, server_tls
from dataplane.metrics import Metrics
from dataplane.process.statefile import PushedState
from dataplane.router import Router
from dataplane.rules import change_snapshot, compose_snapshot
from dataplane.runtime import Runtime, build_runtime
from dataplane.upstreams import Upstreams
from filters import Session

if TYPE_CHECKING:
    import socket

    from dataplane.config import ProxyConfig
    from filters import Snapshot

log = logging.getLogger("turnout.proxy")


class Proxy:
    """Listeners, router, upstreams and connections of one event loop."""

    def __init__(self, config: ProxyConfig, codec_name: str, loop: asyncio.AbstractEventLoop, instance: str = "0",
                 pushed: PushedState | None = None) -> None:
        self.loop = loop
        self.codec_name = codec_name
        self.instance = instance  # "0", "1", …: the worker's index, in metrics and logs
        self.pushed = pushed or PushedState()
        self.metrics = Metrics(instance)
        runtime = build_runtime(config, compose(config, self.pushed), codec_name, self._instance_name(config))
        self.upstreams = Upstreams(loop, runtime.limits, runtime.codec)
        self.router = Router(runtime, self.upstreams, self.metrics, loop)
        self.connections = Connections()
        self.loaded_at = time.time()
        self.ready = False
        self._servers: list[asyncio.AbstractServer] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self.metrics.snapshot_loaded(runtime.snapshot.version, len(runtime.snapshot.sessions))

    @property
    def runtime(self) -> Runtime:
        """The runtime new requests are served with."""
        return self.router.runtime

    def _instance_name(self, config: ProxyConfig) -> str:
        return config.node_id() + "/" + self.instance

    # ------------------------------------------------------------------ serving

    async def serve(self, sockets: Sequence[socket.socket]) -> None:
        """Accept on the listening sockets, one per listener in config order."""
        config = self.runtime.config
        for listener, sock in zip(config.listeners, sockets, strict=True):
            server = await self.loop.create_server(
                lambda lst=listener: Sniffer(self.router, self.connections, lst),
                sock=sock, ssl=server_tls(listener))
            self._servers.append(server)
        self.ready = True
        self._tick()

    def _tick(self) -> None:
        # Once a second, never per request: idle upstream connections, HTTP/2 liveness.
        self.upstreams.tick(self.loop.time())
        self._tick_handle = self.loop.call_later(1.0, self._tick)

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (up to ``drain_timeout_s``), close."""
        limits = self.runtime.limits
        log.info("worker %s: draining %d connection(s), up to %g s", self.instance, len(self.connections.open),
                 limits.drain_timeout_s)
        self.ready = False
        for server in self._servers:
            server.close()
        await self.connections.drain(limits.drain_timeout_s)
        self.upstreams.close_all()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self.runtime.close(None)
        log.info("worker %s: drained", self.instance)

    @property
    def draining(self) -> bool:
        """Whether a drain has started."""
        return self.connections.draining

    # ------------------------------------------------------------------ changes

    def _swap(self, runtime: Runtime) -> None:
        previous = self.router.runtime
        self.router.runtime = runtime  # one reference: requests keep the runtime they started with
        self.upstreams.configure(runtime.limits, runtime.codec)
        self.loaded_at = time.time()
        self.metrics.snapshot_loaded(runtime.snapshot.version, len(runtime.snapshot.sessions))
        if previous is not runtime:
            previous.close(runtime)

    def apply_config(self, config: ProxyConfig) -> None:
        """A bootstrap config the supervisor validated; raises ``ValidationError`` (and changes
        nothing) when it conflicts with the pushed sessions."""
        snapshot = compose(config, self.pushed)
        old = self.runtime.config
        if [(lst.name, lst.address) for lst in config.listeners] != [(lst.name, lst.address)
                                                                    for lst in old.listeners]:
            log.warning("worker %s: listener changes need a restart; applying the rest", self.instance)
        self._swap(build_runtime(config, snapshot, self.codec_name, self._instance_name(config), self.runtime))
        self.metrics.reload("ok")
        log.info("worker %s: configuration reloaded (%d static session(s))", self.instance,
                 len(config.snapshot.sessions))

    def apply_sessions(self, version: str, base: str | None, upserted: Sequence[Session], removed: Sequence[str],
                       versions: dict[str, str], control_plane_id: str) -> None:
        """A change of the pushed sessions from ``base`` (None: the whole set); raises
        ``ValidationError`` (and changes nothing) on a conflict, or ``StaleBase`` when this proxy
        is on another version than ``base``."""
        if base is not None and base != self.pushed.version:
            raise StaleBase(self.pushed.version)
        sessions = {} if base is None else dict(self.pushed.sessions)
        removed = [sid for sid in removed if sid in sessions]  # only pushed sessions, never a static one
        for session in upserted:
            sessions[session.id] = (session, versions.get(session.id, version))
        for sid in removed:
            del sessions[sid]
        pushed = PushedState(version, sessions, control_plane_id)
        config = self.runtime.config
        if base is None:
            snapshot = compose(config, pushed)
        else:
            # A change costs O(changed): the new snapshot shares every untouched table.
            snapshot = change_snapshot(self.runtime.snapshot, config.snapshot, upserted, removed, version)
        self.pushed = pushed
        self._swap(self.runtime.with_snapshot(snapshot))

    # ------------------------------------------------------------------ reporting

    def config_dump(self) -> dict[str, Any]:
        """Config, snapshot and runtime state as JSON."""
        runtime = self.runtime
        config = runtime.config
        return {
            "worker": self.instance,
            "pid": os.getpid(),
            "codec": runtime.codec.name,
            "loaded_at": self.loaded_at,
            "draining": self.draining,
            "listeners": [
                {"name": lst.name, "address": str(lst.address), "mode": lst.mode, "service": lst.service,
                 "baseline": None if lst.baseline is None else str(lst.baseline),
                 "authorities": dict(lst.authorities), "upstream_protocol": lst.upstream_protocol,
                 "tls": lst.tls is not None}
                for lst in config.listeners
            ],
            "limits": {k: getattr(config.limits, k) for k in config.limits.__dataclass_fields__},
            "debug_headers": config.debug_headers,
            "pushed_version": self.pushed.version,
            "snapshot": runtime.snapshot.to_dict(),
            "connections": len(self.connections.open),
            "upstreams": self.upstreams.stats(),
        }


class StaleBase(Exception):
    """A session change based on another version than the proxy's; it needs the whole set."""

    def __init__(self, version: str) -> None:
        super().__init__("this proxy is on version " + repr(version))
        self.version = version


def compose(config: ProxyConfig, pushed: PushedState) -> Snapshot:
    """The bootstrap file's sessions plus the pushed ones, as one routing snapshot; raises
    ``ValidationError`` when they conflict."""
    if not pushed.sessions and not pushed.version:
        return config.snapshot
    return compose_snapshot(config.snapshot, pushed.session_list(), pushed.version or config.snapshot.version)
