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
they change again; each refused session is kept with the NACK's message, so ``session
create`` and ``session get`` can say which proxy refused it and why.

Every stream is authenticated before anything else (its ``authorization`` metadata, by the
same ``Authenticator`` as the API), and only identities in a proxy group may stream. A node
id is bound to the stream holding it: another identity cannot take it over (PERMISSION
DENIED), nor can the same shared credential from another address (ALREADY_EXISTS) while
the first stream lives; a credential bound to node ids (a tokens-file ``node_ids`` entry,
an issuer's ``node_id_claim``) may only use those. The first request's node fields and
``initial_resource_versions`` are bounded. Proxies that disconnected are kept for
``/v1/proxies`` without what they had (only a count), and are pruned after
``disconnected_proxy_retention_s`` or beyond ``max_disconnected_proxies``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from controlplane.audit import UNAUTHENTICATED, AuditLog
from controlplane.errors import Unauthorized
from controlplane.identity import Identity, Roles
from controlplane.limits import Limits
from filters import Session
from turnout.v1 import config_pb2, config_pb2_grpc
from turnout.v1.convert import session_to_proto

# A proxy that has not sent its first request (its node) this long after opening a
# stream is holding a connection for nothing.
FIRST_REQUEST_TIMEOUT_S = 10.0
# How long a refused stream waits for the caller's first message (see _refuse); a client
# that sends nothing is refused after this anyway.
_DENY_READ_TIMEOUT_S = 2.0
# What a refused stream is told, per gRPC status, besides the reason.
_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "check control_plane.token_file",
    grpc.StatusCode.PERMISSION_DENIED: "check control_plane.token_file and node_id",
}


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
    """One proxy as the control plane knows it: node, identity, stream state, ACK history."""

    def __init__(self, node: config_pb2.Node, protocol: str, peer: str, identity: Identity) -> None:
        self.identity = identity.name
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
        # Sessions the proxy refused and does not run: id -> (version, the NACK's message);
        # cleared when a later version of one is accepted or it is deleted. The proxy is not in
        # sync while any is.
        self.rejected: dict[str, tuple[str, str]] = {}
        # How many sessions it ran when it disconnected (what it had is dropped then).
        self.sessions_at_disconnect = 0
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
            "identity": self.identity,
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
            "sessions": len(self.has) if self.connected else self.sessions_at_disconnect,
            # (session, version) pairs the control plane holds for this proxy: 0 once it left.
            "tracked_versions": len(self.has) + len(self.rejected) + len(self.pending_changes),
            "in_sync": self.connected and self.in_sync(),
            "pending_nonce": self.pending_nonce or None,
            "last_nack": self.last_nack,
            "rejected": sorted(self.rejected),
        }


class PushService(config_pb2_grpc.SessionDiscoveryServicer):
    """Serves ``turnout.v1.SessionDiscovery`` from a session store.

    ``authenticate`` turns a stream's ``authorization`` metadata into an identity; ``roles``
    says which identities are proxies. Without ``authenticate`` every stream is taken as a
    proxy: only for a gRPC server that authenticates its callers itself (``turnout
    control-plane`` always passes one). ``audit`` records streams opened, ended and refused.
    """

    def __init__(self, store: StoreLike, control_plane_id: str, registry: CollectorRegistry | None = None, *,
                 authenticate: Callable[[str | None], Awaitable[Identity]] | None = None, roles: Roles | None = None,
                 audit: AuditLog | None = None, limits: Limits | None = None,
                 clock: Callable[[], float] = time.time,
                 resolve: Callable[[Session], Session] | None = None) -> None:
        self.store = store
        # Sessions as proxies get them: tunnel routes pointed at the gateway holding the tunnel
        # (``TunnelRegistry.resolve``; a tunnel change bumps the session's revision).
        self._resolve = resolve or _as_stored
        self.control_plane_id = control_plane_id
        self._authenticate = authenticate
        self._roles = roles or Roles()
        self._audit = audit
        self._limits = limits or Limits()
        self._clock = clock
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
        self._refused = Counter("turnout_cp_push_streams_refused", "Push streams refused, by gRPC status",
                                ["code"], registry=registry)
        self._connected.set_function(lambda: len(self._live))
        store.subscribe(self._on_change)

    # ------------------------------------------------------------------ status

    def proxies(self) -> list[dict[str, Any]]:
        """Every proxy connected now or seen recently, with the version it runs."""
        self._prune()
        return [r.to_dict() for r in sorted(self._records.values(), key=lambda r: r.node_id)]

    def rollout(self, session: Session, revision: int) -> list[dict[str, Any]]:
        """Each connected proxy that fronts one of the session's services, and whether it runs
        this revision of it (``acked``), refused it (``refused``, with the reason) or has not
        answered yet (``pending``)."""
        version = str(revision)
        out = []
        for record in sorted(self._live, key=lambda r: r.node_id):
            if not record.wants(session):
                continue
            item: dict[str, Any] = {"proxy": record.node_id, "cluster": record.cluster}
            rejected = record.rejected.get(session.id)
            if record.has.get(session.id) == version:
                item["state"] = "acked"
            elif rejected is not None and rejected[0] == version:
                item.update(state="refused", message=rejected[1])
            else:
                item["state"] = "pending"
            out.append(item)
        return out

    def refusals(self) -> dict[str, list[dict[str, Any]]]:
        """Session id -> the connected proxies that refused (NACKed) a version of it, and why."""
        out: dict[str, list[dict[str, Any]]] = {}
        for record in sorted(self._live, key=lambda r: r.node_id):
            for session_id, (version, message) in record.rejected.items():
                out.setdefault(session_id, []).append({"proxy": record.node_id, "version": version,
                                                       "message": message})
        return out

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
        peer = context.peer() or "unknown"
        identity = await self._admit(context, peer)
        if identity is None:
            return
        try:
            first = await asyncio.wait_for(context.read(), FIRST_REQUEST_TIMEOUT_S)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no first request with the node")
            return
        if first is grpc.aio.EOF:
            return
        problem = self._node_problem(first, protocol, identity, peer)
        if problem is not None:
            code, message = problem
            await self._refuse(context, identity.name, peer, code, message, first.node.id[:256], read_first=False)
            return
        record = ProxyRecord(first.node, protocol, peer, identity)
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
        self._record_audit(identity.name, peer, "proxy_connect", detail=_node_detail(record))
        self._prune()
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
            self._disconnected(record)

    async def _admit(self, context: grpc.aio.ServicerContext, peer: str) -> Identity | None:
        """The stream's identity, or None once the stream is refused."""
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else None
                break
        if self._authenticate is None:
            return _TRUSTED
        try:
            identity = await self._authenticate(authorization)
        except Unauthorized as exc:
            await self._refuse(context, UNAUTHENTICATED, peer, grpc.StatusCode.UNAUTHENTICATED, exc.message)
            return None
        if not self._roles.is_proxy(identity):
            await self._refuse(context, identity.name, peer, grpc.StatusCode.PERMISSION_DENIED,
                               f"identity {identity.name!r} is in no proxy group "
                               f"({', '.join(sorted(self._roles.proxy_groups))}); only proxies may stream")
            return None
        return identity

    def _node_problem(self, first: Any, protocol: str, identity: Identity,
                      peer: str) -> tuple[grpc.StatusCode, str] | None:
        """Why the first request cannot open a stream (status and message), or None."""
        limits = self._limits
        node = first.node
        if not node.id:
            return grpc.StatusCode.INVALID_ARGUMENT, "the first request must name the node (node.id)"
        for name in ("id", "cluster", "build_version"):
            if len(getattr(node, name)) > limits.max_node_field_chars:
                return grpc.StatusCode.INVALID_ARGUMENT, (f"node.{name} is longer than "
                                                          f"{limits.max_node_field_chars} characters")
        if len(node.services) > limits.max_node_services or any(
                len(s) > limits.max_node_field_chars for s in node.services):
            return grpc.StatusCode.INVALID_ARGUMENT, (f"node.services: at most {limits.max_node_services} services "
                                                      f"of at most {limits.max_node_field_chars} characters")
        if protocol == "delta" and len(first.initial_resource_versions) > limits.max_initial_resource_versions:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"{len(first.initial_resource_versions)} initial_resource_versions, over the limit of "
                f"{limits.max_initial_resource_versions} (the most sessions one snapshot holds)")
        if not identity.may_use_node_id(node.id):
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"identity {identity.name!r} may stream as node ids {', '.join(identity.node_ids or ())} only, "
                f"not {node.id!r}")
        previous = self._records.get(node.id)
        if previous is None or previous not in self._live:
            return None
        if previous.identity != identity.name:
            return grpc.StatusCode.PERMISSION_DENIED, (
                f"node id {node.id!r} is streaming as identity {previous.identity!r}; a proxy cannot take over "
                "another's node id")
        if identity.node_ids is None and _host(previous.peer) != _host(peer):
            # A shared credential cannot tell two proxies apart; the address can. The proxy
            # that really restarted elsewhere gets in once its old stream's keepalive fails.
            return grpc.StatusCode.ALREADY_EXISTS, (
                f"node id {node.id!r} already has a live stream from {previous.peer}; give every proxy its own "
                "node id (if that proxy is gone, its stream ends within 30 s and this one gets in)")
        return None

    async def _refuse(self, context: grpc.aio.ServicerContext, identity: str, peer: str, code: grpc.StatusCode,
                      message: str, node_id: str | None = None, read_first: bool = True) -> None:
        self._refused.labels(code.name).inc()
        self._record_audit(identity, peer, "proxy_refuse", code.name.lower(),
                           {"reason": message, **({"node": node_id} if node_id else {})},
                           limited_by=_host(peer) if identity == UNAUTHENTICATED else None)
        if read_first:
            # Take the caller's first message before answering: a grpc.aio client whose write is
            # still in flight when the status lands reports INTERNAL instead of the status
            # (grpc/grpc#36066), and a proxy must be told why it is refused. The message is
            # discarded unread.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(context.read(), _DENY_READ_TIMEOUT_S)
        hint = _HINTS.get(code)
        await context.abort(code, message + (f" ({hint})" if hint else ""))

    def _disconnected(self, record: ProxyRecord) -> None:
        self._live.discard(record)
        record.connected = False
        record.disconnected_at = self._clock()
        # What it had matters only while it streams; a new stream says again what it has.
        record.sessions_at_disconnect = len(record.has)
        record.has = {}
        record.rejected = {}
        record.pending_changes = {}
        record.dirty = set()
        if self._records.get(record.node_id) is record:
            self._record_audit(record.identity, record.peer, "proxy_disconnect", detail=_node_detail(record))
        self._prune()

    def _record_audit(self, identity: str, peer: str, action: str, outcome: str = "ok",
                      detail: dict[str, Any] | None = None, limited_by: str | None = None) -> None:
        if self._audit is None:
            return
        entry = self._audit.entry(identity, peer, action, outcome, detail=detail)
        if limited_by is not None:
            self._audit.record_limited(entry, limited_by)
        else:
            self._audit.record(entry)

    def _prune(self) -> None:
        """Forget disconnected proxies past the retention time, and the oldest beyond the most kept."""
        limits = self._limits
        cutoff = self._clock() - limits.disconnected_proxy_retention_s
        gone = sorted((r for r in self._records.values() if not r.connected),
                      key=lambda r: r.disconnected_at or 0.0)
        excess = len(gone) - limits.max_disconnected_proxies
        for i, record in enumerate(gone):
            if i < excess or (record.disconnected_at or 0.0) < cutoff:
                del self._records[record.node_id]

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
        now = self._clock()
        if request.HasField("error_detail") and (request.error_detail.code or request.error_detail.message):
            self._answers.labels("nack").inc()
            message = request.error_detail.message
            record.last_nack = {"nonce": record.pending_nonce, "version": record.pending_version,
                                "message": message, "at": now}
            for name, version in record.pending_changes.items():
                if version is not None:
                    record.rejected[name] = (version, message)
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
                msg = session_to_proto(self._resolve(stored.session), services)
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
            msg = None if stored is None else session_to_proto(self._resolve(stored.session), services)
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


# The identity of every stream when the gRPC server authenticates on its own.
_TRUSTED = Identity("proxy", frozenset(Roles().proxy_groups), "the transport")


def _as_stored(session: Session) -> Session:
    return session


def _host(peer: str) -> str:
    """The address of a gRPC peer (``ipv4:10.0.0.5:41234`` -> ``ipv4:10.0.0.5``)."""
    return peer.rpartition(":")[0] or peer


def _node_detail(record: ProxyRecord) -> dict[str, Any]:
    return {"node": record.node_id, "cluster": record.cluster, "protocol": record.protocol,
            "services": "*" if record.all_services else sorted(record.services)[:50]}
