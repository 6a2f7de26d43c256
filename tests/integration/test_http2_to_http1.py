"""HTTP/2 clients in front of HTTP/1.1 upstreams (``upstream_protocol: http1``): the
translation both ways, routing and fallback, flow control with a slow reader on either
side, and gRPC staying HTTP/2 end to end whatever the route says.

Real pieces only: the proxy as a subprocess, HTTP/1.1 upstreams on sockets (h11), HTTP/2
clients on sockets (h2) and curl ``--http2-prior-knowledge``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.events
import pytest

from tests.integration.support import (
    ProxyProcess,
    Received,
    RecordingUpstream,
    Reply,
    closed_port,
    free_port,
    inbound,
    running_proxy,
)
from tests.integration.test_http2 import H2Client, H2Upstream
from tests.integration.test_streaming import rss_bytes, worker_pid

MIB = 1 << 20


def _handler(label: str) -> Any:
    """Replies by path: ``/chunked`` chunked with trailers, ``/hop`` with hop-by-hop fields,
    ``/big?<n>`` n bytes, ``/status/<n>`` that status; anything else the JSON echo."""

    def handle(req: Received) -> Reply | bytes | None:
        if req.target == "/chunked":
            return (b"HTTP/1.1 200 OK\r\nx-upstream: " + label.encode() + b"\r\ntransfer-encoding: chunked\r\n"
                    b"trailer: x-checksum\r\nconnection: close\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n")
        if req.target == "/hop":
            return (200, [("connection", "x-secret, keep-alive"), ("x-secret", "1"), ("keep-alive", "timeout=5"),
                          ("x-kept", "yes")], b"ok")
        if req.target.startswith("/big?"):
            return (200, [], b"x" * int(req.target[5:]))
        if req.target.startswith("/status/"):
            return (int(req.target[8:]), [], b"")
        return RecordingUpstream(label).default_reply(req)

    return handle


@dataclass
class Stack:
    """A proxy whose listener and session route use HTTP/1.1 upstreams."""

    proxy: ProxyProcess
    baseline: RecordingUpstream
    sandbox: RecordingUpstream

    @property
    def port(self) -> int:
        """The listener."""
        return self.proxy.port


def config(port: int, baseline: str, sandbox: str, *, dead: int | None = None) -> dict[str, Any]:
    """Listener users (http1) and sessions: ``sbx`` → sandbox (http1), ``gone`` → a closed port
    with fallback baseline, ``hard`` → a closed port with fallback error."""
    listener = {**inbound("users-in", port, "users", baseline), "upstream_protocol": "http1"}
    dead_address = f"127.0.0.1:{dead or closed_port()}"
    return {
        "routing": {"debug_headers": True},
        "listeners": [listener],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 5.0},
        "sessions": [
            {"id": "sbx-1", "key": "sbx",
             "routes": [{"service": "users", "destination": sandbox, "upstream_protocol": "http1"}]},
            {"id": "gone-1", "key": "gone",
             "routes": [{"service": "users", "destination": dead_address, "upstream_protocol": "http1"}]},
            {"id": "hard-1", "key": "hard",
             "routes": [{"service": "users", "destination": dead_address, "upstream_protocol": "http1",
                         "fallback": "error"}]},
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One proxy and two HTTP/1.1 upstreams for the module."""
    baseline = RecordingUpstream("baseline", _handler("baseline"))
    sandbox = RecordingUpstream("sandbox", _handler("sandbox"))
    try:
        with running_proxy(config(free_port(), baseline.address, sandbox.address),
                           tmp_path_factory.mktemp("h2h1")) as proxy:
            yield Stack(proxy, baseline, sandbox)
    finally:
        baseline.stop()
        sandbox.stop()


@pytest.fixture
def client(stack: Stack) -> Iterator[H2Client]:
    """A raw HTTP/2 client connected to the proxy."""
    c = H2Client(stack.port)
    try:
        yield c
    finally:
        c.close()


def _echo(body: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(body)
    return data


# ---------------------------------------------------------------------- request translation


def test_curl_http2_reaches_http1_baseline_and_sandbox(stack: Stack) -> None:
    for key, label in ((None, "baseline"), ("sbx", "sandbox")):
        argv = ["curl", "-s", "--http2-prior-knowledge", "-D", "-", f"http://127.0.0.1:{stack.port}/items?x=1"]
        if key:
            argv += ["-H", f"baggage: turnout-session={key}"]
        out = subprocess.run(argv, capture_output=True, timeout=10, check=True).stdout.decode()
        head, _, body = out.partition("\r\n\r\n")
        assert head.startswith("HTTP/2 200"), head
        assert f"x-upstream: {label}" in head
        seen = _echo(body.encode())
        assert seen["upstream"] == label and seen["target"] == "/items?x=1"
    seen_req = stack.sandbox.last()
    assert seen_req.http_version == "1.1"
    assert seen_req.header("host") == f"127.0.0.1:{stack.port}"
    assert "turnout-session=sbx" in (seen_req.header("baggage") or "")


def test_head_fields_are_translated(stack: Stack, client: H2Client) -> None:
    stream = client.request("/fields", authority="users.example", extra=[
        ("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers"), ("x-custom", "v"),
        ("baggage", "turnout-session=sbx")])
    headers, body = client.response(stream)
    assert headers[b":status"] == b"200" and headers[b"x-turnout-route"] == b"sbx-1"
    seen = stack.sandbox.last()
    assert seen.method == "GET" and seen.target == "/fields"
    assert seen.header("host") == "users.example"
    assert seen.header("cookie") == "a=1; b=2"  # RFC 9113 §8.2.3: one field for HTTP/1.1
    assert seen.header("te") is None and seen.header("x-custom") == "v"
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("content-length") is None and seen.header("transfer-encoding") is None  # a bodiless GET
    names = seen.header_names()
    assert not any(n.startswith(":") for n in names) and names.count("host") == 1
    assert _echo(body)["upstream"] == "sandbox"


def test_request_body_with_content_length(stack: Stack, client: H2Client) -> None:
    payload = b"p" * 16_000  # one DATA frame
    stream = client.request("/upload", method="POST", body=payload, extra=[("content-length", str(len(payload)))])
    headers, body = client.response(stream)
    assert headers[b":status"] == b"200"
    seen = stack.baseline.last()
    assert seen.header("content-length") == str(len(payload)) and seen.body == payload
    assert _echo(body)["body_bytes"] == len(payload)


def test_request_body_without_length_is_chunked_with_trailers(stack: Stack, client: H2Client) -> None:
    conn = client.conn
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                               (":path", "/stream"), ("te", "trailers")])
    client.send()
    for part in (b"first;", b"second;", b"third"):
        conn.send_data(stream, part)
        client.send()
        time.sleep(0.05)  # separate DATA frames, after the upstream request has started
    conn.send_headers(stream, [("x-digest", "d1")], end_stream=True)
    client.send()
    headers, _ = client.response(stream)
    assert headers[b":status"] == b"200"
    seen = stack.baseline.last()
    assert seen.header("transfer-encoding") == "chunked" and seen.header("content-length") is None
    assert seen.body == b"first;second;third"
    raw = b"".join(stack.baseline.raw)
    assert b"\r\nx-digest: d1\r\n" in raw  # the trailers travel in the last chunk


def test_post_ended_with_its_head_sends_content_length_zero(stack: Stack, client: H2Client) -> None:
    headers, _ = client.response(client.request("/empty", method="POST"))
    assert headers[b":status"] == b"200"
    seen = stack.baseline.last()
    assert seen.method == "POST" and seen.header("content-length") == "0" and seen.body == b""


# ---------------------------------------------------------------------- response translation


def test_chunked_response_trailers_become_http2_trailers(stack: Stack, client: H2Client) -> None:
    stream = client.request("/chunked")
    client.pump(lambda: client.ended(stream))
    trailers = [e for e in client.events if isinstance(e, h2.events.TrailersReceived) and e.stream_id == stream]
    heads = [e for e in client.events if isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream]
    body = b"".join(e.data for e in client.events if isinstance(e, h2.events.DataReceived) and e.stream_id == stream)
    assert body == b"hello world"
    assert dict(trailers[0].headers) == {b"x-checksum": b"abc123"}
    head = dict(heads[0].headers)
    assert head[b":status"] == b"200" and head[b"x-upstream"] == b"baseline"
    assert b"transfer-encoding" not in head and b"connection" not in head


def test_hop_by_hop_fields_do_not_reach_the_http2_client(stack: Stack, client: H2Client) -> None:
    headers, body = client.response(client.request("/hop"))
    assert body == b"ok" and headers[b"x-kept"] == b"yes" and headers[b"content-length"] == b"2"
    for name in (b"connection", b"keep-alive", b"x-secret"):
        assert name not in headers


@pytest.mark.parametrize("status", [204, 304, 404, 503])
def test_statuses_pass_through(stack: Stack, client: H2Client, status: int) -> None:
    headers, body = client.response(client.request(f"/status/{status}"))
    assert headers[b":status"] == str(status).encode() and body == b""


def test_head_request_gets_the_length_but_no_body(stack: Stack, client: H2Client) -> None:
    headers, body = client.response(client.request("/big?5000", method="HEAD"))
    assert headers[b":status"] == b"200" and headers[b"content-length"] == b"5000" and body == b""


def test_large_response_streams_through_and_the_connection_is_reused(stack: Stack, client: H2Client) -> None:
    before = stack.baseline.connections
    for _ in range(3):
        headers, body = client.response(client.request(f"/big?{8 * MIB}"), timeout_s=30)
        assert headers[b":status"] == b"200" and len(body) == 8 * MIB
    assert stack.baseline.connections - before <= 1  # one pooled HTTP/1.1 connection carried all three


def test_concurrent_streams_each_get_their_own_answer(stack: Stack, client: H2Client) -> None:
    streams = {client.request(f"/multi/{i}"): i for i in range(20)}
    for stream, i in streams.items():
        headers, body = client.response(stream)
        assert headers[b":status"] == b"200" and _echo(body)["target"] == f"/multi/{i}"


# ---------------------------------------------------------------------- flow control


def test_a_client_that_does_not_read_bounds_the_proxy_memory(stack: Stack) -> None:
    pid = worker_pid(stack.proxy)
    before = rss_bytes(pid)
    c = H2Client(stack.port)
    try:
        stream = c.request(f"/big?{200 * MIB}")
        got = 0
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                c.sock.settimeout(0.2)
                for event in c.conn.receive_data(c.sock.recv(1 << 16)):
                    if isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                        got += len(event.data)  # never acknowledged: the window stays shut
        assert got <= 65535
        assert rss_bytes(pid) - before < 20 * MIB, "the proxy read the upstream's response into memory"
        other = H2Client(stack.port)  # the proxy still serves everyone else
        try:
            headers, _ = other.response(other.request("/still-there"))
            assert headers[b":status"] == b"200"
        finally:
            other.close()
    finally:
        c.close()


def test_a_big_request_body_goes_through_under_flow_control(stack: Stack, client: H2Client) -> None:
    payload = b"u" * (6 * MIB)
    conn = client.conn
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "PUT"), (":scheme", "http"), (":authority", "users"), (":path", "/put")])
    client.send()
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(payload) and time.monotonic() < deadline:
        window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size, len(payload) - sent)
        if window <= 0:
            client.pump(lambda: False, timeout_s=0.05)  # read WINDOW_UPDATEs
            continue
        conn.send_data(stream, payload[sent:sent + window])
        sent += window
        client.send()
    conn.end_stream(stream)
    client.send()
    headers, body = client.response(stream, timeout_s=30)
    assert headers[b":status"] == b"200" and _echo(body)["body_bytes"] == len(payload)
    assert stack.baseline.last().header("transfer-encoding") == "chunked"


# ---------------------------------------------------------------------- failures


def test_sandbox_down_falls_back_to_http1_baseline(stack: Stack, client: H2Client) -> None:
    headers, body = client.response(client.request("/fb", extra=[("baggage", "turnout-session=gone")]))
    assert headers[b":status"] == b"200" and _echo(body)["upstream"] == "baseline"


def test_sandbox_down_with_fallback_error_names_the_session(stack: Stack, client: H2Client) -> None:
    headers, body = client.response(client.request("/fb", extra=[("baggage", "turnout-session=hard")]))
    assert headers[b":status"] == b"503"
    assert b"session=hard-1" in headers[b"x-turnout-error"] and b"connect" in body


def test_a_content_length_lie_is_never_downgraded_into_a_second_http1_request(stack: Stack, client: H2Client) -> None:
    # CL != DATA total is a stream error, never an HTTP/1.1 request smuggled upstream.
    smuggled = b"hello" + b"GET /smuggled HTTP/1.1\r\nhost: users\r\n\r\n"
    conn = client.conn
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                               (":path", "/lie"), ("content-length", "5")])
    conn.send_data(stream, smuggled, end_stream=True)
    client.send()
    client.pump(lambda: client.ended(stream))
    assert client.reset_code(stream) == 1  # PROTOCOL_ERROR
    short = conn.get_next_available_stream_id()  # and fewer bytes than declared
    conn.send_headers(short, [(":method", "POST"), (":scheme", "http"), (":authority", "users"),
                              (":path", "/short"), ("content-length", "50")])
    conn.send_data(short, b"only-ten!!", end_stream=True)
    client.send()
    client.pump(lambda: client.ended(short))
    assert client.reset_code(short) == 1
    after, _ = client.response(client.request("/after-lies"))  # the connection carries on
    assert after[b":status"] == b"200"
    targets = [r.target for r in stack.baseline.requests]
    assert "/smuggled" not in targets and "/lie" not in targets and "/short" not in targets
    assert not any(b"/smuggled" in raw for raw in stack.baseline.raw)


def test_upstream_closing_mid_response_resets_the_client_stream(tmp_path: Path) -> None:
    def cut(req: Received) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nonly-part"

    upstream = RecordingUpstream("cut", cut)
    try:
        with running_proxy(config(free_port(), upstream.address, upstream.address), tmp_path) as proxy:
            c = H2Client(proxy.port)
            try:
                stream = c.request("/cut")
                c.pump(lambda: c.ended(stream))
                assert c.reset_code(stream) is not None  # never a well-formed short response
                other = c.request("/again")  # the connection itself is fine
                c.pump(lambda: c.ended(other))
                assert c.reset_code(other) is not None
            finally:
                c.close()
    finally:
        upstream.stop()


def test_bad_upstream_response_is_a_502(tmp_path: Path) -> None:
    two_lengths = b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
    upstream = RecordingUpstream("bad", lambda req: two_lengths)
    try:
        with running_proxy(config(free_port(), upstream.address, upstream.address), tmp_path) as proxy:
            c = H2Client(proxy.port)
            try:
                headers, _ = c.response(c.request("/bad"))
                assert headers[b":status"] == b"502" and headers[b"x-turnout-error"].startswith(b"upstream_bad")
            finally:
                c.close()
    finally:
        upstream.stop()


# ---------------------------------------------------------------------- gRPC and auto


def test_grpc_goes_http2_even_when_the_route_says_http1(tmp_path: Path) -> None:
    baseline = H2Upstream("baseline")
    try:
        cfg = config(free_port(), baseline.address, baseline.address)
        with running_proxy(cfg, tmp_path) as proxy:
            c = H2Client(proxy.port)
            try:
                grpc = c.request("/grpc", method="POST", body=b"\x00\x00\x00\x00\x00",
                                 extra=[("content-type", "application/grpc"), ("te", "trailers")])
                headers, _ = c.response(grpc)
                assert headers[b":status"] == b"200" and headers.get(b"grpc-status") == b"0"
                assert baseline.requests and baseline.requests[-1].header(b"content-type") == b"application/grpc"
                # A plain request on the same route is sent as HTTP/1.1: an HTTP/2-only server
                # cannot answer it, which shows the translation applies to it.
                plain, _ = c.response(c.request("/plain"))
                assert plain[b":status"] == b"502"
            finally:
                c.close()
    finally:
        baseline.stop()


def test_auto_keeps_http2_upstream_and_explain_shows_the_protocol(tmp_path: Path) -> None:
    baseline = H2Upstream("baseline")
    sandbox = RecordingUpstream("sandbox")
    try:
        cfg = config(free_port(), baseline.address, sandbox.address)
        cfg["listeners"][0]["upstream_protocol"] = "auto"  # the client's protocol: HTTP/2 clients go HTTP/2
        with running_proxy(cfg, tmp_path) as proxy:
            c = H2Client(proxy.port)
            try:
                headers, _ = c.response(c.request("/auto"))
                assert headers[b":status"] == b"200" and baseline.requests[-1].header(b":path") == b"/auto"
                routed, body = c.response(c.request("/routed", extra=[("baggage", "turnout-session=sbx")]))
                assert routed[b":status"] == b"200" and _echo(body)["upstream"] == "sandbox"
            finally:
                c.close()
            status, text = proxy.admin_get("/explain?service=users&header=baggage:turnout-session%3Dsbx")
            assert status == 200, text
            assert json.loads(text)["decision"]["upstream_protocol"] == "http1"
    finally:
        baseline.stop()
        sandbox.stop()
