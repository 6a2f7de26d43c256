"""Between ``filters`` sessions and their ``turnout.v1`` messages.

Both directions go through the rules file's own spec language, so a session pushed over
the wire is validated by exactly the code that validates a YAML file.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from filters import TUNNEL, RuleLimits, Session, ValidationError, parse_session
from filters.errors import Problem
from turnout.v1 import config_pb2


def session_to_proto(session: Session, services: Collection[str] | None = None) -> config_pb2.Session | None:
    """The message for ``session`` with only the routes for ``services`` (all when None).

    None when no route is left: the proxy asking has no use for the session.
    """
    routes = [r for r in session.routes if services is None or r.service in services]
    if not routes:
        return None
    msg = config_pb2.Session(
        id=session.id, key=session.key or "", owner=session.owner, labels=dict(session.labels),
        created_at=session.created_at, expires_at=session.expires_at or 0.0,
    )
    for route in routes:
        msg.routes.add(
            service=route.service, destination=TUNNEL if route.destination is None else str(route.destination),
            mode=route.mode, fallback=route.fallback, priority=route.priority,
            upstream_protocol=route.upstream_protocol, tunnel=route.tunnel,
            match_json="" if route.match is None else json.dumps(route.match.to_spec(), separators=(",", ":")),
        )
    return msg


def session_to_spec(msg: config_pb2.Session) -> dict[str, Any]:
    """The rules-file mapping for a session message (raises ``ValidationError`` on bad JSON)."""
    spec: dict[str, Any] = {"id": msg.id, "created_at": msg.created_at}
    if msg.key:
        spec["key"] = msg.key
    if msg.owner:
        spec["owner"] = msg.owner
    if msg.labels:
        spec["labels"] = dict(msg.labels)
    if msg.expires_at:
        spec["expires_at"] = msg.expires_at
    routes = []
    for i, route in enumerate(msg.routes):
        route_spec: dict[str, Any] = {"service": route.service, "destination": route.destination,
                                      "mode": route.mode or "steal", "fallback": route.fallback or "baseline",
                                      "priority": route.priority,
                                      "upstream_protocol": route.upstream_protocol}
        if route.tunnel:
            route_spec["tunnel"] = route.tunnel
        if route.match_json:
            try:
                route_spec["match"] = json.loads(route.match_json)
            except ValueError as exc:
                where = f"session {msg.id}.routes[{i}].match"
                raise ValidationError([Problem(where, f"invalid JSON: {exc}")]) from None
        routes.append(route_spec)
    spec["routes"] = routes
    return spec


def session_from_proto(msg: config_pb2.Session, limits: RuleLimits | None = None) -> Session:
    """Validate a session message; raises ``ValidationError`` naming each problem."""
    return parse_session(session_to_spec(msg), f"session {msg.id or '?'}", limits)
