"""Mirror sessions for HTTP/2 and gRPC requests: the client's answer comes from baseline, a
complete copy (body and trailers) goes to the sandbox over HTTP/2, or over HTTP/1.1 when the
route says ``upstream_protocol: http1``; a request the client breaks off is never copied.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h2.errors
import pytest

from tests.integration.cp_support import eventually
from tests.integration.support import ProxyProcess, RecordingUpstream, free_port, inbound, running_proxy
from tests.integration.test_http2 import H2Client, H2Upstream

GRPC = [("content-type", "application/grpc"), ("te", "trailers")]


@dataclass
class Stack:
    """Baseline and sandbox on HTTP/2, a second sandbox on HTTP/1.1."""

    proxy: ProxyProcess
    baseline: H2Upstream
    sandbox: H2Upstream
    sandbox_h1: RecordingUpstream


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One proxy: key ``m2`` mirrors to the HTTP/2 sandbox, ``m1`` to the HTTP/1.1 one."""
    baseline, sandbox, sandbox_h1 = H2Upstream("baseline"), H2Upstream("sandbox"), RecordingUpstream("sandbox-h1")
    cfg: dict[str, Any] = {
        "routing": {"debug_headers": True},
        "listeners": [{**inbound("users-in", free_port(), "users", baseline.address), "upstream_protocol": "http2"}],
        "limits": {"mirror_max_body_bytes": 4096},
        "sessions": [
            {"id": "mirror-h2", "key": "m2",
             "routes": [{"service": "users", "destination": sandbox.address, "mode": "mirror"}]},
            {"id": "mirror-h1", "key": "m1",
             "routes": [{"service": "users", "destination": sandbox_h1.address, "mode": "mirror",
                         "upstream_protocol": "http1"}]},
        ],
    }
    try:
        with running_proxy(cfg, tmp_path_factory.mktemp("h2mirror")) as proxy:
            yield Stack(proxy, baseline, sandbox, sandbox_h1)
    finally:
        baseline.stop()
        sandbox.stop()
        sandbox_h1.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[H2Client]:
    """A raw HTTP/2 client connected to the proxy."""
    c = H2Client(stack.proxy.port)
    try:
        yield c
    finally:
        c.close()


def _mirror_count(stack: Stack, result: str) -> float:
    status, text = stack.proxy.admin_get("/metrics")
    assert status == 200
    total = 0.0
    for m in re.finditer(r'^turnout_mirror_requests_total\{([^}]*)\} (\S+)$', text, re.M):
        if f'result="{result}"' in m.group(1):
            total += float(m.group(2))
    return total


def test_h2_request_with_body_and_trailers_is_copied_over_h2(stack: Stack, client: H2Client) -> None:
    sent_before = _mirror_count(stack, "sent")
    conn = client.conn
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                               (":path", "/copy-me"), ("baggage", "turnout-session=m2"), ("te", "trailers")])
    conn.send_data(stream, b"payload-1;")
    conn.send_data(stream, b"payload-2")
    conn.send_headers(stream, [("x-checksum", "c0ffee")], end_stream=True)
    client.send()
    headers, _ = client.response(stream)
    assert headers[b":status"] == b"200" and headers[b"x-turnout-route"] == b"mirror-h2"
    assert stack.baseline.requests[-1].header(b":path") == b"/copy-me"  # baseline answered
    copy = eventually(lambda: next((r for r in stack.sandbox.requests if r.header(b":path") == b"/copy-me"), None))
    assert copy.header(b"x-turnout-mirror") == b"mirror-h2" and copy.header(b":method") == b"POST"
    eventually(lambda: copy.body == b"payload-1;payload-2" and dict(copy.trailers) == {b"x-checksum": b"c0ffee"})
    eventually(lambda: _mirror_count(stack, "sent") == sent_before + 1)


def test_grpc_call_is_copied_over_h2_with_its_trailers(stack: Stack, client: H2Client) -> None:
    message = b"\x00\x00\x00\x00\x03abc"
    stream = client.request("/grpc", method="POST", body=message, extra=[*GRPC, ("baggage", "turnout-session=m2")])
    headers, _ = client.response(stream)
    assert headers[b":status"] == b"200" and headers[b"grpc-status"] == b"0"
    copy = eventually(lambda: next((r for r in stack.sandbox.requests if r.header(b":path") == b"/grpc"
                                    and r.header(b"x-turnout-mirror")), None))
    eventually(lambda: copy.body == message)
    assert copy.header(b"content-type") == b"application/grpc"


def test_route_with_http1_copies_an_h2_request_as_http1(stack: Stack, client: H2Client) -> None:
    stream = client.request("/to-h1", method="PUT", body=b"abc",
                            extra=[("baggage", "turnout-session=m1"), ("cookie", "a=1"), ("cookie", "b=2")])
    headers, _ = client.response(stream)
    assert headers[b":status"] == b"200" and headers[b"x-turnout-route"] == b"mirror-h1"
    copy = eventually(lambda: next((r for r in stack.sandbox_h1.requests if r.target == "/to-h1"), None))
    assert copy.method == "PUT" and copy.body == b"abc" and copy.http_version == "1.1"
    assert copy.header("x-turnout-mirror") == "mirror-h1" and copy.header("cookie") == "a=1; b=2"
    assert copy.header("content-length") == "3" and copy.header("host") == "users"


def test_a_request_the_client_breaks_off_is_not_copied(stack: Stack, client: H2Client) -> None:
    conn = client.conn
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                               (":path", "/broken-off"), ("baggage", "turnout-session=m2")])
    conn.send_data(stream, b"half")
    client.send()
    time.sleep(0.1)
    conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    client.send()
    # A later, complete request is copied: the earlier one would have arrived before it.
    headers, _ = client.response(client.request("/after", extra=[("baggage", "turnout-session=m2")]))
    assert headers[b":status"] == b"200"
    eventually(lambda: any(r.header(b":path") == b"/after" for r in stack.sandbox.requests))
    assert not any(r.header(b":path") == b"/broken-off" for r in stack.sandbox.requests)


def test_a_copy_over_the_body_cap_is_dropped_and_counted(stack: Stack, client: H2Client) -> None:
    dropped_before = _mirror_count(stack, "dropped_too_large")
    stream = client.request("/too-big", method="POST", body=b"z" * 8000, extra=[("baggage", "turnout-session=m2")])
    headers, _ = client.response(stream)
    assert headers[b":status"] == b"200"  # the client is served whatever happens to the copy
    eventually(lambda: _mirror_count(stack, "dropped_too_large") == dropped_before + 1)
    assert not any(r.header(b":path") == b"/too-big" for r in stack.sandbox.requests)
