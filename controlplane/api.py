"""The HTTP JSON API: sessions, proxies, health and metrics.

::

    POST   /v1/sessions               a session spec as in the rules file -> 201 {"session", "revision"}
    GET    /v1/sessions[?owner=O]     -> {"revision", "sessions": [{"session", "revision"}, ...]}
    GET    /v1/sessions/{id}          -> {"session", "revision"} | 404
    POST   /v1/sessions/{id}/extend   {"ttl_s": N} (from now) or {"expires_at": T} -> {"session", "revision"}
    DELETE /v1/sessions/{id}          -> 204 | 404
    GET    /v1/proxies                -> {"revision", "proxies": [...]}
    GET    /healthz, GET /metrics     no token needed

A create is checked in this order, each refusal with its own status: the spec
(400 ``invalid``, every problem listed), the policy (403 ``policy``, naming the rule), the
store (409 ``conflict``, naming the session that holds the claim). Everything under
``/v1`` needs ``Authorization: Bearer <token>`` (401 ``unauthorized`` otherwise).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from controlplane.auth import bearer_token, token_matches
from controlplane.errors import ControlPlaneError, NotFound, PolicyRefused, Unauthorized
from controlplane.http import Reply, Request, error_reply, json_reply
from controlplane.metrics import ControlPlaneMetrics
from controlplane.policy import Policy
from controlplane.store import SessionStore, StoredSession
from filters import Problem, ValidationError, parse_session

_EXTEND_FIELDS = frozenset({"ttl_s", "expires_at"})


class ApiService:
    """Routes API requests to the store; sans-IO (``handle(Request) -> Reply``).

    ``policy`` is a plain attribute: a reload assigns a new one and the next request uses it.
    """

    def __init__(
        self,
        store: SessionStore,
        policy: Policy,
        api_token: str | None,
        proxies: Callable[[], list[dict[str, Any]]],
        registry: CollectorRegistry,
        metrics: ControlPlaneMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy
        self._api_token = api_token
        self._proxies = proxies
        self._registry = registry
        self._metrics = metrics
        self._clock = clock

    def handle(self, request: Request) -> Reply:
        """Answer one request and count it."""
        try:
            reply = self._route(request)
        except ValidationError as exc:
            reply = _invalid(exc.problems)
        except ControlPlaneError as exc:
            if isinstance(exc, PolicyRefused):
                self._metrics.policy_refusal(exc.policy)
            reply = json_reply(exc.status, exc.to_dict(), exc.headers())
        self._metrics.api_request(request.method, reply.status)
        return reply

    def _route(self, request: Request) -> Reply:
        method, path = request.method, request.path
        if path == "/healthz":
            return self._only(method, "GET") or json_reply(200, {"status": "ok", "revision": self.store.revision})
        if path == "/metrics":
            return self._only(method, "GET") or Reply(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if path != "/v1" and not path.startswith("/v1/"):
            return error_reply(404, "not_found", f"no such path {path!r}; the API is under /v1")
        self._authenticate(request)
        segments = [unquote(s) for s in path[len("/v1/"):].split("/")]
        match segments:
            case ["sessions"]:
                if method == "POST":
                    return self._create(request)
                return self._only(method, "GET", "POST") or self._list(request)
            case ["sessions", session_id] if session_id:
                if method == "DELETE":
                    return self._delete(session_id)
                return self._only(method, "GET", "DELETE") or self._get(session_id)
            case ["sessions", session_id, "extend"] if session_id:
                return self._only(method, "POST") or self._extend(session_id, request)
            case ["proxies"]:
                return self._only(method, "GET") or json_reply(
                    200, {"revision": self.store.revision, "proxies": self._proxies()})
        return error_reply(404, "not_found", f"no such path {path!r}")

    @staticmethod
    def _only(method: str, *allowed: str) -> Reply | None:
        """None when ``method`` is allowed here, else the 405 reply."""
        if method in allowed:
            return None
        return error_reply(405, "method_not_allowed", f"{method} is not allowed here; use {' or '.join(allowed)}",
                           [("allow", ", ".join(allowed))])

    def _authenticate(self, request: Request) -> None:
        if self._api_token is None:
            return
        presented = bearer_token(request.header("authorization"))
        if token_matches(presented, self._api_token):
            return
        if presented is None:
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>' (turnout: --token-file, "
                               "or the token in TURNOUT_TOKEN)", invalid_token=False)
        raise Unauthorized("wrong bearer token", invalid_token=True)

    # ------------------------------------------------------------------ sessions

    def _create(self, request: Request) -> Reply:
        spec = _json_object(request.body)
        policy = self.policy
        now = self._clock()
        problems = []
        if "created_at" in spec:
            problems.append(Problem("session.created_at", "is set by the control plane; leave it out"))
            del spec["created_at"]
        if "id" not in spec:
            spec["id"] = self._new_id()
        if "ttl_s" not in spec and "expires_at" not in spec:
            spec["ttl_s"] = policy.default_ttl_s
        session = None
        try:
            session = parse_session(spec, "session", policy.limits, now)
        except ValidationError as exc:
            problems.extend(exc.problems)
        if session is not None and session.expires_at is not None and session.expires_at <= now:
            problems.append(Problem("session.expires_at", "is in the past"))
        if problems or session is None:
            return _invalid(problems)
        policy.check_create(session, now, self.store.count(), self.store.count(session.owner))
        stored = self.store.create(session)
        return json_reply(201, _stored(stored), [("location", f"/v1/sessions/{session.id}")])

    def _new_id(self) -> str:
        while True:  # 40 random bits: a repeat is practically never, but checking is free
            session_id = "s-" + secrets.token_hex(5)
            if self.store.get(session_id) is None:
                return session_id

    def _list(self, request: Request) -> Reply:
        owners = request.query.get("owner")
        owner = owners[-1] if owners else None
        sessions = [_stored(s) for s in self.store.list(owner)]
        return json_reply(200, {"revision": self.store.revision, "sessions": sessions})

    def _get(self, session_id: str) -> Reply:
        stored = self.store.get(session_id)
        if stored is None:
            raise _not_found(session_id)
        return json_reply(200, _stored(stored))

    def _delete(self, session_id: str) -> Reply:
        if not self.store.delete(session_id):
            raise _not_found(session_id)
        return Reply(204)

    def _extend(self, session_id: str, request: Request) -> Reply:
        body = _json_object(request.body)
        now = self._clock()
        expires_at = _parse_extend(body, now)
        if self.store.get(session_id) is None:
            raise _not_found(session_id)
        self.policy.check_extend(expires_at, now)
        return json_reply(200, _stored(self.store.extend(session_id, expires_at)))


def _stored(stored: StoredSession) -> dict[str, Any]:
    return {"session": stored.session.to_dict(), "revision": stored.revision}


def _not_found(session_id: str) -> NotFound:
    return NotFound(f"no session {session_id!r} (it may have expired or been deleted)")


def _invalid(problems: list[Problem]) -> Reply:
    return json_reply(400, {
        "error": "invalid",
        "message": "; ".join(map(str, problems)),
        "problems": [{"field": p.field, "reason": p.reason} for p in problems],
    })


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError([Problem("body", f"is not valid JSON: {exc}")]) from None
    if not isinstance(data, dict):
        raise ValidationError([Problem("body", "must be a JSON object")])
    return data


def _parse_extend(body: dict[str, Any], now: float) -> float:
    """The new ``expires_at`` from ``{"ttl_s": N}`` or ``{"expires_at": T}``."""
    unknown = set(body) - _EXTEND_FIELDS
    if unknown:
        raise ValidationError([Problem("body", "unknown field(s): " + ", ".join(sorted(unknown)))])
    if len(body) != 1:
        raise ValidationError([Problem("body", "give exactly one of ttl_s (seconds from now) or expires_at")])
    if "ttl_s" in body:
        ttl_s = body["ttl_s"]
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s < math.inf:
            raise ValidationError([Problem("ttl_s", "must be a positive number of seconds")])
        return now + ttl_s
    value = body["expires_at"]
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise ValidationError([Problem("expires_at", "must be unix seconds or an RFC 3339 time with a zone")])
        expires_at = parsed.timestamp()
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError([Problem("expires_at", "must be unix seconds or an RFC 3339 time with a zone")])
    else:
        expires_at = float(value)
    if expires_at <= now:
        raise ValidationError([Problem("expires_at", "is in the past")])
    return expires_at
