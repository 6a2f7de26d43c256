"""A control plane that misbehaves: oversized and over-limit pushes, invalid sessions.

The server here is a scripted ``SessionDiscovery`` service (real gRPC on a real socket)
that sends what the real control plane never would; the proxy is the real one.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from tests.integration.cp_support import eventually
from tests.integration.support import ProxyProcess, RecordingUpstream, running_proxy
from tests.integration.test_config_channel import proxy_config, served_by
from turnout.v1 import config_pb2, config_pb2_grpc

Script = Callable[[int], config_pb2.DeltaDiscoveryResponse]


class ScriptedControlPlane(config_pb2_grpc.SessionDiscoveryServicer):
    """Answers every delta stream with the responses a script makes, and records the answers."""

    def __init__(self, script: list[Script]) -> None:
        self.script = script
        self.answers: list[config_pb2.DeltaDiscoveryRequest] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=[("grpc.max_send_message_length", 256 << 20)])
        config_pb2_grpc.add_SessionDiscoveryServicer_to_server(self, self.server)  # type: ignore[no-untyped-call]
        port = int(self.server.add_insecure_port("127.0.0.1:0"))
        await self.server.start()
        return port

    async def DeltaSessions(self, request_iterator: Any, context: Any) -> None:
        """Send each scripted response, wait for its answer, then hold the stream open."""
        await context.read()
        for i, make in enumerate(self.script):
            await context.write(make(i))
            answer = await context.read()
            if answer is grpc.aio.EOF:
                return
            self.answers.append(answer)
        await asyncio.sleep(3600)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def good(destination: str) -> Script:
    def make(i: int) -> config_pb2.DeltaDiscoveryResponse:
        response = config_pb2.DeltaDiscoveryResponse(system_version_info=str(i + 1), nonce=f"n{i}")
        session = config_pb2.Session(id="good", key="k-good", created_at=1.0)
        session.routes.add(service="users", destination=destination, mode="steal", fallback="baseline")
        response.resources.add(name="good", version="1", session=session)
        return response
    return make


def too_many(count: int) -> Script:
    def make(i: int) -> config_pb2.DeltaDiscoveryResponse:
        response = config_pb2.DeltaDiscoveryResponse(system_version_info=str(i + 1), nonce=f"n{i}")
        for n in range(count):
            session = config_pb2.Session(id=f"s{n}", key=f"k{n}")
            session.routes.add(service="users", destination="10.0.0.1:80")
            response.resources.add(name=f"s{n}", version="1", session=session)
        return response
    return make


def invalid(i: int) -> config_pb2.DeltaDiscoveryResponse:
    response = config_pb2.DeltaDiscoveryResponse(system_version_info=str(i + 1), nonce=f"n{i}")
    session = config_pb2.Session(id="bad", key="k-bad")
    session.routes.add(service="users", destination="nohost", mode="sideways", match_json='{"regex": "("}')
    response.resources.add(name="bad", version="2", session=session)
    fine = config_pb2.Session(id="fine", key="k-fine")
    fine.routes.add(service="users", destination="10.0.0.1:80")
    response.resources.add(name="fine", version="2", session=fine)
    return response


def huge(i: int) -> config_pb2.DeltaDiscoveryResponse:
    response = config_pb2.DeltaDiscoveryResponse(system_version_info=str(i + 1), nonce=f"n{i}")
    session = config_pb2.Session(id="huge", key="k-huge", owner="x" * (48 << 20))  # 48 MiB, over the 32 MiB cap
    session.routes.add(service="users", destination="10.0.0.1:80")
    response.resources.add(name="huge", version="3", session=session)
    return response


def rss_mb(proxy: ProxyProcess) -> float:
    """Resident memory of the proxy's supervisor (which holds the config stream)."""
    for line in Path(f"/proc/{proxy.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def run_script(tmp: Path, upstream_pair: tuple[RecordingUpstream, RecordingUpstream],
               script: list[Script]) -> tuple[ScriptedControlPlane, Any]:
    cp = ScriptedControlPlane(script)
    config = proxy_config(f"127.0.0.1:{cp.port}", "victim", upstream_pair[0].address, tmp)
    return cp, running_proxy(config, tmp)


def test_an_invalid_push_is_nacked_with_every_problem_and_nothing_of_it_applies(
        tmp_path: Path, upstream_pair: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    cp, proxy_cm = run_script(tmp_path, upstream_pair, [good(upstream_pair[1].address), invalid])
    try:
        with proxy_cm as proxy:
            eventually(lambda: len(cp.answers) == 2)
            ack, nack = cp.answers
            assert not ack.error_detail.message
            assert nack.error_detail.code == 3
            for part in ("destination", "mode", "regex"):
                assert part in nack.error_detail.message
            assert served_by(proxy, "k-good") == "sandbox"  # the first push, whole
            assert served_by(proxy, "k-fine") == "baseline"  # the valid half of the refused push: not applied
            dump = json.loads(proxy.admin_get("/config_dump")[1])
            assert dump["control_plane"]["version"] == "1" and dump["control_plane"]["nacks"] == 1
    finally:
        cp.stop()


def test_too_many_sessions_are_refused_without_parsing_them(
        tmp_path: Path, upstream_pair: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    cp, proxy_cm = run_script(tmp_path, upstream_pair, [good(upstream_pair[1].address), too_many(100_001)])
    try:
        with proxy_cm as proxy:
            eventually(lambda: len(cp.answers) == 2, timeout_s=30)
            assert "over the limit of 100000" in cp.answers[1].error_detail.message
            assert served_by(proxy, "k-good") == "sandbox"
    finally:
        cp.stop()


def test_an_oversized_push_is_refused_with_bounded_memory(
        tmp_path: Path, upstream_pair: tuple[RecordingUpstream, RecordingUpstream]) -> None:
    cp, proxy_cm = run_script(tmp_path, upstream_pair, [good(upstream_pair[1].address), huge])
    try:
        with proxy_cm as proxy:
            eventually(lambda: served_by(proxy, "k-good") == "sandbox")
            before = rss_mb(proxy)

            def refused() -> str:
                error = json.loads(proxy.admin_get("/config_dump")[1])["control_plane"]["last_error"]
                return str(error) if "RESOURCE_EXHAUSTED" in error else ""

            assert "limits.control_plane_max_message_bytes" in eventually(refused, timeout_s=30)
            # The 48 MiB message was refused before it was parsed: memory did not grow by it.
            assert rss_mb(proxy) < before + 40
            assert served_by(proxy, "k-good") == "sandbox"
            assert proxy.admin_get("/ready")[0] == 200  # the stream keeps failing; the proxy keeps serving
    finally:
        cp.stop()
