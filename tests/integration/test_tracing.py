"""Tracing: a span per proxied request continuing the incoming trace, through a real proxy.

The proxy runs as a subprocess with the console exporter writing JSON lines to a file; the
spans are read after a SIGTERM, when the worker's exit has flushed its batch. The in-memory
exporter is exercised in-process on a real ``Proxy`` (its router records finished requests).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dataplane.config import OTLP_EXPORTER_MODULE, OTLP_EXPORTER_PACKAGE, parse_config, parse_config_text
from dataplane.proxy import Proxy
from dataplane.tracing import RequestTracer
from filters import ValidationError, parse_address
from tests.integration.support import closed_port, free_port, inbound, raw_exchange, running_proxy

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()
# Odd but valid spacing and properties: forwarded exactly as sent, never re-serialized.
TRACESTATE = b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
BAGGAGE = b"userId=42 ,  turnout-session=abc;ttl=5,  tenant=a%20b"


def _config(baseline: str, sandbox: str, dead: int, port: int, tracing: dict[str, Any]) -> dict[str, Any]:
    return {
        "listeners": [inbound("users-in", port, "users", baseline)],
        "limits": {"upstream_connect_timeout_s": 2.0},
        "tracing": tracing,
        "sessions": [
            {"id": "fix-1", "key": "abc", "routes": [{"service": "users", "destination": sandbox}]},
            {"id": "dead-1", "key": "dead", "routes": [
                {"service": "users", "destination": f"127.0.0.1:{dead}", "fallback": "baseline"}]},
        ],
    }


def _request(port: int, *headers: bytes) -> bytes:
    head = b"GET /api/users?token=secret HTTP/1.1\r\nhost: users\r\nconnection: close\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n"
    return raw_exchange(port, head)


def _spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_spans_continue_the_incoming_trace_and_headers_pass_untouched(tmp_path: Path, upstream_pair) -> None:
    baseline, sandbox = upstream_pair
    spans_path = tmp_path / "spans.jsonl"
    port = free_port()
    config = _config(baseline.address, sandbox.address, closed_port(), port,
                     {"exporter": "console", "path": str(spans_path), "sampling_ratio": 1.0,
                      "service_name": "turnout-test"})
    before = time.time()
    with running_proxy(config, tmp_path) as proxy:
        reply = _request(port, b"traceparent: " + TRACEPARENT, b"tracestate: " + TRACESTATE, b"baggage: " + BAGGAGE)
        assert reply.startswith(b"HTTP/1.1 200") and b"x-upstream: sandbox" in reply
        assert _request(port).startswith(b"HTTP/1.1 200")
        reply = _request(port, b"baggage: turnout-session=dead")
        assert reply.startswith(b"HTTP/1.1 200") and b"x-upstream: baseline" in reply
        assert proxy.stop() == 0
    after = time.time()
    # The sandbox got the trace context and baggage byte for byte: no traceparent of turnout's.
    raw = b"".join(sandbox.raw)
    for line in (b"traceparent: " + TRACEPARENT, b"tracestate: " + TRACESTATE, b"baggage: " + BAGGAGE):
        assert b"\r\n" + line + b"\r\n" in raw
    assert raw.count(b"traceparent") == 1
    assert not any(b"traceparent" in r for r in baseline.raw), "turnout must not add trace context"

    spans = _spans(spans_path)
    assert len(spans) == 3, spans
    keyed, plain, fallback = spans
    assert keyed["context"]["trace_id"] == "0x" + TRACE_ID
    assert keyed["parent_id"] == "0x" + PARENT_ID
    assert keyed["kind"] == "SpanKind.SERVER" and keyed["name"] == "GET"
    assert keyed["resource"]["attributes"]["service.name"] == "turnout-test"
    assert keyed["attributes"] == {
        "http.request.method": "GET", "url.path": "/api/users", "http.response.status_code": 200,
        "turnout.route": "sandbox", "turnout.service": "users", "turnout.destination": sandbox.address,
        "turnout.fallback": False, "turnout.session": "fix-1",
    }
    # No incoming trace: turnout's span starts one.
    assert plain["parent_id"] is None and plain["context"]["trace_id"] != "0x" + TRACE_ID
    assert plain["attributes"]["turnout.route"] == "baseline" and "turnout.session" not in plain["attributes"]
    assert fallback["attributes"]["turnout.fallback"] is True
    assert fallback["attributes"]["turnout.route"] == "baseline"
    assert fallback["attributes"]["turnout.session"] == "dead-1"
    assert fallback["attributes"]["turnout.destination"] == baseline.address
    for span in spans:
        start = _epoch(span["start_time"])
        end = _epoch(span["end_time"])
        assert before - 1 <= start <= end <= after + 1, span


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_sampling_ratio_zero_exports_nothing(tmp_path: Path, upstream_pair) -> None:
    baseline, sandbox = upstream_pair
    spans_path = tmp_path / "spans.jsonl"
    port = free_port()
    config = _config(baseline.address, sandbox.address, closed_port(), port,
                     {"exporter": "console", "path": str(spans_path), "sampling_ratio": 0})
    with running_proxy(config, tmp_path) as proxy:
        for _ in range(20):
            reply = _request(port, b"traceparent: " + TRACEPARENT, b"baggage: " + BAGGAGE)
            assert reply.startswith(b"HTTP/1.1 200")
        assert proxy.stop() == 0
    assert _spans(spans_path) == []
    assert len(sandbox.requests) == 20
    assert all(r.header("traceparent") == TRACEPARENT.decode() for r in sandbox.requests)


def _exchange(proxy: Proxy, headers: list[tuple[bytes, bytes]], status: int = 200) -> Any:
    # What the tracer reads from a finished Exchange (tracing.FinishedRequest), filled as the
    # router fills it. Given to the tracer itself: the compiled router takes only real Exchanges.
    return cast(Any, SimpleNamespace(
        request=SimpleNamespace(fields=headers, method=b"POST", target=b"/orders/7?x=1"), rt=proxy.runtime,
        started_at=proxy.router.clock() - 0.25, status=status, route_kind="sandbox", service="orders",
        destination=parse_address("10.1.2.3:8080"), fallback_cause="", grpc_status=b"", peer=b"10.0.0.1",
        decision=SimpleNamespace(session_id="s-1"), listener_mode="outbound", bytes_out=0,
    ))


def _proxy(tracing: dict[str, Any] | None) -> Proxy:
    spec: dict[str, Any] = {"listeners": [inbound("in", free_port(), "orders", "127.0.0.1:1")]}
    if tracing is not None:
        spec["tracing"] = tracing
    loop = asyncio.new_event_loop()
    try:
        return Proxy(parse_config(spec), "h11", loop)
    finally:
        loop.close()


def test_memory_exporter_span_times_and_parent() -> None:
    proxy = _proxy({"exporter": "memory"})
    tracer = proxy.runtime.tracer
    assert tracer is not None
    wall_before = time.time_ns()
    tracer.finished(_exchange(proxy, [(b"host", b"orders"), (b"traceparent", TRACEPARENT)], status=503),
                    proxy.router.clock())
    (span,) = tracer.finished_spans()
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID and span.parent.is_remote
    assert span.kind.name == "CLIENT"  # an outbound (node) listener makes the request for the app
    assert span.status.status_code.name == "ERROR"
    assert span.attributes is not None and span.attributes["url.path"] == "/orders/7"
    assert span.start_time is not None and span.end_time is not None
    # started 250 ms before it finished, on the wall clock
    assert abs((span.end_time - span.start_time) / 1e9 - 0.25) < 0.05
    assert abs(span.end_time - wall_before) < 1e9


def test_no_tracing_section_builds_no_tracer() -> None:
    assert _proxy(None).runtime.tracer is None


def test_reload_turns_tracing_off_and_on_and_keeps_an_unchanged_tracer() -> None:
    proxy = _proxy({"exporter": "memory"})
    first = proxy.runtime.tracer
    assert first is not None
    listeners = [inbound("in", free_port(), "orders", "127.0.0.1:1")]
    proxy.apply_config(parse_config({"listeners": listeners, "tracing": {"exporter": "memory"}}))
    assert _tracer(proxy) is first  # same settings: the same tracer, nothing queued is lost
    proxy.apply_config(parse_config({"listeners": listeners}))
    assert _tracer(proxy) is None
    proxy.apply_config(parse_config({"listeners": listeners,
                                     "tracing": {"exporter": "memory", "sampling_ratio": 0.5}}))
    second = _tracer(proxy)
    assert second is not None and second is not first and second.config.sampling_ratio == 0.5


def _tracer(proxy: Proxy) -> RequestTracer | None:
    return proxy.runtime.tracer  # read again after a reload (a plain attribute read stays narrowed)


@pytest.mark.parametrize(("tracing", "field", "reason"), [
    ("yes", "tracing", "must be a mapping"),
    ({"sampling_ratio": 1.5, "exporter": "memory"}, "tracing.sampling_ratio", "from 0 to 1"),
    ({"sampling_ratio": True, "exporter": "memory"}, "tracing.sampling_ratio", "from 0 to 1"),
    ({"exporter": "zipkin"}, "tracing.exporter", "must be otlp, console or memory"),
    ({"exporter": "console", "endpoint": "http://c:4317"}, "tracing.endpoint", "only the otlp exporter"),
    ({"exporter": "memory", "path": "/tmp/x"}, "tracing.path", "only the console exporter"),
    ({"exporter": "memory", "colour": "red"}, "tracing", "unknown field(s): colour"),
])
def test_tracing_config_errors_name_the_field(tracing: Any, field: str, reason: str) -> None:
    spec = {"listeners": [inbound("in", 15001, "orders", "127.0.0.1:1")], "tracing": tracing}
    with pytest.raises(ValidationError) as err:
        parse_config(spec)
    assert any(p.field == field and reason in p.reason for p in err.value.problems), err.value.problems


def test_otlp_is_accepted_only_with_its_package_and_otherwise_names_it() -> None:
    text = ("listeners: [{address: '127.0.0.1:15001', service: s, baseline: '127.0.0.1:1'}]\n"
            "tracing: {sampling_ratio: 0.1}\n")
    try:
        __import__(OTLP_EXPORTER_MODULE)
    except ImportError:
        with pytest.raises(ValidationError) as err:
            parse_config_text(text)
        (problem,) = err.value.problems
        assert problem.field == "tracing.exporter" and f"pip install {OTLP_EXPORTER_PACKAGE}" in problem.reason
    else:  # the optional package is installed: otlp is a valid choice
        tracing = parse_config_text(text).tracing
        assert tracing is not None and tracing.exporter == "otlp"
