"""Both HTTP/1.1 codecs give the same answer: status, ``x-turnout-error`` cause, and the exact
bytes an upstream receives.

Each case comes from a disagreement the differential fuzz target
(``fuzz/targets/http1_differential.py``) found between httptools and h11, and runs against
a real proxy per codec (``--http httptools`` and ``--http h11``) in front of a raw upstream
that records every byte it reads and answers ``/reply/<name>`` with the response of that
name (anything else with a small 200).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import CODECS
from tests.integration.support import (
    ProxyProcess,
    RawUpstream,
    Response,
    free_port,
    inbound,
    parse_responses,
    running_proxy,
)

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
# What the upstream answers to GET /reply/<name>.
REPLIES = {
    b"status-006": b"HTTP/1.1 006 X\r\ncontent-length: 0\r\n\r\n",
    b"status-099": b"HTTP/1.1 099 X\r\ncontent-length: 0\r\n\r\n",
    b"status-600": b"HTTP/1.1 600 X\r\ncontent-length: 0\r\n\r\n",
    b"switch-no-upgrade": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    b"switch-h2c": b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    b"trailing-space": b"HTTP/1.1 200 OK\r\nX-A: a b \r\nContent-Length:  2 \r\n\r\nok",
}
CLOSE = b"Connection: close\r\n"
XFF = b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n"


class CaptureUpstream(RawUpstream):
    """A raw upstream: records every byte per connection, answers by target."""

    def answer(self, conn: socket.socket, index: int, head: bytes, rest: bytes) -> bytes | None:
        """Read the body (by content-length) and answer ``/reply/<name>`` or 200."""
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length: "):
                length = int(line[16:])
        buf = self.read_to(conn, index, rest, length)
        if buf is None:
            return None
        target = head.split(b" ", 2)[1]
        conn.sendall(REPLIES.get(target.removeprefix(b"/reply/"), OK))
        return buf[length:]


@dataclass
class Rig:
    """A proxy with one codec in front of a ``CaptureUpstream``."""

    proxy: ProxyProcess
    upstream: CaptureUpstream


@pytest.fixture(scope="module", params=CODECS)
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    upstream = CaptureUpstream()
    tmp: Path = tmp_path_factory.mktemp("codecs")
    config = {
        "listeners": [inbound("in", free_port(), "svc", upstream.address)],
        "limits": {"upstream_connect_timeout_s": 2.0, "upstream_response_timeout_s": 3.0},
    }
    try:
        with running_proxy(config, tmp, codec=str(request.param)) as proxy:
            yield Rig(proxy, upstream)
    finally:
        upstream.stop()


def _complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole response head and its Content-Length body."""
    end = data.find(b"\r\n\r\n")
    if end == -1:
        return False
    length = 0
    for line in data[:end].split(b"\r\n")[1:]:
        if line.lower().startswith(b"content-length:"):
            length = int(line[15:])
    return len(data) >= end + 4 + length


def exchange(rig: Rig, data: bytes) -> tuple[Response, bytes]:
    """Send ``data``, read one response (until the proxy closes, or the response is whole);
    the response and every byte the upstream received meanwhile."""
    rig.upstream.clear()
    with socket.create_connection(("127.0.0.1", rig.proxy.port), timeout=5) as s:
        s.sendall(data)
        out = b""
        while not _complete(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    time.sleep(0.05)  # the upstream thread records what it read
    responses = parse_responses(out)
    assert len(responses) == 1, out
    return responses[0], rig.upstream.received()


def refused(rig: Rig, data: bytes, status: int, cause: str) -> None:
    """``status`` with ``x-turnout-error: cause``, and nothing reached the upstream."""
    response, upstream = exchange(rig, data)
    assert (response.status, response.header("x-turnout-error")) == (status, cause), response
    assert upstream == b""


def forwarded(rig: Rig, data: bytes, upstream_bytes: bytes) -> Response:
    """Answered 200 by the upstream, which received exactly ``upstream_bytes``."""
    response, upstream = exchange(rig, data)
    assert response.status == 200, response
    assert upstream == upstream_bytes
    return response


# ---------------------------------------------------------------------- optional whitespace


def test_whitespace_after_a_value_is_not_forwarded(rig: Rig) -> None:
    # httptools kept it ("a b "), h11 dropped it.
    forwarded(rig, b"GET /v HTTP/1.1\r\nHost: a\r\nX-A: a b \r\nX-B:\tc\t\r\n" + CLOSE + b"\r\n",
              b"GET /v HTTP/1.1\r\nhost: a\r\nx-a: a b\r\nx-b: c\r\n" + XFF + b"\r\n")


def test_content_length_with_whitespace_around_it_frames_the_body(rig: Rig) -> None:
    # httptools refused it, h11 read 5.
    forwarded(rig, b"POST /cl HTTP/1.1\r\nHost: a\r\nContent-Length:  5 \r\n" + CLOSE + b"\r\nhello",
              b"POST /cl HTTP/1.1\r\nhost: a\r\n" + XFF + b"content-length: 5\r\n\r\nhello")


def test_host_with_whitespace_after_it_is_valid(rig: Rig) -> None:
    # httptools refused it (bad_host), h11 accepted it.
    forwarded(rig, b"GET /h HTTP/1.1\r\nHost: a \r\n" + CLOSE + b"\r\n",
              b"GET /h HTTP/1.1\r\nhost: a\r\n" + XFF + b"\r\n")


def test_whitespace_after_an_upstream_value_is_not_passed_on(rig: Rig) -> None:
    response, _ = exchange(rig, b"GET /reply/trailing-space HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    assert response.status == 200
    assert (response.header("x-a"), response.header("content-length"), response.body) == ("a b", "2", b"ok")


# ---------------------------------------------------------------------- lists


@pytest.mark.parametrize("value", [b", chunked", b"chunked,", b"chunked, ,"], ids=["empty-first", "empty-last",
                                                                                  "empty-middle"])
def test_transfer_encoding_with_empty_elements_is_refused(rig: Rig, value: bytes) -> None:
    # httptools read ", chunked" as chunked, h11 refused it: parsers disagree on it, so
    # turnout refuses it whichever runs.
    refused(rig, b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:" + value + b"\r\n\r\n0\r\n\r\n",
            400, "bad_framing")


@pytest.mark.parametrize(("value", "status", "cause"), [
    (b"gzip", 400, "bad_framing"),  # chunked not last: the length cannot be known
    (b"chunked, chunked", 400, "bad_framing"),
    (b"gzip, chunked", 501, "unsupported_coding"),  # a coding turnout would have to undo
], ids=["gzip", "chunked-twice", "gzip-chunked"])
def test_transfer_codings_get_one_answer(rig: Rig, value: bytes, status: int, cause: str) -> None:
    # httptools refused gzip as invalid and read "gzip, chunked" as chunked; h11 refused both.
    refused(rig, b"POST /te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n",
            status, cause)


# ---------------------------------------------------------------------- methods


@pytest.mark.parametrize("method", [b"T", b"GETGT", b"get", b"Post", b"FOO-BAR"])
def test_a_method_turnout_does_not_know_is_501(rig: Rig, method: bytes) -> None:
    # httptools refused these as invalid (400), h11 forwarded them.
    refused(rig, method + b" / HTTP/1.1\r\nHost: a\r\n\r\n", 501, "method_not_implemented")


def test_connect_is_405_whatever_its_target(rig: Rig) -> None:
    refused(rig, b"CONNECT /x HTTP/1.1\r\nHost: a\r\n\r\n", 405, "method_not_allowed")


# ---------------------------------------------------------------------- responses


@pytest.mark.parametrize("reply", [b"status-006", b"status-099", b"status-600"])
def test_a_status_outside_100_to_599_is_a_502(rig: Rig, reply: bytes) -> None:
    # httptools read 006 and 099 as a 1xx, h11 refused them; h11 took 600.
    response, _ = exchange(rig, b"GET /reply/" + reply + b" HTTP/1.1\r\nHost: a\r\n" + CLOSE + b"\r\n")
    assert (response.status, response.header("x-turnout-error")) == (502, "upstream_bad_head")


@pytest.mark.parametrize("reply", [b"switch-no-upgrade", b"switch-h2c"])
def test_101_without_upgrade_websocket_is_a_502(rig: Rig, reply: bytes) -> None:
    # h11 switched to a tunnel on a 101 without Upgrade; httptools refused it.
    response, _ = exchange(rig, b"GET /reply/" + reply + b" HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert (response.status, response.header("x-turnout-error")) == (502, "upstream_bad_head")
