"""``Snapshot.with_changes`` decides exactly like a snapshot compiled from scratch."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters import RequestHead, Session, ValidationError, compile_snapshot, parse_session

IDS = [f"s{i}" for i in range(6)]
KEYS = ["k0", "k1", "k2", None]
SERVICES = ["users", "orders"]
USERS = ["alice", "bob"]
NOW = 1000.0


@st.composite
def sessions(draw: st.DrawFn) -> Session:
    sid = draw(st.sampled_from(IDS))
    key = draw(st.sampled_from(KEYS))
    services = draw(st.lists(st.sampled_from(SERVICES), min_size=1, max_size=2, unique=True))
    routes: list[dict[str, Any]] = []
    for service in services:
        route: dict[str, Any] = {"service": service, "destination": f"10.0.0.{IDS.index(sid) + 1}:80",
                                 "priority": draw(st.integers(0, 2))}
        if key is None or draw(st.booleans()):
            route["match"] = {"header": {"name": "x-user", "exact": draw(st.sampled_from(USERS))}}
        routes.append(route)
    spec: dict[str, Any] = {"id": sid, "routes": routes, "created_at": float(draw(st.integers(0, 3)))}
    if key is not None:
        spec["key"] = key
    if draw(st.booleans()):
        spec["expires_at"] = NOW + draw(st.sampled_from([-1, 5, 50]))
    return parse_session(spec)


operations = st.lists(st.one_of(sessions(), st.sampled_from(IDS)), min_size=1, max_size=12)


def decisions(snapshot: Any) -> list[tuple[str, str | None]]:
    out = []
    for service in SERVICES:
        for key in KEYS:
            for user in (*USERS, None):
                headers = {}
                if key is not None:
                    headers["baggage"] = "turnout-session=" + key
                if user is not None:
                    headers["x-user"] = user
                for now in (NOW, NOW + 10, NOW + 100):
                    decision = snapshot.decide(service, RequestHead("GET", "/", headers), now)
                    out.append((decision.kind, decision.session_id))
    return out


@settings(max_examples=300, deadline=None)
@given(operations)
def test_changes_match_a_fresh_compile(ops: list[Session | str]) -> None:
    model: dict[str, Session] = {}
    snapshot = compile_snapshot([], "0")
    for step, op in enumerate(ops, 1):
        candidate = dict(model)
        upserted: list[Session] = []
        removed: list[str] = []
        if isinstance(op, Session):
            candidate[op.id] = op
            upserted.append(op)
        else:
            candidate.pop(op, None)
            removed.append(op)
        try:
            expected = compile_snapshot(candidate.values(), str(step))
        except ValidationError:
            with pytest.raises(ValidationError):
                snapshot.with_changes(upserted, removed, str(step))
            continue
        updated = snapshot.with_changes(upserted, removed, str(step))
        assert sorted(s.id for s in updated.sessions) == sorted(candidate)
        assert decisions(updated) == decisions(expected)
        assert sorted(updated.warnings) == sorted(expected.warnings)
        model, snapshot = candidate, updated
