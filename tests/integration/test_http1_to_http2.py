"""HTTP/1.1 clients in front of HTTP/2 upstreams (``upstream_protocol: http2``): the
translation both ways, routing and fallback, multiplexing of many client connections onto
one upstream connection, flow control with a slow side, resets and GOAWAY retries.

Real pieces only: the proxy as a subprocess, HTTP/2 upstreams on sockets (h2), HTTP/1.1
clients (httpx, curl, raw sockets).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.support import (
    closed_port,
    free_port,
    inbound,
    parse_responses,
    raw_exchange,
    running_proxy,
)
from tests.integration.test_http2 import H2Stack, H2Upstream
from tests.integration.test_streaming import rss_bytes, worker_pid

MIB = 1 << 20


def config(port: int, baseline: str, sandbox: str) -> dict[str, Any]:
    """Listener users (http2); sessions ``sbx`` → sandbox, ``gone`` → a closed port (fallback
    baseline), ``hard`` → a closed port (fallback error); all routes http2."""
    dead = f"127.0.0.1:{closed_port()}"

    def route(destination: str, **extra: str) -> dict[str, Any]:
        return {"service": "users", "destination": destination, "upstream_protocol": "http2", **extra}

    return {
        "routing": {"debug_headers": True},
        "listeners": [{**inbound("users-in", port, "users", baseline), "upstream_protocol": "http2"}],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 3.0},
        "sessions": [
            {"id": "sbx-1", "key": "sbx", "routes": [route(sandbox)]},
            {"id": "gone-1", "key": "gone", "routes": [route(dead)]},
            {"id": "hard-1", "key": "hard", "routes": [route(dead, fallback="error")]},
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Stack]:
    """One proxy and two HTTP/2 upstreams for the module."""
    baseline, sandbox = H2Upstream("baseline"), H2Upstream("sandbox")
    try:
        with running_proxy(config(free_port(), baseline.address, sandbox.address),
                           tmp_path_factory.mktemp("h1h2")) as proxy:
            yield H2Stack(proxy, baseline, sandbox)
    finally:
        baseline.stop()
        sandbox.stop()


def _seen_headers(body: bytes) -> dict[str, str]:
    data: dict[str, Any] = json.loads(body)
    return {name: value for name, value in data["headers"]}


# ---------------------------------------------------------------------- translation


def test_get_reaches_http2_baseline_and_sandbox(stack: H2Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        r = client.get("/items?x=1", headers={"x-custom": "v", "cookie": "a=1; b=2"})
        assert r.status_code == 200 and r.headers["x-upstream"] == "baseline"
        assert r.headers["transfer-encoding"] == "chunked"  # HTTP/2 gave no length: chunked for HTTP/1.1
        seen = _seen_headers(r.content)
        assert seen[":method"] == "GET" and seen[":path"] == "/items?x=1" and seen[":scheme"] == "http"
        assert seen[":authority"] == f"127.0.0.1:{stack.proxy.port}"
        assert seen["x-custom"] == "v" and seen["cookie"] == "a=1; b=2" and seen["x-forwarded-for"] == "127.0.0.1"
        assert "host" not in seen and "connection" not in seen and "transfer-encoding" not in seen
        routed = client.get("/items", headers={"baggage": "turnout-session=sbx"})
        assert routed.headers["x-upstream"] == "sandbox" and routed.headers["x-turnout-route"] == "sbx-1"


def test_curl_post_with_length_and_chunked_body_with_trailers(stack: H2Stack) -> None:
    out = subprocess.run(["curl", "-s", "--data-binary", "hello-h2", f"{stack.url}/post"],
                         capture_output=True, timeout=10, check=True).stdout
    assert json.loads(out)["body_bytes"] == 8
    seen = stack.baseline.requests[-1]
    assert seen.body == b"hello-h2" and seen.header(b"content-length") == b"8"
    # Chunked with a trailer, on a raw socket.
    raw = (b"POST /chunked HTTP/1.1\r\nhost: users\r\ntransfer-encoding: chunked\r\nte: trailers\r\n"
           b"connection: close\r\n\r\n5\r\nfirst\r\n6\r\nsecond\r\n0\r\nx-digest: d1\r\n\r\n")
    responses = parse_responses(raw_exchange(stack.proxy.port, raw))
    assert responses[0].status == 200
    seen = stack.baseline.requests[-1]
    assert seen.header(b":path") == b"/chunked" and seen.body == b"firstsecond"
    assert seen.trailers == [(b"x-digest", b"d1")] and seen.header(b"transfer-encoding") is None


def test_expect_100_continue_is_answered_at_once(stack: H2Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=5) as sock:
        sock.sendall(b"POST /expect HTTP/1.1\r\nhost: users\r\ncontent-length: 5\r\nexpect: 100-continue\r\n"
                     b"connection: close\r\n\r\n")
        sock.settimeout(0.5)  # curl would give up waiting after 1 s and send anyway
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        sock.settimeout(5)
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert rest.startswith(b"HTTP/1.1 200") and b'"body_bytes": 5' in rest
    seen = stack.baseline.requests[-1]
    assert seen.body == b"hello" and seen.header(b"expect") is None


def test_http2_trailers_reach_the_http1_client_in_the_last_chunk(stack: H2Stack) -> None:
    raw = raw_exchange(stack.proxy.port, b"GET /grpc HTTP/1.1\r\nhost: users\r\nconnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert body.endswith(b"0\r\ngrpc-status: 0\r\nx-trailer: baseline\r\n\r\n"), body


def test_head_and_content_length_responses(stack: H2Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        r = client.get(f"/big?{3 * MIB}")
        assert r.status_code == 200 and len(r.content) == 3 * MIB and r.headers["content-length"] == str(3 * MIB)
        assert "transfer-encoding" not in r.headers


def test_many_client_connections_share_one_upstream_connection(stack: H2Stack) -> None:
    before = stack.baseline.connections
    errors: list[str] = []

    def worker(n: int) -> None:
        try:
            with httpx.Client(base_url=stack.url, timeout=10) as client:
                for i in range(10):
                    r = client.get(f"/m/{n}/{i}")
                    if r.status_code != 200 or _seen_headers(r.content)[":path"] != f"/m/{n}/{i}":
                        errors.append(f"{n}/{i}: {r.status_code}")
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert stack.baseline.connections - before <= 1  # multiplexed: at most one new connection


# ---------------------------------------------------------------------- flow control


def test_a_client_that_does_not_read_bounds_the_proxy_memory(stack: H2Stack) -> None:
    pid = worker_pid(stack.proxy)
    before = rss_bytes(pid)
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /big?{200 * MIB} HTTP/1.1\r\nhost: users\r\n\r\n".encode())
        time.sleep(3.0)  # never read: the proxy must stop acknowledging the upstream's DATA
        assert rss_bytes(pid) - before < 20 * MIB, "the proxy read the upstream's response into memory"
        with httpx.Client(base_url=stack.url, timeout=10) as client:
            assert client.get("/still-there").status_code == 200


def test_an_upstream_that_does_not_read_stops_the_proxy_reading_the_client(tmp_path: Path) -> None:
    # Its own upstream: the unread DATA keeps that stream's window shut for good.
    baseline, sandbox = H2Upstream("baseline"), H2Upstream("sandbox")
    cfg = config(free_port(), baseline.address, sandbox.address)
    cfg["limits"]["drain_timeout_s"] = 1.0  # the stuck request is cut at shutdown
    try:
        with running_proxy(cfg, tmp_path) as proxy:
            pid = worker_pid(proxy)
            before = rss_bytes(pid)
            sent = 0
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(f"POST /noack HTTP/1.1\r\nhost: users\r\ncontent-length: {100 * MIB}\r\n\r\n".encode())
                sock.settimeout(0.5)
                chunk = b"n" * 65536
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline and sent < 100 * MIB:
                    try:
                        sent += sock.send(chunk)
                    except TimeoutError:
                        break  # the proxy stopped reading: our send buffer is full
                assert sent < 40 * MIB, f"the proxy kept reading ({sent} bytes) though its upstream does not"
                assert rss_bytes(pid) - before < 20 * MIB
                assert baseline.received_bytes <= 1 << 20  # at most the upstream's windows
    finally:
        baseline.stop()
        sandbox.stop()


def test_a_big_upload_goes_through(stack: H2Stack) -> None:
    payload = b"u" * (12 * MIB)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        r = client.put("/upload", content=payload)
    assert r.status_code == 200 and json.loads(r.content)["body_bytes"] == len(payload)


# ---------------------------------------------------------------------- failures


def test_sandbox_down_falls_back_to_http2_baseline(stack: H2Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        r = client.get("/fb", headers={"baggage": "turnout-session=gone"})
        assert r.status_code == 200 and r.headers["x-upstream"] == "baseline"
        hard = client.get("/fb", headers={"baggage": "turnout-session=hard"})
        assert hard.status_code == 503 and "session=hard-1" in hard.headers["x-turnout-error"]


def test_upstream_timeout_is_a_504_and_the_stream_is_cancelled(stack: H2Stack) -> None:
    resets = len(stack.baseline.resets)
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        r = client.get("/hang")
    assert r.status_code == 504 and r.headers["x-turnout-error"] == "upstream_timeout"
    deadline = time.monotonic() + 3
    while len(stack.baseline.resets) == resets and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(stack.baseline.resets) > resets  # RST_STREAM reached the upstream


def test_a_get_above_an_upstream_goaway_is_retried(tmp_path: Path) -> None:
    baseline, sandbox = H2Upstream("baseline"), H2Upstream("sandbox")
    try:
        with running_proxy(config(free_port(), baseline.address, sandbox.address), tmp_path) as proxy, \
                httpx.Client(base_url=proxy.url, timeout=10) as client:
            assert client.get("/warm").status_code == 200  # a pooled connection exists
            r = client.get("/goaway")
            assert r.status_code == 200 and baseline.went_away
            assert [s.header(b":path") for s in baseline.requests].count(b"/goaway") == 2
    finally:
        baseline.stop()
        sandbox.stop()


def test_upstream_reset_mid_response_cuts_the_client_off(stack: H2Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.proxy.port), timeout=5) as sock:
        sock.sendall(b"GET /reset-mid HTTP/1.1\r\nhost: users\r\n\r\n")
        received = b""
        started = time.monotonic()
        while True:
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
        assert time.monotonic() - started < 3  # cut off at once, not by a timeout
        assert received.startswith(b"HTTP/1.1 200") and b"content-length: 100000" in received
        assert len(received.partition(b"\r\n\r\n")[2]) < 100000  # never a well-formed short response
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        assert client.get("/after-reset").status_code == 200  # the upstream connection is fine


def test_clients_that_do_not_read_never_stall_others_on_the_shared_upstream_connection(tmp_path: Path) -> None:
    # Six slow clients hold up to a stream window each (256 KiB): more than the upstream
    # connection's whole window (1 MiB), which the proxy must therefore not hold back.
    baseline, sandbox = H2Upstream("baseline"), H2Upstream("sandbox")
    try:
        with running_proxy(config(free_port(), baseline.address, sandbox.address), tmp_path) as proxy:
            slow: list[socket.socket] = []
            try:
                for _ in range(6):
                    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
                    sock.sendall(f"GET /big?{4 * MIB} HTTP/1.1\r\nhost: users\r\n\r\n".encode())
                    slow.append(sock)
                time.sleep(1.0)
                with httpx.Client(base_url=proxy.url, timeout=10) as client:
                    r = client.get(f"/big?{4 * MIB}")
                assert r.status_code == 200 and len(r.content) == 4 * MIB
                assert baseline.connections == 1  # they all shared one upstream connection
            finally:
                for sock in slow:
                    sock.close()
    finally:
        baseline.stop()
        sandbox.stop()
