"""gRPC through turnout: real grpcio servers (baseline and sandbox) and real grpcio clients.

All four call kinds, routing by ``baggage`` metadata, trailers and status codes passing
through, a 16 MiB message, cancellation, ``grpc-timeout`` enforced by the proxy, and the
sandbox-down cases (fallback ``error`` → UNAVAILABLE naming the session, fallback
``baseline`` → served by baseline). No .proto: a generic service with bytes messages.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.support import ProxyProcess, closed_port, free_port, inbound, running_proxy

SERVICE = "test.Echo"
BIG_BYTES = 16 * 1024 * 1024
_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)]


class GrpcUpstream:
    """A grpcio server with a generic bytes service; records metadata and cancellations."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.metadata: list[dict[str, str]] = []
        self.cancelled = threading.Event()
        self.server = grpc.server(ThreadPoolExecutor(max_workers=32), options=_OPTIONS)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        """host:port."""
        return f"127.0.0.1:{self.port}"

    def _record(self, context: Any) -> None:
        self.metadata.append(dict(context.invocation_metadata()))
        context.set_trailing_metadata((("x-served-by", self.label.decode()),))

    def _unary(self, request: bytes, context: Any) -> bytes:
        self._record(context)
        if request == b"sleep":
            context.add_callback(self.cancelled.set)
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return b"late"
        if request == b"fail":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if len(request) > 1024:
            return request  # echo large messages as they are
        return self.label + b":" + request

    def _server_stream(self, request: bytes, context: Any) -> Iterator[bytes]:
        self._record(context)
        count = int(request or b"3")
        for i in range(count):
            yield self.label + b":%d" % i
            if count > 1000:
                time.sleep(0.001)

    def _client_stream(self, requests: Iterator[bytes], context: Any) -> bytes:
        self._record(context)
        parts = list(requests)
        return self.label + b":%d:%d" % (len(parts), sum(len(p) for p in parts))

    def _bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self._record(context)
        for request in requests:
            yield self.label + b":" + request

    def stop(self) -> None:
        """Stop at once."""
        self.server.stop(0).wait(5)


@dataclass
class GrpcStack:
    """A proxy in front of a grpcio baseline and sandbox."""

    proxy: ProxyProcess
    baseline: GrpcUpstream
    sandbox: GrpcUpstream
    channel: grpc.Channel

    def call(self, kind: str, method: str) -> Any:
        """A multicallable for ``/test.Echo/<method>`` with bytes in and out."""
        return getattr(self.channel, kind)(f"/{SERVICE}/{method}")


def grpc_config(port: int, baseline: str, sandbox: str, dead: int) -> dict[str, Any]:
    """Sessions by baggage key: sandbox, dead sandbox with each fallback."""
    return {
        "listeners": [inbound("echo-in", port, "echo", baseline)],
        "limits": {"upstream_connect_timeout_s": 2.0},
        "sessions": [
            {"id": "sbx-1", "key": "sbx", "routes": [{"service": "echo", "destination": sandbox}]},
            {"id": "dead-error", "key": "dead-err", "routes": [
                {"service": "echo", "destination": f"127.0.0.1:{dead}", "fallback": "error"}]},
            {"id": "dead-fallback", "key": "dead-fb", "routes": [
                {"service": "echo", "destination": f"127.0.0.1:{dead}", "fallback": "baseline"}]},
        ],
    }


@pytest.fixture(scope="module")
def gstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcStack]:
    """One proxy and two grpcio servers for the module."""
    baseline = GrpcUpstream("baseline")
    sandbox = GrpcUpstream("sandbox")
    tmp: Path = tmp_path_factory.mktemp("grpc")
    try:
        config = grpc_config(free_port(), baseline.address, sandbox.address, closed_port())
        with running_proxy(config, tmp) as proxy:
            channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=_OPTIONS)
            try:
                yield GrpcStack(proxy, baseline, sandbox, channel)
            finally:
                channel.close()
    finally:
        baseline.stop()
        sandbox.stop()


def _session(key: str) -> tuple[tuple[str, str], ...]:
    return (("baggage", "turnout-session=" + key),)


def test_unary_routes_by_baggage_metadata(gstack: GrpcStack) -> None:
    unary = gstack.call("unary_unary", "Unary")
    assert unary(b"hi", timeout=10) == b"baseline:hi"
    reply, call = unary.with_call(b"hi", metadata=_session("sbx"), timeout=10)
    assert reply == b"sandbox:hi"
    assert ("x-served-by", "sandbox") in call.trailing_metadata()
    seen = gstack.sandbox.metadata[-1]
    assert seen["baggage"] == "turnout-session=sbx"
    assert seen["x-forwarded-for"] == "127.0.0.1"


def test_error_status_and_message_pass_through(gstack: GrpcStack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        gstack.call("unary_unary", "Unary")(b"fail", metadata=_session("sbx"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"


def test_server_streaming(gstack: GrpcStack) -> None:
    replies = list(gstack.call("unary_stream", "ServerStream")(b"50", metadata=_session("sbx"), timeout=10))
    assert replies == [b"sandbox:%d" % i for i in range(50)]


def test_client_streaming(gstack: GrpcStack) -> None:
    parts = [b"x" * 1000 for _ in range(200)]
    reply = gstack.call("stream_unary", "ClientStream")(iter(parts), timeout=10)
    assert reply == b"baseline:200:200000"


def test_bidi_streaming_interleaves(gstack: GrpcStack) -> None:
    sent: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        for i in range(20):
            sent.append(b"m%d" % i)
            yield b"m%d" % i
            ready.wait(5)  # one in flight at a time: each reply comes back before the next request
            ready.clear()

    got = []
    for reply in gstack.call("stream_stream", "Bidi")(requests(), metadata=_session("sbx"), timeout=10):
        got.append(reply)
        ready.set()
    assert got == [b"sandbox:" + m for m in sent]


def test_16_mib_message_both_ways(gstack: GrpcStack) -> None:
    payload = bytes(range(256)) * (BIG_BYTES // 256)
    assert gstack.call("unary_unary", "Unary")(payload, metadata=_session("sbx"), timeout=30) == payload


def test_many_concurrent_calls_share_the_proxy(gstack: GrpcStack) -> None:
    unary = gstack.call("unary_unary", "Unary")
    futures = [unary.future(b"c%d" % i, metadata=_session("sbx") if i % 2 else (), timeout=10) for i in range(200)]
    for i, future in enumerate(futures):
        assert future.result() == (b"sandbox:" if i % 2 else b"baseline:") + b"c%d" % i


def test_cancellation_reaches_the_upstream(gstack: GrpcStack) -> None:
    gstack.sandbox.cancelled.clear()
    future = gstack.call("unary_unary", "Unary").future(b"sleep", metadata=_session("sbx"), timeout=20)
    time.sleep(0.3)
    future.cancel()
    assert gstack.sandbox.cancelled.wait(5), "the upstream call was not cancelled"


def test_deadline_is_enforced_and_upstream_cancelled(gstack: GrpcStack) -> None:
    gstack.baseline.cancelled.clear()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        gstack.call("unary_unary", "Unary")(b"sleep", timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert gstack.baseline.cancelled.wait(5), "the upstream call was not cancelled"


def test_sandbox_down_with_fallback_error_is_unavailable_naming_the_session(gstack: GrpcStack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        gstack.call("unary_unary", "Unary").with_call(b"hi", metadata=_session("dead-err"), timeout=10)
    error = info.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "dead-error" in error.details()
    trailers = dict(error.trailing_metadata() or ())
    assert "dead-error" in trailers.get("x-turnout-error", "")


def test_sandbox_down_with_fallback_baseline_is_served_by_baseline(gstack: GrpcStack) -> None:
    assert gstack.call("unary_unary", "Unary")(b"hi", metadata=_session("dead-fb"), timeout=10) == b"baseline:hi"


def test_baseline_down_is_unavailable(tmp_path: Path) -> None:
    config = grpc_config(free_port(), f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}", closed_port())
    with running_proxy(config, tmp_path) as proxy, grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"hi", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_metrics_and_access_log_cover_grpc(tmp_path: Path) -> None:
    baseline = GrpcUpstream("baseline")
    sandbox = GrpcUpstream("sandbox")
    log_path = tmp_path / "access.log"
    try:
        config = grpc_config(free_port(), baseline.address, sandbox.address, closed_port())
        config["access_log"] = {"path": str(log_path)}
        with running_proxy(config, tmp_path) as proxy:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                assert unary(b"a", metadata=_session("sbx"), timeout=10) == b"sandbox:a"
                with pytest.raises(grpc.RpcError):
                    unary(b"b", metadata=_session("dead-err"), timeout=10)
            status, metrics = proxy.admin_get("/metrics")
            assert status == 200
            assert 'service="echo"' in metrics and 'route="sandbox"' in metrics
            deadline = time.monotonic() + 5
            lines: list[dict[str, Any]] = []
            while time.monotonic() < deadline and len(lines) < 2:
                time.sleep(0.05)
                if log_path.exists():
                    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
            assert [(e["method"], e["target"], e["session"], e["status"], e["grpc_status"]) for e in lines] == [
                ("POST", f"/{SERVICE}/Unary", "sbx-1", 200, "0"),
                ("POST", f"/{SERVICE}/Unary", "dead-error", 200, "14"),  # trailers-only UNAVAILABLE
            ]
            status, metrics = proxy.admin_get("/metrics")  # again: the log line means the call is counted
            assert 'turnout_grpc_responses_total{grpc_status="0",route="sandbox",service="echo",worker="0"} 1.0' \
                in metrics
            assert 'turnout_grpc_responses_total{grpc_status="14",route="sandbox",service="echo",worker="0"} 1.0' \
                in metrics
    finally:
        baseline.stop()
        sandbox.stop()


def test_grpc_over_tls_with_alpn_h2(tmp_path: Path) -> None:
    from tests.integration.test_http2 import make_certificate

    cert, key = make_certificate(tmp_path)
    baseline = GrpcUpstream("baseline")
    sandbox = GrpcUpstream("sandbox")
    try:
        config = grpc_config(free_port(), baseline.address, sandbox.address, closed_port())
        config["listeners"][0]["tls"] = {"cert_file": cert, "key_file": key}
        with running_proxy(config, tmp_path) as proxy:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
            with grpc.secure_channel(f"127.0.0.1:{proxy.port}", credentials) as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                assert unary(b"t", metadata=_session("sbx"), timeout=10) == b"sandbox:t"
                assert unary(b"t", timeout=10) == b"baseline:t"
    finally:
        baseline.stop()
        sandbox.stop()


def test_bidi_large_messages_both_ways_at_once(gstack: GrpcStack) -> None:
    # Requests are sent without waiting for replies: both directions fill their windows at
    # once, which must not deadlock the proxy's flow control.
    messages = [bytes([i]) * (1024 * 1024) for i in range(24)]
    replies = list(gstack.call("stream_stream", "Bidi")(iter(messages), metadata=_session("sbx"), timeout=30))
    assert replies == [b"sandbox:" + m for m in messages]


def test_grpc_timeout_values() -> None:
    from dataplane.http2.grpc import parse_grpc_timeout

    assert parse_grpc_timeout(b"300m") == pytest.approx(0.3)
    assert parse_grpc_timeout(b"2S") == 2.0
    assert parse_grpc_timeout(b"1H") == 3600.0
    assert parse_grpc_timeout(b"99999999n") == pytest.approx(0.099999999)
    for bad in (b"", b"m", b"123456789S", b"12x", b"-1S", b"1.5S"):
        assert parse_grpc_timeout(bad) is None
