"""Tunnels: which gateway holds the tunnel of which session, and what proxies are told.

A session route with ``destination: tunnel`` is served by a local process on a developer's
or an agent's machine (``turnout connect``, docs/remocal.md). The machine never talks to a
proxy: it dials out to a gateway (``turnout gateway``) in the cluster, which serves a data
address for the tunnel that proxies connect to. This registry is the control plane's view:

1. The session's owner (or a member of the group it is shared with, or an admin) asks for
   a **ticket** (``POST /v1/sessions/{id}/tunnel``): one use, short-lived, bound to the
   session. Anyone else gets 403 naming the owner, like any change to the session, and the
   refusal is audited.
2. The machine hands the ticket to a gateway, which **redeems** it with its own gateway
   credential (``POST /v1/tunnels``), naming itself and the tunnel's data address. The
   gateway never sees the machine's credential.
3. The registry records the tunnel and bumps the session's revision, so every proxy is
   pushed the route resolved to the gateway's address (``resolve``). A new tunnel for the
   same session replaces the old one (the machine reconnected).
4. The gateway **reports** every few seconds (counts, last error), which renews the tunnel's
   lease, and **removes** it the moment the machine's link is lost. A tunnel whose gateway
   stopped reporting for ``lease_s`` is removed as well (the gateway died).
5. While no tunnel is attached the route is pushed as ``destination: tunnel``: proxies apply
   its fallback at once (baseline, or 503 / gRPC 14 "local process disconnected").

Tunnels live in memory: after a control-plane restart a gateway's next report is answered
404, the gateway drops that tunnel, and the machine reconnects with a new ticket.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from controlplane.audit import AuditLog
from controlplane.errors import NotFound, Unauthorized
from controlplane.store import Change, SessionStore
from filters import Address, Session

# A ticket is used within a second of being issued (the machine dials the gateway at once);
# 30 s covers a slow link and a TLS handshake.
DEFAULT_TICKET_TTL_S = 30.0
# Gateways report every DEFAULT_REPORT_INTERVAL_S; three missed reports remove the tunnel.
DEFAULT_REPORT_INTERVAL_S = 5.0
DEFAULT_LEASE_S = 15.0
# Tickets outstanding at once (issued, not redeemed, not expired): bounded memory.
MAX_TICKETS = 10_000
_STAT_FIELDS = ("requests", "errors", "bytes_in", "bytes_out", "last_status", "last_error", "streams")


@dataclass
class Ticket:
    """A one-use permission to attach a tunnel to one session."""

    session_id: str
    identity: str  # who asked for it: the owner, a group member or an admin
    expires_at: float
    rules: dict[str, Any] = field(default_factory=dict)  # its policy rules: where its outgoing calls may go


@dataclass
class Tunnel:
    """One attached tunnel."""

    id: str
    session_id: str
    identity: str  # whose machine holds it
    gateway: str  # the gateway's id
    gateway_identity: str
    address: Address  # the gateway's data address for it, which proxies connect to
    connected_at: float
    reported_at: float
    peer: str = ""  # the machine's address as the gateway saw it
    stats: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """How routes and ``explain`` name it."""
        return f"{self.id} on gateway {self.gateway}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the API (``session get``, ``status``)."""
        return {"id": self.id, "session": self.session_id, "identity": self.identity, "gateway": self.gateway,
                "address": str(self.address), "connected_at": self.connected_at, "reported_at": self.reported_at,
                "peer": self.peer, **{k: self.stats.get(k) for k in _STAT_FIELDS}}


class TunnelRegistry:
    """Tickets and attached tunnels, and the tunnel routes resolved for proxies."""

    def __init__(self, store: SessionStore, audit: AuditLog, *, ticket_ttl_s: float = DEFAULT_TICKET_TTL_S,
                 lease_s: float = DEFAULT_LEASE_S, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._audit = audit
        self.ticket_ttl_s = ticket_ttl_s
        self.lease_s = lease_s
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}
        self._by_session: dict[str, Tunnel] = {}
        self._by_id: dict[str, Tunnel] = {}
        store.subscribe(self._on_change)

    # ------------------------------------------------------------------ for the API

    def issue(self, session_id: str, identity: str, rules: dict[str, Any] | None = None) -> tuple[str, float]:
        """A ticket for ``session_id`` (the caller checked the session and who may attach);
        ``rules``: the attaching identity's ``allowed_services`` / ``allowed_destinations``, which
        the gateway applies to the machine's outgoing calls."""
        now = self._clock()
        self._drop_expired_tickets(now)
        if len(self._tickets) >= MAX_TICKETS:
            oldest = min(self._tickets, key=lambda t: self._tickets[t].expires_at)
            del self._tickets[oldest]
        ticket = "tt-" + secrets.token_urlsafe(24)
        expires_at = now + self.ticket_ttl_s
        self._tickets[ticket] = Ticket(session_id, identity, expires_at, dict(rules or {}))
        return ticket, expires_at

    def redeem(self, ticket: str, gateway: str, gateway_identity: str, address: Address, peer: str,
               source: str) -> Tunnel:
        """Attach a tunnel: the ticket is used up; raises ``Unauthorized`` for an unknown, used or
        expired ticket and ``NotFound`` when its session is gone."""
        now = self._clock()
        found = self._tickets.pop(ticket, None)
        if found is None or found.expires_at <= now:
            raise Unauthorized("the tunnel ticket is unknown, used or expired; the machine asks the control plane "
                               "for a new one (turnout connect does it on every reconnect)", invalid_token=True)
        stored = self._store.get(found.session_id)
        if stored is None:
            raise NotFound(f"no session {found.session_id!r} (it may have expired or been deleted)")
        tunnel = Tunnel("t-" + secrets.token_hex(5), found.session_id, found.identity, gateway, gateway_identity,
                        address, now, now, peer, rules=found.rules)
        replaced = self._by_session.get(found.session_id)
        if replaced is not None:
            del self._by_id[replaced.id]
        self._by_session[found.session_id] = tunnel
        self._by_id[tunnel.id] = tunnel
        detail = {"tunnel": tunnel.id, "gateway": gateway, "address": str(address), "machine": peer}
        if replaced is not None:
            detail["replaced"] = replaced.id
        self._store.touch(found.session_id, self._audit.entry(
            found.identity, source, "tunnel_attach", session=found.session_id, owner=stored.session.owner,
            detail=detail))
        return tunnel

    def report(self, tunnel_id: str, gateway_identity: str, stats: dict[str, Any]) -> Tunnel:
        """A gateway's report: counts, and a renewed lease; raises ``NotFound`` for a tunnel this
        registry does not hold (removed, replaced, or the control plane restarted)."""
        tunnel = self._held(tunnel_id, gateway_identity)
        tunnel.reported_at = self._clock()
        tunnel.stats = {k: stats[k] for k in _STAT_FIELDS if k in stats}
        return tunnel

    def remove(self, tunnel_id: str, gateway_identity: str, reason: str, source: str) -> Tunnel:
        """A gateway lost the machine's link: detach, so proxies apply the fallback; raises ``NotFound``."""
        tunnel = self._held(tunnel_id, gateway_identity)
        self._detach(tunnel, reason, gateway_identity, source)
        return tunnel

    def expire(self) -> list[str]:
        """Remove tunnels whose gateway stopped reporting for ``lease_s``; returns their ids."""
        now = self._clock()
        self._drop_expired_tickets(now)
        gone = [t for t in self._by_id.values() if now - t.reported_at > self.lease_s]
        for tunnel in gone:
            self._detach(tunnel, f"gateway {tunnel.gateway} stopped reporting for {self.lease_s:g} s",
                         "turnout:lease", "-")
        return [t.id for t in gone]

    def for_session(self, session_id: str) -> Tunnel | None:
        """The tunnel attached to a session, if any."""
        return self._by_session.get(session_id)

    def tunnels(self) -> list[Tunnel]:
        """Every attached tunnel, oldest first."""
        return sorted(self._by_id.values(), key=lambda t: t.connected_at)

    # ------------------------------------------------------------------ for the push service

    def resolve(self, session: Session) -> Session:
        """``session`` as proxies get it: each tunnel route pointing at the gateway that holds the
        session's tunnel, or left as ``destination: tunnel`` when none is attached."""
        tunnel = self._by_session.get(session.id)
        if tunnel is None or not any(r.destination is None for r in session.routes):
            return session
        routes = tuple(dataclasses.replace(r, destination=tunnel.address, tunnel=tunnel.name)
                       if r.destination is None else r for r in session.routes)
        return dataclasses.replace(session, routes=routes)

    # ------------------------------------------------------------------ internals

    def _held(self, tunnel_id: str, gateway_identity: str) -> Tunnel:
        tunnel = self._by_id.get(tunnel_id)
        if tunnel is None or tunnel.gateway_identity != gateway_identity:
            # Another gateway's tunnel is as good as unknown: no gateway can detach another's.
            raise NotFound(f"no tunnel {tunnel_id!r} held by this gateway (removed, replaced by a reconnect, or the "
                           "control plane restarted)")
        return tunnel

    def _detach(self, tunnel: Tunnel, reason: str, identity: str, source: str) -> None:
        del self._by_id[tunnel.id]
        if self._by_session.get(tunnel.session_id) is tunnel:
            del self._by_session[tunnel.session_id]
        stored = self._store.get(tunnel.session_id)
        if stored is not None:
            self._store.touch(tunnel.session_id, self._audit.entry(
                identity, source, "tunnel_detach", session=tunnel.session_id, owner=stored.session.owner,
                detail={"tunnel": tunnel.id, "gateway": tunnel.gateway, "reason": reason[:300]}))

    def _on_change(self, change: Change) -> None:
        for session_id in change.removed:  # a deleted or expired session takes its tunnel with it
            tunnel = self._by_session.pop(session_id, None)
            if tunnel is not None:
                self._by_id.pop(tunnel.id, None)

    def _drop_expired_tickets(self, now: float) -> None:
        for ticket in [t for t, v in self._tickets.items() if v.expires_at <= now]:
            del self._tickets[ticket]
