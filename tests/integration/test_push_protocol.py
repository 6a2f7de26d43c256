"""The push service's protocol, driven by a real grpcio client over a real socket.

The server is the real ``PushService`` on a real ``SessionStore``; the test plays the
proxy: it opens a stream, reads responses, ACKs or NACKs them, and checks what the
service sends and what it reports in ``proxies()``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from controlplane.push import PushService
from controlplane.store import SessionStore
from filters import parse_session
from turnout.v1 import config_pb2, config_pb2_grpc

READ_TIMEOUT_S = 5.0


class ControlPlane:
    """Store + push service + gRPC server on their own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.store: SessionStore = self.call(lambda: SessionStore(":memory:"))
        self.push: PushService = self.call(lambda: PushService(self.store, "test-cp"))
        self.server: Any = None
        self.port = self.wait(self._start())

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        config_pb2_grpc.add_SessionDiscoveryServicer_to_server(self.push, self.server)  # type: ignore[no-untyped-call]
        port = int(self.server.add_insecure_port("127.0.0.1:0"))
        await self.server.start()
        return port

    def wait(self, coro: Any) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (store changes notify the push service there)."""
        async def run() -> Any:
            return fn()
        return self.wait(run())

    def create(self, sid: str, key: str | None, *services: str, dest: str = "10.0.0.1:80") -> None:
        spec: dict[str, Any] = {"id": sid, "routes": [{"service": s, "destination": dest} for s in services]}
        if key is not None:
            spec["key"] = key
        else:
            spec["routes"][0]["match"] = {"header": {"name": "x-user", "exact": sid}}
        self.call(lambda: self.store.create(parse_session(spec, now=time.time())))

    def delete(self, sid: str) -> None:
        self.call(lambda: self.store.delete(sid))

    def proxy(self, node_id: str) -> dict[str, Any]:
        return next(p for p in self.call(self.push.proxies) if p["id"] == node_id)

    def stop(self) -> None:
        self.wait(self.push.close())
        self.wait(self.server.stop(0))
        self.call(self.store.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Proxy:
    """One stream as a proxy opens it: requests from a queue, responses into a queue."""

    def __init__(self, cp: ControlPlane, protocol: str, node: config_pb2.Node,
                 initial: dict[str, str] | None = None, version: str = "") -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{cp.port}")
        stub = config_pb2_grpc.SessionDiscoveryStub(self.channel)  # type: ignore[no-untyped-call]
        self.delta = protocol == "delta"
        self.requests: queue.Queue[Any] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        if self.delta:
            self.requests.put(config_pb2.DeltaDiscoveryRequest(node=node, initial_resource_versions=initial or {}))
            self.call = stub.DeltaSessions(self._requests())
        else:
            self.requests.put(config_pb2.DiscoveryRequest(node=node, version_info=version))
            self.call = stub.StreamSessions(self._requests())
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.sessions: dict[str, config_pb2.Session] = {}

    def _requests(self) -> Iterator[Any]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.responses.put(exc)

    def next(self, timeout_s: float = READ_TIMEOUT_S) -> Any:
        """The next response (fails the test when none comes)."""
        item = self.responses.get(timeout=timeout_s)
        assert not isinstance(item, grpc.RpcError), item
        return item

    def nothing_within(self, seconds: float) -> bool:
        """True when no response arrives within ``seconds``."""
        try:
            self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def apply(self, response: Any) -> None:
        """Update the proxy's view the way the real proxy does."""
        if not self.delta:
            self.sessions = {}
        for resource in response.resources:
            self.sessions[resource.name] = resource.session
        if self.delta:
            for name in response.removed_resources:
                self.sessions.pop(name, None)

    def ack(self, response: Any) -> None:
        self.apply(response)
        if self.delta:
            self.requests.put(config_pb2.DeltaDiscoveryRequest(response_nonce=response.nonce))
        else:
            self.requests.put(config_pb2.DiscoveryRequest(response_nonce=response.nonce,
                                                          version_info=response.version_info))

    def nack(self, response: Any, message: str) -> None:
        status = config_pb2.Status(code=3, message=message)
        if self.delta:
            self.requests.put(config_pb2.DeltaDiscoveryRequest(response_nonce=response.nonce, error_detail=status))
        else:
            self.requests.put(config_pb2.DiscoveryRequest(response_nonce=response.nonce, error_detail=status))

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


@pytest.fixture
def cp() -> Iterator[ControlPlane]:
    plane = ControlPlane()
    try:
        yield plane
    finally:
        plane.stop()


def node(node_id: str, *services: str, all_services: bool = False) -> config_pb2.Node:
    return config_pb2.Node(id=node_id, cluster="test", services=services, all_services=all_services)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_delta_sends_only_changes_for_the_subscribed_services(cp: ControlPlane) -> None:
    cp.create("a", "ka", "users")
    cp.create("b", "kb", "orders")
    proxy = Proxy(cp, "delta", node("p1", "users"))
    try:
        first = proxy.next()
        assert [r.name for r in first.resources] == ["a"]  # b routes only orders
        assert [r.service for r in first.resources[0].session.routes] == ["users"]
        proxy.ack(first)
        cp.create("c", "kc", "users", "orders")
        second = proxy.next()
        assert [r.name for r in second.resources] == ["c"]
        assert [r.service for r in second.resources[0].session.routes] == ["users"]  # cut to what p1 fronts
        assert list(second.removed_resources) == []
        proxy.ack(second)
        cp.create("d", "kd", "orders")
        assert proxy.nothing_within(0.5), "a change for another service was pushed"
        cp.delete("a")
        third = proxy.next()
        assert list(third.removed_resources) == ["a"] and not third.resources
        proxy.ack(third)
        wait_for(lambda: cp.proxy("p1")["in_sync"])
        record = cp.proxy("p1")
        assert record["protocol"] == "delta" and record["sessions"] == 1 and record["connected"]
        assert record["acked_version"] == third.system_version_info
    finally:
        proxy.close()


def test_state_of_the_world_sends_the_whole_set_every_time(cp: ControlPlane) -> None:
    cp.create("a", "ka", "users")
    proxy = Proxy(cp, "sotw", node("p1", "users"))
    try:
        first = proxy.next()
        assert [r.name for r in first.resources] == ["a"]
        proxy.ack(first)
        cp.create("b", "kb", "users")
        second = proxy.next()
        assert sorted(r.name for r in second.resources) == ["a", "b"]
        proxy.ack(second)
        cp.delete("a")
        third = proxy.next()
        assert [r.name for r in third.resources] == ["b"]
        assert int(third.version_info) > int(second.version_info) > int(first.version_info)
    finally:
        proxy.close()


def test_delta_and_sotw_converge_to_the_same_sessions(cp: ControlPlane) -> None:
    delta = Proxy(cp, "delta", node("d", "users", "orders"))
    sotw = Proxy(cp, "sotw", node("s", "users", "orders"))
    try:
        for proxy in (delta, sotw):
            proxy.ack(proxy.next())
        steps: list[Callable[[], None]] = [
            lambda: cp.create("a", "ka", "users"), lambda: cp.create("b", None, "orders"),
            lambda: cp.create("c", "kc", "users", "orders"), lambda: cp.delete("a"),
            lambda: cp.call(lambda: cp.store.extend("b", time.time() + 999)), lambda: cp.delete("c"),
            lambda: cp.create("e", "ke", "orders"),
        ]
        for step in steps:
            step()
            for proxy in (delta, sotw):
                proxy.ack(proxy.next())
        assert set(delta.sessions) == set(sotw.sessions) == {"b", "e"}
        for sid in delta.sessions:
            assert delta.sessions[sid] == sotw.sessions[sid]
        assert delta.sessions["b"].expires_at > time.time() + 900  # the extension reached both
    finally:
        delta.close()
        sotw.close()


def test_nack_is_recorded_and_the_next_change_still_flows(cp: ControlPlane) -> None:
    proxy = Proxy(cp, "delta", node("p1", "users"))
    try:
        proxy.ack(proxy.next())
        cp.create("bad", "kbad", "users")
        refused = proxy.next()
        proxy.nack(refused, "sessions[0]: key 'kbad' conflicts with a static session")
        wait_for(lambda: cp.proxy("p1")["last_nack"] is not None)
        record = cp.proxy("p1")
        assert "conflicts with a static session" in record["last_nack"]["message"]
        assert record["in_sync"] is False
        assert record["acked_version"] != refused.system_version_info
        assert proxy.nothing_within(0.3), "a NACKed change was re-sent unchanged"
        cp.create("good", "kgood", "users")
        after = proxy.next()
        assert [r.name for r in after.resources] == ["good"]
        proxy.ack(after)
        wait_for(lambda: cp.proxy("p1")["acked_version"] == after.system_version_info)
        record = cp.proxy("p1")  # the refused session is still not running there
        assert record["rejected"] == ["bad"] and record["in_sync"] is False and record["last_nack"] is not None
        cp.delete("bad")
        wait_for(lambda: cp.proxy("p1")["in_sync"])
        assert cp.proxy("p1")["last_nack"] is None and cp.proxy("p1")["rejected"] == []
        assert proxy.nothing_within(0.3), "the proxy never had the deleted session: nothing to send"
    finally:
        proxy.close()


def test_one_response_in_flight_changes_coalesce(cp: ControlPlane) -> None:
    proxy = Proxy(cp, "delta", node("p1", "users"))
    try:
        first = proxy.next()
        # Not ACKed yet: these three changes must wait and then arrive together.
        cp.create("a", "ka", "users")
        cp.create("b", "kb", "users")
        cp.delete("a")
        assert proxy.nothing_within(0.3), "a second response went out before the first was answered"
        proxy.ack(first)
        second = proxy.next()
        assert [r.name for r in second.resources] == ["b"]
        assert "a" not in proxy.sessions and list(second.removed_resources) == []
    finally:
        proxy.close()


def test_a_resumed_delta_stream_sends_only_what_differs(cp: ControlPlane) -> None:
    cp.create("a", "ka", "users")
    cp.create("b", "kb", "users")
    versions = {sid: str(stored.revision) for sid, stored in cp.call(cp.store.all).items()}
    # The proxy has a at its current version, b at an old one, and z that no longer exists.
    initial = {"a": versions["a"], "b": "0", "z": "1"}
    proxy = Proxy(cp, "delta", node("p1", "users"), initial=initial)
    try:
        first = proxy.next()
        assert [r.name for r in first.resources] == ["b"]
        assert list(first.removed_resources) == ["z"]
    finally:
        proxy.close()


def test_outbound_proxies_get_every_route(cp: ControlPlane) -> None:
    cp.create("a", "ka", "users", "orders")
    cp.create("b", "kb", "payments")
    proxy = Proxy(cp, "delta", node("egress", all_services=True))
    try:
        first = proxy.next()
        assert sorted(r.name for r in first.resources) == ["a", "b"]
        assert sorted(r.service for r in first.resources[0].session.routes) == ["orders", "users"]
    finally:
        proxy.close()


def test_disconnected_proxies_stay_listed(cp: ControlPlane) -> None:
    proxy = Proxy(cp, "sotw", node("gone", "users"))
    proxy.ack(proxy.next())
    wait_for(lambda: cp.proxy("gone")["acked_version"] != "")
    proxy.close()
    wait_for(lambda: not cp.proxy("gone")["connected"])
    record = cp.proxy("gone")
    assert record["disconnected_at"] is not None and record["in_sync"] is False


def test_a_stream_without_a_node_id_is_refused(cp: ControlPlane) -> None:
    proxy = Proxy(cp, "delta", config_pb2.Node(cluster="x"))
    try:
        item = proxy.responses.get(timeout=READ_TIMEOUT_S)
        assert isinstance(item, grpc.RpcError)
        assert item.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        proxy.close()
