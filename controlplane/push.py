"""The gRPC push service: ``turnout.v1.SessionDiscovery``, sessions streamed to every proxy.

Each proxy (its supervisor) holds one stream, state of the world (``StreamSessions``) or
incremental (``DeltaSessions``). Its first request names the node and the services it
fronts; from then on the service sends a response whenever a change touches those
services, and waits for the ACK or NACK of one response before it sends the next, so a
proxy is never more than one push behind and changes that arrive meanwhile are coalesced.

* State of the world: every response is the whole set of sessions with a route for the
  node's services, each cut down to those routes.
* Delta: a response carries only the sessions added or changed since what the proxy has
  (``initial_resource_versions`` on a new stream, then what it ACKed) and the names of
  those removed. A change costs O(changed) per proxy, not O(all sessions).

A NACK leaves the proxy on its previous version: the refused changes are not re-sent until
they change again. Every proxy ever seen is kept for ``/v1/proxies`` with the version it
ACKed, whether it is in sync and its last NACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from filters import Session
from turnout.v1 import config_pb2, config_pb2_grpc
from turnout.v1.convert import session_to_proto

# A proxy that has not sent its first request (its node) this long after opening a
# stream is holding a connection for nothing.
FIRST_REQUEST_TIMEOUT_S = 10.0


class StoredSessionLike(Protocol):
    """What the push service reads of a stored session."""

    @property
    def session(self) -> Session:
        """The validated session."""

    @property
    def revision(self) -> int:
        """The revision of its last change."""


class ChangeLike(Protocol):
    """What the push service reads of a store change."""

    @property
    def revision(self) -> int:
        """The store's revision after the change."""

    @property
    def upserted(self) -> tuple[StoredSessionLike, ...]:
        """Sessions created or changed."""

    @property
    def removed(self) -> tuple[str, ...]:
        """Ids of sessions deleted or expired."""


class StoreLike(Protocol):
    """The session store as the push service uses it (``controlplane.store.SessionStore``)."""

    @property
    def revision(self) -> int:
        """The current revision."""

    def all(self) -> Mapping[str, StoredSessionLike]:
        """Every live session by id."""

    def subscribe(self, listener: Any) -> None:
        """Call ``listener(change)`` after every committed change."""


class ProxyRecord:
    """One proxy as the control plane knows it: node, stream state, ACK history."""

    def __init__(self, node: config_pb2.Node, protocol: str, peer: str) -> None:
        self.node_id = node.id
        self.cluster = node.cluster
        self.services: frozenset[str] = frozenset(node.services)
        self.all_services = node.all_services
        self.build_version = node.build_version
        self.protocol = protocol
        self.peer = peer
        self.connected = True
        self.connected_at = time.time()
        self.disconnected_at: float | None = None
        # What the proxy has applied (ACKed): session id -> version.
        self.has: dict[str, str] = {}
        self.acked_version = ""
        self.acked_at: float | None = None
        self.last_nack: dict[str, Any] | None = None
        # Sessions (id -> version) the proxy refused and does not run; cleared when a later
        # version of one is accepted or it is deleted. The proxy is not in sync while any is.
        self.rejected: dict[str, str] = {}
        # The response awaiting an answer: nonce, version, and for delta what it changes.
        self.pending_nonce = ""
        self.pending_version = ""
        # What the response in flight changes for the proxy: session id -> new version, or
        # None for a removal. Applied to ``has`` on ACK; kept small (O(changed)) for delta.
        self.pending_changes: dict[str, str | None] = {}
        self.pending_since = 0.0
        # Session ids changed since the last response (delta), or "something changed" (sotw).
        self.dirty: set[str] = set()
        self.stale = True
        self.first_response = True
        self.wake = asyncio.Event()
        self.wake.set()  # the first response goes out at once
        self.closed = False

    def wants(self, session: Session) -> bool:
        """Whether any of the session's routes is for a service this proxy fronts."""
        if self.all_services:
            return True
        services = self.services
        for route in session.routes:
            if route.service in services:
                return True
        return False

    def route_filter(self) -> Collection[str] | None:
        """Services whose routes this proxy receives (None: all)."""
        return None if self.all_services else self.services

    def in_sync(self) -> bool:
        """Whether the proxy runs everything that concerns it."""
        return not self.pending_nonce and not self.stale and not self.rejected

    def to_dict(self) -> dict[str, Any]:
        """JSON form for ``/v1/proxies`` and ``turnout status``."""
        return {
            "id": self.node_id,
            "cluster": self.cluster,
            "services": sorted(self.services),
            "all_services": self.all_services,
            "build_version": self.build_version,
            "protocol": self.protocol,
            "peer": self.peer,
            "connected": self.connected,
            "connected_at": self.connected_at,
            "disconnected_at": self.disconnected_at,
            "acked_version": self.acked_version,
            "acked_at": self.acked_at,
            "sessions": len(self.has),
            "in_sync": self.connected and self.in_sync(),
            "pending_nonce": self.pending_nonce or None,
            "last_nack": self.last_nack,
            "rejected": sorted(self.rejected),
        }


class PushService(config_pb2_grpc.SessionDiscoveryServicer):
    """Serves ``turnout.v1.SessionDiscovery`` from a session store."""

    def __init__(self, store: StoreLike, control_plane_id: str, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.control_plane_id = control_plane_id
        self._records: dict[str, ProxyRecord] = {}
        self._live: set[ProxyRecord] = set()
        self._nonces = itertools.count(1)
        # Built messages for state-of-the-world pushes: subscription -> id -> (revision, resource).
        self._sotw_cache: dict[frozenset[str] | None, dict[str, tuple[int, config_pb2.Resource | None]]] = {}
        registry = registry if registry is not None else CollectorRegistry()
        self._connected = Gauge("turnout_cp_proxies_connected", "Proxies with an open config stream",
                                registry=registry)
        self._pushes = Counter("turnout_cp_pushes", "Responses sent to proxies", ["protocol"], registry=registry)
        self._push_bytes = Counter("turnout_cp_push_bytes", "Bytes of responses sent to proxies", ["protocol"],
                                   registry=registry)
        self._push_resources = Counter("turnout_cp_push_resources", "Sessions sent to proxies", ["protocol"],
                                       registry=registry)
        self._answers = Counter("turnout_cp_push_answers", "Proxy answers to responses", ["result"],
                                registry=registry)
        self._connected.set_function(lambda: len(self._live))
        store.subscribe(self._on_change)

    # ------------------------------------------------------------------ status

    def proxies(self) -> list[dict[str, Any]]:
        """Every proxy connected now or seen before, with the version it runs."""
        return [r.to_dict() for r in sorted(self._records.values(), key=lambda r: r.node_id)]

    async def close(self) -> None:
        """End every stream (shutdown): each proxy keeps its snapshot and reconnects."""
        for record in list(self._live):
            record.closed = True
            record.wake.set()

    # ------------------------------------------------------------------ changes

    def _on_change(self, change: ChangeLike) -> None:
        # Runs synchronously after each store commit: mark what each live proxy must hear.
        for cache in self._sotw_cache.values():
            for session_id in change.removed:
                cache.pop(session_id, None)
        for record in self._live:
            touched = False
            for stored in change.upserted:
                if record.wants(stored.session) or stored.session.id in record.has:
                    record.dirty.add(stored.session.id)
                    touched = True
            for session_id in change.removed:
                if session_id in record.has or session_id in record.pending_changes:
                    record.dirty.add(session_id)
                    touched = True
                if record.rejected.pop(session_id, None) is not None:
                    # A refused session is gone: what was refused along with it gets another
                    # chance (state of the world re-sends the whole set anyway).
                    if record.rejected or record.protocol == "sotw":
                        record.dirty.update(record.rejected)
                        touched = True
                    else:
                        record.last_nack = None  # the proxy never had it: nothing to send
            if touched:
                record.stale = True
                record.wake.set()

    # ------------------------------------------------------------------ streams

    async def StreamSessions(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """State of the world: every response holds the node's whole session set."""
        await self._serve(context, "sotw")

    async def DeltaSessions(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """Incremental: responses hold only changed and removed sessions."""
        await self._serve(context, "delta")

    async def _serve(self, context: grpc.aio.ServicerContext, protocol: str) -> None:
        try:
            first = await asyncio.wait_for(context.read(), FIRST_REQUEST_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no first request with the node")
            return
        if first is grpc.aio.EOF:
            return
        if not first.node.id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first request must name the node (node.id)")
            return
        record = ProxyRecord(first.node, protocol, context.peer())
        previous = self._records.get(record.node_id)
        if previous is not None and previous in self._live:
            previous.closed = True  # the same proxy reconnected: the old stream is dead
            previous.wake.set()
        self._records[record.node_id] = record
        if protocol == "delta":
            record.has = dict(first.initial_resource_versions)
        else:
            record.acked_version = first.version_info
        self._live.add(record)
        reader = asyncio.get_running_loop().create_task(self._read(context, record))
        try:
            while not record.closed and not reader.done():
                await record.wake.wait()
                record.wake.clear()
                if record.closed or reader.done():
                    break
                if record.pending_nonce or not record.stale:
                    continue
                response = self._build_delta(record) if protocol == "delta" else self._build_sotw(record)
                await context.write(response)
                size = response.ByteSize()
                self._pushes.labels(protocol).inc()
                self._push_bytes.labels(protocol).inc(size)
                self._push_resources.labels(protocol).inc(len(response.resources))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._live.discard(record)
            record.connected = False
            record.disconnected_at = time.time()

    async def _read(self, context: grpc.aio.ServicerContext, record: ProxyRecord) -> None:
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                self._answer(record, request)
        finally:
            record.wake.set()

    def _answer(self, record: ProxyRecord, request: Any) -> None:
        # An answer to anything but the response in flight is stale (xDS ignores those too).
        if not request.response_nonce or request.response_nonce != record.pending_nonce:
            return
        now = time.time()
        if request.HasField("error_detail") and (request.error_detail.code or request.error_detail.message):
            self._answers.labels("nack").inc()
            record.last_nack = {"nonce": record.pending_nonce, "version": record.pending_version,
                                "message": request.error_detail.message, "at": now}
            for name, version in record.pending_changes.items():
                if version is not None:
                    record.rejected[name] = version
        else:
            self._answers.labels("ack").inc()
            record.acked_version = record.pending_version
            record.acked_at = now
            has = record.has
            for name, version in record.pending_changes.items():
                if version is None:
                    has.pop(name, None)
                else:
                    has[name] = version
            if record.protocol == "sotw":
                record.rejected.clear()  # the proxy took the whole set
            else:
                for name in record.pending_changes:
                    record.rejected.pop(name, None)
            if not record.rejected:
                record.last_nack = None
        record.pending_nonce = ""
        record.pending_version = ""
        record.pending_changes = {}
        record.wake.set()

    def _start(self, record: ProxyRecord) -> tuple[str, str]:
        nonce = str(next(self._nonces))
        version = str(self.store.revision)
        record.pending_nonce = nonce
        record.pending_version = version
        record.pending_since = time.time()
        record.stale = False
        record.first_response = False
        return nonce, version

    def _build_sotw(self, record: ProxyRecord) -> config_pb2.DiscoveryResponse:
        nonce, version = self._start(record)
        record.dirty.clear()
        response = config_pb2.DiscoveryResponse(version_info=version, nonce=nonce,
                                                control_plane_id=self.control_plane_id)
        services = record.route_filter()
        has: dict[str, str] = {}
        # Each session's message is built once per revision and subscription, not once per
        # push: a state-of-the-world push re-sends thousands of unchanged sessions.
        key = None if services is None else frozenset(services)
        cache = self._sotw_cache.setdefault(key, {})
        resources = []
        for session_id, stored in self.store.all().items():
            cached = cache.get(session_id)
            if cached is None or cached[0] != stored.revision:
                msg = session_to_proto(stored.session, services)
                resource = None if msg is None else config_pb2.Resource(
                    name=session_id, version=str(stored.revision), session=msg)
                cached = cache[session_id] = (stored.revision, resource)
            if cached[1] is not None:
                has[session_id] = cached[1].version
                resources.append(cached[1])
        response.resources.extend(resources)
        changes: dict[str, str | None] = {sid: v for sid, v in has.items() if record.has.get(sid) != v}
        changes.update((sid, None) for sid in record.has if sid not in has)
        record.pending_changes = changes
        return response

    def _build_delta(self, record: ProxyRecord) -> config_pb2.DeltaDiscoveryResponse:
        first = record.first_response
        nonce, version = self._start(record)
        response = config_pb2.DeltaDiscoveryResponse(system_version_info=version, nonce=nonce,
                                                     control_plane_id=self.control_plane_id)
        current = self.store.all()
        services = record.route_filter()
        has = record.has  # read only: the changes apply on ACK
        if first:
            # A new stream: compare everything with what the proxy said it has.
            names: Collection[str] = set(current) | set(has)
        else:
            names = record.dirty
        changes: dict[str, str | None] = {}
        for session_id in sorted(names):
            stored = current.get(session_id)
            msg = None if stored is None else session_to_proto(stored.session, services)
            if msg is not None and stored is not None:
                session_version = str(stored.revision)
                if has.get(session_id) != session_version:
                    changes[session_id] = session_version
                    response.resources.add(name=session_id, version=session_version, session=msg)
            elif session_id in has:
                changes[session_id] = None
                response.removed_resources.append(session_id)
        record.dirty = set()
        record.pending_changes = changes
        return response
