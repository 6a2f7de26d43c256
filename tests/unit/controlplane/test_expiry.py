"""Unit tests for controlplane.expiry: sessions go when due, and a new earlier expiry wakes the task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from prometheus_client import CollectorRegistry

from controlplane.audit import EXPIRY, AuditLog
from controlplane.expiry import Expirer
from controlplane.limits import Limits
from controlplane.metrics import ControlPlaneMetrics
from controlplane.store import Change, SessionStore
from filters import Session, parse_session


def session(sid: str, expires_at: float | None) -> Session:
    spec: dict[str, Any] = {"id": sid, "key": sid, "routes": [{"service": "users", "destination": "10.0.0.5:8080"}]}
    if expires_at is not None:
        spec["expires_at"] = expires_at
    return parse_session(spec, now=time.time())


async def wait_until_gone(store: SessionStore, sid: str, timeout_s: float = 3.0) -> float:
    start = time.monotonic()
    while store.get(sid) is not None:
        assert time.monotonic() - start < timeout_s, f"{sid} not expired in {timeout_s} s"
        await asyncio.sleep(0.005)
    return time.time()


def test_expiry_follows_the_store() -> None:
    async def scenario() -> None:
        store = SessionStore(":memory:")
        registry = CollectorRegistry()
        changes: list[Change] = []
        store.subscribe(changes.append)
        store.create(session("far", time.time() + 3600))
        store.create(session("never", None))
        task = asyncio.create_task(Expirer(store, ControlPlaneMetrics(registry, store),
                                           AuditLog(store, Limits())).run())
        try:
            await asyncio.sleep(0.05)  # the task now sleeps towards "far", an hour away
            due = time.time() + 0.1
            store.create(session("soon", due))
            gone_at = await wait_until_gone(store, "soon")
            assert due <= gone_at < due + 0.5, "woken by the create, not by the hour-long sleep"
            assert changes[-1].removed == ("soon",)
            assert registry.get_sample_value("turnout_cp_sessions_expired_total") == 1
            (entry,) = store.audit(session="soon")
            assert (entry.identity, entry.action, entry.session, entry.detail) == (
                EXPIRY, "expire", "soon", {"expires_at": due}), "the expiry is audited with the removal"
            store.extend("far", time.time() + 0.05)
            await wait_until_gone(store, "far")
            assert sorted(store.all()) == ["never"]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()

    asyncio.run(scenario())


def test_sessions_already_due_at_start_go_at_once() -> None:
    async def scenario() -> None:
        store = SessionStore(":memory:")
        store.create(session("old", time.time() + 0.01))
        await asyncio.sleep(0.02)
        task = asyncio.create_task(Expirer(store, ControlPlaneMetrics(CollectorRegistry(), store),
                                           AuditLog(store, Limits())).run())
        try:
            await wait_until_gone(store, "old", timeout_s=0.5)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()

    asyncio.run(scenario())
