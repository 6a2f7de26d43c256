"""The HTTP JSON API: sessions, proxies, audit, health and metrics.

::

    POST   /v1/sessions               a session spec as in the rules file (+ "group") -> 201 {"session", "revision"}
    GET    /v1/sessions[?owner=O]     -> {"revision", "sessions": [{"session", "revision", "refused_by"?}, ...]}
    GET    /v1/sessions/{id}          -> {"session", "revision", "group"?, "proxies": [{proxy, state, message?}]}
    PUT    /v1/sessions/{id}          a whole new spec for it (its owner and created_at stay) -> {"session", "revision"}
    POST   /v1/sessions/{id}/extend   {"ttl_s": N} (from now) or {"expires_at": T} -> {"session", "revision"}
    DELETE /v1/sessions/{id}          -> 204 | 404
    GET    /v1/proxies                -> {"revision", "proxies": [...]}
    GET    /v1/audit[?since=T&session=ID&limit=N]  -> {"entries": [...]} (admins: all; others: theirs)
    GET    /v1/whoami                 -> the caller's identity, groups, roles and policy rules
    POST   /v1/sessions/{id}/tunnel   -> 201 {"ticket", "expires_at", "session"}: attach a local process (owner)
    GET    /v1/tunnels                -> {"tunnels": [...]}
    POST   /v1/tunnels                gateways: {"ticket", "gateway", "address", "peer"} -> 201 {"tunnel", ...}
    POST   /v1/tunnels/{id}           gateways: a report (counts) -> {"tunnel"} | 404
    DELETE /v1/tunnels/{id}[?reason=R]  gateways: the machine's link is gone -> 204 | 404
    GET    /healthz, GET /metrics     no credentials needed

Everything under ``/v1`` needs credentials (``Authorization: Bearer``, checked from the
head before the body is read: 401 ``unauthorized``); proxy credentials cannot use it (403).
A session's owner is the identity that created it: only its owner, members of the group
it is shared with, and admins may update, extend or delete it (403 ``forbidden`` naming
the owner). A create is checked in this order, each refusal with its own status: the spec
(400 ``invalid``, every problem listed), ownership, the caller's policy rules (403
``policy``, naming the rule), the store and other owners' filters (409 ``conflict``,
naming the session that holds the claim). Changes are rate-limited per identity (429
``rate_limited`` with ``Retry-After``). Every change and every refusal is audited.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controlplane.audit import UNAUTHENTICATED, AuditLog
from controlplane.errors import (
    ControlPlaneError,
    Forbidden,
    NotFound,
    PolicyRefused,
    RateLimited,
    Unauthorized,
)
from controlplane.http import Reply, Request, error_reply, json_reply
from controlplane.identity import Identity, Roles, name_problem
from controlplane.limits import Limits, RateLimiter
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import Policy
from controlplane.store import SessionStore, StoredSession
from controlplane.tunnels import DEFAULT_REPORT_INTERVAL_S, TunnelRegistry
from filters import Problem, Session, ValidationError, parse_address, parse_session
from filters.documents import load_json
from filters.model import MAX_UNIX_S

_EXTEND_FIELDS = frozenset({"ttl_s", "expires_at"})
_CHANGES = frozenset({"POST", "PUT", "DELETE"})
# Unix seconds, bounded before float(): a longer run of digits is no time (12 digits reach past 9999).
_NUMBER_RE = re.compile(r"\d{1,12}(?:\.\d{1,9})?")
# Audit entries per request of GET /v1/audit: a page a terminal can show, bounded work per call.
MAX_AUDIT_PAGE = 1000
_DEFAULT_AUDIT_PAGE = 100


class ProxyView(Protocol):
    """What the API reads of the push service (``controlplane.push.PushService``)."""

    def proxies(self) -> list[dict[str, Any]]:
        """Every proxy connected now or seen recently."""

    def rollout(self, session: Session, revision: int) -> list[dict[str, Any]]:
        """Each connected proxy fronting the session's services and whether it runs this revision."""

    def refusals(self) -> dict[str, list[dict[str, Any]]]:
        """Session id -> connected proxies that refused a version of it, and why."""


class ApiService:
    """Routes API requests to the store; sans-IO (``admit`` the head, then ``handle(Request) -> Reply``).

    ``policy`` is a plain attribute: a reload assigns a new one and the next request uses it.
    """

    def __init__(
        self,
        store: SessionStore,
        policy: Policy,
        authenticate: Callable[[str | None], Awaitable[Identity]],
        roles: Roles,
        proxies: ProxyView,
        registry: CollectorRegistry,
        metrics: ControlPlaneMetrics,
        audit: AuditLog,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tunnels: TunnelRegistry | None = None,
    ) -> None:
        self.store = store
        self.tunnels = tunnels or TunnelRegistry(store, audit, clock=clock)
        self.policy = policy
        self._authenticate = authenticate
        self._roles = roles
        self._proxies = proxies
        self._registry = registry
        self._metrics = metrics
        self._audit = audit
        self._limits = limits or Limits()
        self._clock = clock
        self._changes = RateLimiter(self._limits.changes_per_minute / 60.0, self._limits.change_burst, monotonic)

    # ------------------------------------------------------------------ entry points

    async def admit(self, request: Request) -> Request | Reply:
        """Authenticate a request from its head: the request with its identity, or the 401 reply."""
        if not _is_api(request.path):
            return request
        try:
            identity = await self._authenticate(request.header("authorization"))
        except Unauthorized as exc:
            self._metrics.auth_failures.inc()
            self._audit.record_limited(self._audit.entry(
                UNAUTHENTICATED, request.peer, "refuse", outcome="unauthorized",
                detail={"method": request.method, "path": request.path[:200], "reason": exc.message}),
                _source_host(request.peer))
            reply = json_reply(exc.status, exc.to_dict(), exc.headers())
            self._metrics.api_request(request.method, reply.status)
            return reply
        return Request(request.method, request.path, request.query, request.headers, request.body, request.peer,
                       identity)

    def handle(self, request: Request) -> Reply:
        """Answer one admitted request, count it, and audit a refusal."""
        try:
            reply = self._route(request)
        except ValidationError as exc:
            reply = _invalid(exc.problems)
        except ControlPlaneError as exc:
            if isinstance(exc, PolicyRefused):
                self._metrics.policy_refusal(exc.policy)
            elif isinstance(exc, RateLimited):
                self._metrics.rate_limited.inc()
            reply = json_reply(exc.status, exc.to_dict(), exc.headers())
        self._metrics.api_request(request.method, reply.status)
        if request.identity is not None and (reply.status in (403, 409, 429) or (
                reply.status == 400 and request.method in _CHANGES)):
            self._audit_refusal(request, request.identity, reply)
        return reply

    def _audit_refusal(self, request: Request, identity: Identity, reply: Reply) -> None:
        try:
            body = json.loads(reply.body)
        except ValueError:
            body = {}
        detail = {"method": request.method, "path": request.path[:200], "status": reply.status,
                  **{k: body[k] for k in ("error", "message", "policy", "holder", "owner") if k in body}}
        session_id = _session_id(request.path)
        stored = self.store.get(session_id) if session_id else None
        entry = self._audit.entry(identity.name, request.peer, "refuse", outcome=str(body.get("error", reply.status)),
                                  session=session_id, owner=stored.session.owner if stored else None, detail=detail)
        if reply.status == 429:
            self._audit.record_limited(entry, identity.name)  # one entry per burst, not one per retry
        else:
            self._audit.record(entry)

    def _route(self, request: Request) -> Reply:
        method, path = request.method, request.path
        if path == "/healthz":
            return self._only(method, "GET") or json_reply(200, {"status": "ok", "revision": self.store.revision})
        if path == "/metrics":
            return self._only(method, "GET") or Reply(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if not _is_api(path):
            return error_reply(404, "not_found", f"no such path {path!r}; the API is under /v1")
        identity = request.identity
        assert identity is not None, "admit() authenticates every /v1 request"
        segments = [unquote(s) for s in path[len("/v1/"):].split("/")]
        if segments == ["whoami"]:
            return self._only(method, "GET") or self._whoami(identity)
        if self._roles.proxy_only(identity):
            raise Forbidden(f"identity {identity.name!r} is a proxy credential (groups "
                            f"{', '.join(sorted(identity.groups))}); proxies cannot use the API")
        if segments[0] == "tunnels":
            return self._tunnels(request, identity, segments[1:])
        if identity.in_any(self._roles.gateway_groups) and not self._roles.is_admin(identity):
            raise Forbidden(f"identity {identity.name!r} is a gateway credential (groups "
                            f"{', '.join(sorted(identity.groups))}); gateways only use /v1/tunnels")
        match segments:
            case ["sessions"]:
                if method == "POST":
                    return self._create(request, identity)
                return self._only(method, "GET", "POST") or self._list(request)
            case ["sessions", session_id] if session_id:
                if method == "DELETE":
                    return self._delete(request, identity, session_id)
                if method == "PUT":
                    return self._update(request, identity, session_id)
                return self._only(method, "GET", "PUT", "DELETE") or self._get(session_id)
            case ["sessions", session_id, "extend"] if session_id:
                return self._only(method, "POST") or self._extend(request, identity, session_id)
            case ["sessions", session_id, "tunnel"] if session_id:
                return self._only(method, "POST") or self._ticket(request, identity, session_id)
            case ["proxies"]:
                return self._only(method, "GET") or json_reply(
                    200, {"revision": self.store.revision, "proxies": self._proxies.proxies()})
            case ["audit"]:
                return self._only(method, "GET") or self._audit_entries(request, identity)
        return error_reply(404, "not_found", f"no such path {path!r}")

    @staticmethod
    def _only(method: str, *allowed: str) -> Reply | None:
        """None when ``method`` is allowed here, else the 405 reply."""
        if method in allowed:
            return None
        return error_reply(405, "method_not_allowed", f"{method} is not allowed here; use {' or '.join(allowed)}",
                           [("allow", ", ".join(allowed))])

    # ------------------------------------------------------------------ who may do what

    def _rate_limit(self, identity: Identity) -> None:
        wait_s = self._changes.take(identity.name)
        if wait_s > 0:
            raise RateLimited(f"identity {identity.name!r} made more than {self._limits.change_burst} changes in a "
                              f"row (the limit is {self._limits.changes_per_minute:g} a minute); retry in "
                              f"{math.ceil(wait_s)} s", wait_s)

    def _may_change(self, identity: Identity, stored: StoredSession) -> None:
        """Raise ``Forbidden`` unless ``identity`` owns the session, shares its group, or is an admin."""
        owner = stored.session.owner
        if identity.name == owner or self._roles.is_admin(identity) or (
                stored.group is not None and stored.group in identity.groups):
            return
        shared = f", members of group {stored.group!r}" if stored.group is not None else ""
        raise Forbidden(f"session {stored.session.id!r} is owned by {owner!r}; only its owner{shared} and admins "
                        f"(groups {', '.join(sorted(self._roles.admin_groups))}) may change it", owner)

    def _check_group(self, identity: Identity, group: Any) -> str | None:
        """The ``group`` a session is shared with, checked: the caller must be in it (or an admin)."""
        if group is None:
            return None
        problem = name_problem(group, "group")
        if problem is not None:
            raise ValidationError([Problem("group", problem)])
        if group not in identity.groups and not self._roles.is_admin(identity):
            raise Forbidden(f"you ({identity.name!r}) are not in group {group!r}, so you cannot share a session with "
                            f"it; your groups: {', '.join(sorted(identity.groups)) or 'none'}")
        return str(group)

    def _owner(self, identity: Identity, spec: dict[str, Any]) -> str:
        """The owner of a new session: the caller, or whom an admin names."""
        owner = spec.get("owner")
        if owner is None or owner == identity.name:
            return identity.name
        if self._roles.is_admin(identity) and isinstance(owner, str):
            return owner  # an admin acting for someone; the audit entry names the admin
        raise PolicyRefused("owner", f"a session's owner is the identity that creates it (you are {identity.name!r}, "
                            f"not {owner!r}); leave owner out (to let others change it, share it with a group)")

    # ------------------------------------------------------------------ sessions

    def _create(self, request: Request, identity: Identity) -> Reply:
        self._rate_limit(identity)
        spec = self._json_object(request.body, "session")
        group = self._check_group(identity, spec.pop("group", None))
        now = self._clock()
        problems = []
        if "created_at" in spec:
            problems.append(Problem("session.created_at", "is set by the control plane; leave it out"))
            del spec["created_at"]
        spec["owner"] = self._owner(identity, spec)
        if "id" not in spec:
            spec["id"] = self._new_id()
        if "ttl_s" not in spec and "expires_at" not in spec:
            spec["ttl_s"] = self.policy.default_ttl_for(identity.groups)
        session = self._parse(spec, now, problems)
        policy = self.policy
        policy.check_create(session, now, self.store.count(), self.store.count(session.owner), identity.groups)
        self._check_overlap(session, group, identity, now)
        audit = self._audit.entry(identity.name, request.peer, "create", session=session.id, owner=session.owner,
                                  detail={"session": session.to_dict(), **({"group": group} if group else {})})
        stored = self.store.create(session, group, audit)
        return json_reply(201, _stored(stored), [("location", f"/v1/sessions/{session.id}")])

    def _update(self, request: Request, identity: Identity, session_id: str) -> Reply:
        self._rate_limit(identity)
        old = self._existing(session_id)
        self._may_change(identity, old)
        spec = self._json_object(request.body, "session")
        group = self._check_group(identity, spec.pop("group")) if "group" in spec else old.group
        now = self._clock()
        problems = []
        if spec.get("id", session_id) != session_id:
            problems.append(Problem("session.id", f"is {session_id!r} (the id in the path); it cannot change"))
        if "created_at" in spec:
            problems.append(Problem("session.created_at", "is set by the control plane; leave it out"))
        if spec.get("owner", old.session.owner) != old.session.owner:
            raise PolicyRefused("owner", f"the owner of session {session_id!r} is {old.session.owner!r} and cannot "
                                "change; leave owner out")
        spec.update(id=session_id, owner=old.session.owner, created_at=old.session.created_at)
        if "ttl_s" not in spec and "expires_at" not in spec and old.session.expires_at is not None:
            spec["expires_at"] = old.session.expires_at
        session = self._parse(spec, now, problems)
        # Counted without the session itself: it is replaced, not added.
        self.policy.check_create(session, now, self.store.count() - 1, self.store.count(session.owner) - 1,
                                 identity.groups)
        self._check_overlap(session, group, identity, now)
        before, after = old.session.to_dict(), session.to_dict()
        changed = {k: {"from": before.get(k), "to": after.get(k)} for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k)}
        if group != old.group:
            changed["group"] = {"from": old.group, "to": group}
        audit = self._audit.entry(identity.name, request.peer, "update", session=session_id, owner=session.owner,
                                  detail={"changed": changed})
        return json_reply(200, _stored(self.store.update(session, group, audit)))

    def _parse(self, spec: dict[str, Any], now: float, problems: list[Problem]) -> Session:
        session = None
        try:
            session = parse_session(spec, "session", self.policy.limits, now)
        except ValidationError as exc:
            problems.extend(exc.problems)
        if session is not None and session.expires_at is not None and session.expires_at <= now:
            problems.append(Problem("session.expires_at", "is in the past"))
        if session is not None:
            for i, route in enumerate(session.routes):
                if route.tunnel:
                    problems.append(Problem(f"session.routes[{i}].tunnel", "is set by the control plane when a "
                                            "tunnel attaches; leave it out (destination: tunnel asks for one)"))
        if problems or session is None:
            raise ValidationError(problems)
        return session

    def _check_overlap(self, session: Session, group: str | None, identity: Identity, now: float) -> None:
        if session.key is not None:
            return
        rivals = {s.session.id: s for route in session.routes for s in self.store.filter_only(route.service)}
        self.policy.check_overlap(session, group, rivals.values(), now, identity.groups)

    def _new_id(self) -> str:
        while True:  # 40 random bits: a repeat is practically never, but checking is free
            session_id = "s-" + secrets.token_hex(5)
            if self.store.get(session_id) is None:
                return session_id

    def _existing(self, session_id: str) -> StoredSession:
        stored = self.store.get(session_id)
        if stored is None:
            raise NotFound(f"no session {session_id!r} (it may have expired or been deleted)")
        return stored

    def _list(self, request: Request) -> Reply:
        owners = request.query.get("owner")
        owner = owners[-1] if owners else None
        refusals = self._proxies.refusals()
        sessions = []
        for stored in self.store.list(owner):
            item = _stored(stored)
            refused = [r for r in refusals.get(stored.session.id, ()) if r["version"] == str(stored.revision)]
            if refused:
                item["refused_by"] = refused
            sessions.append(item)
        return json_reply(200, {"revision": self.store.revision, "sessions": sessions})

    def _get(self, session_id: str) -> Reply:
        stored = self._existing(session_id)
        out = {**_stored(stored), "proxies": self._proxies.rollout(stored.session, stored.revision)}
        if any(r.destination is None for r in stored.session.routes):
            tunnel = self.tunnels.for_session(session_id)
            out["tunnel"] = None if tunnel is None else tunnel.to_dict()
        return json_reply(200, out)

    # ------------------------------------------------------------------ tunnels (docs/remocal.md)

    def _ticket(self, request: Request, identity: Identity, session_id: str) -> Reply:
        """A one-use ticket to attach a tunnel: only who may change the session may attach to it."""
        stored = self._existing(session_id)
        self._may_change(identity, stored)
        if not any(r.destination is None for r in stored.session.routes):
            raise ValidationError([Problem("session.routes", f"session {session_id!r} has no route with destination "
                                           "'tunnel'; create it with turnout connect (or destination: tunnel)")])
        rules = self.policy.rules_for(identity.groups).to_dict()
        outgoing = {k: rules[k] for k in ("groups", "allowed_services", "allowed_destinations")}
        ticket, expires_at = self.tunnels.issue(session_id, identity.name, outgoing)
        return json_reply(201, {"ticket": ticket, "expires_at": expires_at, "session": stored.session.to_dict()})

    def _tunnels(self, request: Request, identity: Identity, rest: list[str]) -> Reply:
        method = request.method
        if not rest and method == "GET":
            return json_reply(200, {"tunnels": [t.to_dict() for t in self.tunnels.tunnels()]})
        if not self._roles.is_gateway(identity):
            raise Forbidden(f"identity {identity.name!r} is not a gateway (groups "
                            f"{', '.join(sorted(self._roles.gateway_groups))}); only turnout gateway registers tunnels")
        if not rest:
            return self._only(method, "GET", "POST") or self._redeem(request, identity)
        if len(rest) == 1 and rest[0]:
            tunnel_id = rest[0]
            if method == "DELETE":
                reason = (request.query.get("reason") or ["the machine's link was lost"])[-1]
                self.tunnels.remove(tunnel_id, identity.name, reason, request.peer)
                return Reply(204)
            if method == "POST":
                body = self._json_object(request.body)
                return json_reply(200, {"tunnel": self.tunnels.report(tunnel_id, identity.name, body).to_dict()})
            return self._only(method, "POST", "DELETE") or error_reply(404, "not_found", "no such path")
        return error_reply(404, "not_found", f"no such path {request.path!r}")

    def _redeem(self, request: Request, identity: Identity) -> Reply:
        body = self._json_object(request.body)
        problems = []
        for name in ("ticket", "gateway", "address"):
            if not isinstance(body.get(name), str) or not body[name]:
                problems.append(Problem(name, "must be a non-empty string"))
        address = None
        if not problems:
            try:
                address = parse_address(body["address"])
            except ValueError as exc:
                problems.append(Problem("address", str(exc)))
        if problems or address is None:
            raise ValidationError(problems)
        peer = body.get("peer")
        tunnel = self.tunnels.redeem(body["ticket"], body["gateway"][:128], identity.name, address,
                                     peer[:128] if isinstance(peer, str) else "", request.peer)
        stored = self._existing(tunnel.session_id)
        # What the gateway needs for the machine's outgoing calls: where the attaching identity's
        # policy lets them go, and the key to add to their baggage.
        return json_reply(201, {"tunnel": tunnel.to_dict(), "session": stored.session.to_dict(),
                                "outgoing": {"rules": tunnel.rules, "key": stored.session.key},
                                "report_interval_s": DEFAULT_REPORT_INTERVAL_S})

    def _delete(self, request: Request, identity: Identity, session_id: str) -> Reply:
        self._rate_limit(identity)
        stored = self._existing(session_id)
        self._may_change(identity, stored)
        audit = self._audit.entry(identity.name, request.peer, "delete", session=session_id,
                                  owner=stored.session.owner, detail={"session": stored.session.to_dict()})
        if not self.store.delete(session_id, audit):
            raise NotFound(f"no session {session_id!r} (it may have expired or been deleted)")
        return Reply(204)

    def _extend(self, request: Request, identity: Identity, session_id: str) -> Reply:
        self._rate_limit(identity)
        body = self._json_object(request.body)
        now = self._clock()
        expires_at = _parse_extend(body, now)
        stored = self._existing(session_id)
        self._may_change(identity, stored)
        self.policy.check_extend(expires_at, now, identity.groups)
        audit = self._audit.entry(identity.name, request.peer, "extend", session=session_id,
                                  owner=stored.session.owner,
                                  detail={"expires_at": {"from": stored.session.expires_at, "to": expires_at}})
        return json_reply(200, _stored(self.store.extend(session_id, expires_at, audit)))

    # ------------------------------------------------------------------ identity and audit

    def _whoami(self, identity: Identity) -> Reply:
        return json_reply(200, {
            "identity": identity.name,
            "groups": sorted(identity.groups),
            "via": identity.via,
            "admin": self._roles.is_admin(identity),
            "proxy": self._roles.is_proxy(identity),
            "rules": self.policy.rules_for(identity.groups).to_dict(),
        })

    def _audit_entries(self, request: Request, identity: Identity) -> Reply:
        since = None
        if request.query.get("since"):
            text = request.query["since"][-1]
            since = float(text) if _NUMBER_RE.fullmatch(text) else _parse_time(text, "since")
        session = request.query["session"][-1] if request.query.get("session") else None
        limit = _DEFAULT_AUDIT_PAGE
        if request.query.get("limit"):
            text = request.query["limit"][-1]
            # ASCII digits, and few: int() takes other scripts' digits and refuses 4,301 of them.
            if not (text.isascii() and text.isdigit() and len(text) <= 9) or not 1 <= int(text) <= MAX_AUDIT_PAGE:
                raise ValidationError([Problem("limit", f"must be a whole number from 1 to {MAX_AUDIT_PAGE}")])
            limit = int(text)
        # Admins read everything; others what they did and what was done to their sessions.
        party = None if self._roles.is_admin(identity) else identity.name
        entries = self._audit.entries(since, session, party, limit)
        return json_reply(200, {"entries": [e.to_dict() for e in entries], "all": party is None})

    def _json_object(self, body: bytes, root: str = "") -> dict[str, Any]:
        """The body as a JSON object; ``root`` prefixes the path naming an over-long number."""
        max_depth = self._limits.max_json_depth
        try:
            data = load_json(body, root)  # an over-long number: ValidationError naming where it is
        except RecursionError:
            raise ValidationError([Problem("body", f"nests deeper than {max_depth} levels")]) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValidationError([Problem("body", f"is not valid JSON: {exc}")]) from None
        if not isinstance(data, dict):
            raise ValidationError([Problem("body", "must be a JSON object")])
        if _depth(data, max_depth) > max_depth:
            raise ValidationError([Problem("body", f"nests deeper than {max_depth} levels")])
        return data


def _is_api(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def _session_id(path: str) -> str | None:
    segments = path.split("/")
    return unquote(segments[3]) if len(segments) >= 4 and segments[1:3] == ["v1", "sessions"] and segments[3] \
        else None


def _source_host(peer: str) -> str:
    return peer.rpartition(":")[0] or peer


def _depth(value: Any, most: int) -> int:
    """How deeply ``value`` nests (a scalar is 0), looking no deeper than ``most`` + 1."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        if deepest > most:
            return deepest
        stack.extend((child, level) for child in children)
    return deepest


def _stored(stored: StoredSession) -> dict[str, Any]:
    out: dict[str, Any] = {"session": stored.session.to_dict(), "revision": stored.revision}
    if stored.group is not None:
        out["group"] = stored.group
    return out


def _invalid(problems: list[Problem]) -> Reply:
    return json_reply(400, {
        "error": "invalid",
        "message": "; ".join(map(str, problems)),
        "problems": [{"field": p.field, "reason": p.reason} for p in problems],
    })


def _parse_time(value: Any, field: str) -> float:
    """Unix seconds or an RFC 3339 time with a zone; raises ``ValidationError`` naming ``field``."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise ValidationError([Problem(field, "must be unix seconds or an RFC 3339 time with a zone")])
        return parsed.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_UNIX_S <= value <= MAX_UNIX_S:
        raise ValidationError([Problem(field, "must be unix seconds or an RFC 3339 time with a zone, before the "
                                              "year 10000")])
    return float(value)


def _parse_extend(body: dict[str, Any], now: float) -> float:
    """The new ``expires_at`` from ``{"ttl_s": N}`` or ``{"expires_at": T}``."""
    unknown = set(body) - _EXTEND_FIELDS
    if unknown:
        raise ValidationError([Problem("body", "unknown field(s): " + ", ".join(sorted(unknown)))])
    if len(body) != 1:
        raise ValidationError([Problem("body", "give exactly one of ttl_s (seconds from now) or expires_at")])
    if "ttl_s" in body:
        ttl_s = body["ttl_s"]
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= MAX_UNIX_S - now:
            raise ValidationError([Problem("ttl_s", "must be a positive number of seconds, ending before the year "
                                                    "10000")])
        return now + ttl_s
    expires_at = _parse_time(body["expires_at"], "expires_at")
    if expires_at <= now:
        raise ValidationError([Problem("expires_at", "is in the past")])
    return expires_at
